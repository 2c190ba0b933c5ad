// Package disksink writes a point's blocks straight into disks, NBD exports of
// the images themselves, rather than into a recovery site's chain of points:
// the end of a failback cycle, whose target is the production disk.
package disksink

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
)

// HashMismatchError: a block that does not match the hash its sender gave.
// Nothing of the call that carried it was written.
type HashMismatchError struct {
	VM, Disk string
	Point    uint64
	Offset   int64
}

func (e *HashMismatchError) Error() string {
	return fmt.Sprintf("vm %q disk %q point %d: block at offset %d does not match its hash: nothing of this write was stored; the sender must resend it (data corrupted in transit or at the source)",
		e.VM, e.Disk, e.Point, e.Offset)
}

// ErrAborted is returned (wrapped) by every call after Abort.
var ErrAborted = errors.New("the point was aborted")

// Sink is one point being written into disks: a lifeboat.PointSink. Its
// methods are safe for concurrent use.
//
// A disk is written in place, so a sink that fails or is aborted leaves its
// disks part old, part new: unlike a chain of points, a disk target holds no
// earlier point to fall back on. Its owner must treat such a disk as holding
// no point until a later sink commits over it (failback's next cycle resends
// what this one did not finish).
type Sink struct {
	ctx   context.Context
	point lifeboat.Point
	disks map[string]*disk

	written atomic.Int64 // bytes of data written (copies included)
	zeroed  atomic.Int64 // bytes made zero

	mu     sync.Mutex
	failed error // the first failure; every later call returns it
	done   bool  // committed or aborted
}

type disk struct {
	name string
	size int64
	c    *nbd.Client

	mu     sync.Mutex
	hashes map[int64]lifeboat.Hash // block -> hash, of the blocks this point wrote (the sources of copies)
}

// Open starts writing point p into disks: one writable NBD export per disk of
// p, by disk name, each of the disk's size. ctx bounds every write of the
// point; the clients stay the caller's to close.
func Open(ctx context.Context, p lifeboat.Point, disks map[string]*nbd.Client) (*Sink, error) {
	s := &Sink{ctx: ctx, point: p, disks: map[string]*disk{}}
	for _, d := range p.Disks {
		c, ok := disks[d.Name]
		if !ok {
			return nil, fmt.Errorf("vm %q point %d: no target disk for disk %q: give an export of it", p.VM, p.ID, d.Name)
		}
		if c.ReadOnly() {
			return nil, fmt.Errorf("vm %q point %d disk %q: target %s is read-only", p.VM, p.ID, d.Name, c)
		}
		if c.Size() != d.Size {
			return nil, fmt.Errorf("vm %q point %d disk %q: target %s is %d bytes, the disk %d: resize the target to the disk's size first",
				p.VM, p.ID, d.Name, c, c.Size(), d.Size)
		}
		s.disks[d.Name] = &disk{name: d.Name, size: d.Size, c: c, hashes: map[int64]lifeboat.Hash{}}
	}
	for name := range disks {
		if _, ok := s.disks[name]; !ok {
			return nil, fmt.Errorf("vm %q point %d: target disk %q is not a disk of the point", p.VM, p.ID, name)
		}
	}
	return s, nil
}

// Written is the bytes of data written so far (copies included), Zeroed the
// bytes made zero.
func (s *Sink) Written() int64 { return s.written.Load() }
func (s *Sink) Zeroed() int64  { return s.zeroed.Load() }

// start checks the sink takes writes and returns the named disk.
func (s *Sink) start(name string) (*disk, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed != nil {
		return nil, s.failed
	}
	if s.done {
		return nil, fmt.Errorf("vm %q point %d: %w or committed", s.point.VM, s.point.ID, ErrAborted)
	}
	d, ok := s.disks[name]
	if !ok {
		return nil, fmt.Errorf("vm %q point %d: no disk %q in the point", s.point.VM, s.point.ID, name)
	}
	return d, nil
}

// fail records err as the sink's failure, if it is the first, and returns it.
func (s *Sink) fail(err error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed == nil {
		s.failed = err
	}
	return err
}

func (d *disk) checkRange(s *Sink, off, length int64) error {
	if off < 0 || length < 0 || off%lifeboat.BlockSize != 0 || off+length > d.size ||
		(length%lifeboat.BlockSize != 0 && off+length != d.size) {
		return fmt.Errorf("vm %q point %d disk %q: range [%d, %d) is not whole blocks of the %d-byte disk",
			s.point.VM, s.point.ID, d.name, off, off+length, d.size)
	}
	return nil
}

// SendBlocks writes data at off once every block of it matches its hash.
func (s *Sink) SendBlocks(name string, off int64, data []byte, hashes []lifeboat.Hash) (int64, error) {
	d, err := s.start(name)
	if err != nil {
		return 0, err
	}
	if err := d.checkRange(s, off, int64(len(data))); err != nil {
		return 0, err
	}
	if n := (int64(len(data)) + lifeboat.BlockSize - 1) / lifeboat.BlockSize; int64(len(hashes)) != n {
		return 0, fmt.Errorf("vm %q point %d disk %q: %d hashes for %d blocks at offset %d", s.point.VM, s.point.ID, name, len(hashes), n, off)
	}
	if lo := lifeboat.Mismatch(data, hashes); lo >= 0 {
		return 0, &HashMismatchError{VM: s.point.VM, Disk: name, Point: s.point.ID, Offset: off + lo}
	}
	if err := d.c.Write(s.ctx, data, off, false); err != nil {
		return 0, s.fail(fmt.Errorf("vm %q point %d disk %q: writing %d bytes at offset %d: %w", s.point.VM, s.point.ID, name, len(data), off, err))
	}
	d.mu.Lock()
	for i, h := range hashes {
		d.hashes[off/lifeboat.BlockSize+int64(i)] = h
	}
	d.mu.Unlock()
	s.written.Add(int64(len(data)))
	return int64(len(data)), nil
}

// SendPatch writes the whole block: the target is the disk itself, written
// in place, and the block is at hand (checked against h like any other).
func (s *Sink) SendPatch(name string, off int64, block []byte, h lifeboat.Hash, _ lifeboat.Dirty) (int64, error) {
	return s.SendBlocks(name, off, block, []lifeboat.Hash{h})
}

// WritePatch writes the changed parts of the block at off (the sub-blocks
// of dirty, data their bytes one range after another) once data matches sum;
// the rest of the block is the disk's own, the point the delta was computed
// from, and h is the whole block's hash after it.
func (s *Sink) WritePatch(name string, off int64, dirty lifeboat.Dirty, data []byte, sum, h lifeboat.Hash) error {
	d, err := s.start(name)
	if err != nil {
		return err
	}
	n := min(lifeboat.BlockSize, d.size-off)
	if err := d.checkRange(s, off, n); err != nil {
		return err
	}
	parts, err := dirty.Split(int(n), data)
	if err != nil {
		return fmt.Errorf("vm %q point %d disk %q offset %d: %w", s.point.VM, s.point.ID, name, off, err)
	}
	if lifeboat.HashBlock(data) != sum {
		return &HashMismatchError{VM: s.point.VM, Disk: name, Point: s.point.ID, Offset: off}
	}
	for _, p := range parts {
		if err := d.c.Write(s.ctx, p.Data, off+p.Off, false); err != nil {
			return s.fail(fmt.Errorf("vm %q point %d disk %q: writing %d bytes at offset %d: %w", s.point.VM, s.point.ID, name, len(p.Data), off+p.Off, err))
		}
	}
	d.mu.Lock()
	d.hashes[off/lifeboat.BlockSize] = h
	d.mu.Unlock()
	s.written.Add(int64(len(data)))
	return nil
}

// SendCopy reads the source block back from its target disk, checks it
// against h and writes it at (name, off).
func (s *Sink) SendCopy(name string, off int64, srcName string, srcOff int64, length int, h lifeboat.Hash) error {
	d, err := s.start(name)
	if err != nil {
		return err
	}
	src, err := s.start(srcName)
	if err != nil {
		return err
	}
	if err := d.checkRange(s, off, int64(length)); err != nil {
		return err
	}
	if err := src.checkRange(s, srcOff, int64(length)); err != nil {
		return err
	}
	src.mu.Lock()
	sh, ok := src.hashes[srcOff/lifeboat.BlockSize]
	src.mu.Unlock()
	if !ok {
		return fmt.Errorf("vm %q point %d disk %q: copy at offset %d from disk %q offset %d: %w",
			s.point.VM, s.point.ID, name, off, srcName, srcOff, lifeboat.ErrSourcePending)
	}
	if sh != h {
		return fmt.Errorf("vm %q point %d disk %q: copy at offset %d from disk %q offset %d, which this point wrote with another hash: send the block itself",
			s.point.VM, s.point.ID, name, off, srcName, srcOff)
	}
	buf := make([]byte, length)
	if err := src.c.Read(s.ctx, buf, srcOff); err != nil {
		return s.fail(fmt.Errorf("vm %q point %d disk %q: reading the copy's source at offset %d: %w", s.point.VM, s.point.ID, srcName, srcOff, err))
	}
	if lifeboat.HashBlock(buf) != h {
		return s.fail(fmt.Errorf("vm %q point %d disk %q: the block written at offset %d reads back different from what was written: the target disk is not keeping its writes",
			s.point.VM, s.point.ID, srcName, srcOff))
	}
	if err := d.c.Write(s.ctx, buf, off, false); err != nil {
		return s.fail(fmt.Errorf("vm %q point %d disk %q: writing a copy at offset %d: %w", s.point.VM, s.point.ID, name, off, err))
	}
	d.mu.Lock()
	d.hashes[off/lifeboat.BlockSize] = h
	d.mu.Unlock()
	s.written.Add(int64(length))
	return nil
}

// SendZeroes makes [off, off+length) of the disk read as zeros (it may free
// the space, as the point's zero ranges are).
func (s *Sink) SendZeroes(name string, off, length int64) error {
	d, err := s.start(name)
	if err != nil {
		return err
	}
	if err := d.checkRange(s, off, length); err != nil {
		return err
	}
	if err := d.c.WriteZeroes(s.ctx, off, length, 0); err != nil {
		return s.fail(fmt.Errorf("vm %q point %d disk %q: zeroing [%d, %d): %w", s.point.VM, s.point.ID, name, off, off+length, err))
	}
	d.mu.Lock()
	for b := off / lifeboat.BlockSize; b*lifeboat.BlockSize < off+length; b++ {
		delete(d.hashes, b)
	}
	d.mu.Unlock()
	s.zeroed.Add(length)
	return nil
}

// Commit flushes every disk and returns the point, stats in it, once all of
// it is on stable storage.
func (s *Sink) Commit(stats lifeboat.CycleStats) (lifeboat.Point, error) {
	s.mu.Lock()
	if s.failed != nil {
		err := s.failed
		s.mu.Unlock()
		return lifeboat.Point{}, err
	}
	if s.done {
		s.mu.Unlock()
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d: %w or committed", s.point.VM, s.point.ID, ErrAborted)
	}
	s.done = true
	s.mu.Unlock()
	for _, d := range s.point.Disks {
		if err := s.disks[d.Name].c.Flush(s.ctx); err != nil {
			return lifeboat.Point{}, s.fail(fmt.Errorf("vm %q point %d disk %q: flushing: %w: the disk may not hold the point", s.point.VM, s.point.ID, d.Name, err))
		}
	}
	p := s.point
	p.Stats = stats
	return p, nil
}

// Abort ends the point; what it wrote stays (see Sink).
func (s *Sink) Abort() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
}

var _ lifeboat.PointSink = (*Sink)(nil)

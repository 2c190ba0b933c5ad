package recovery

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
)

// Adopt makes images that already hold a point's content the first point of
// spec.VM here, without copying them: every disk names its image in
// DiskSpec.Seed (an absolute path), and the point's own image is a thin
// qcow2 overlay over it, so later points and retention's merges never write
// into the seed. It is how a site that held a VM's disks (its old production
// site, after a failover and a failback of them) becomes the VM's recovery
// site with no full copy: protection in reverse.
//
// Nothing crosses the wire, so there is no sender's hash to check: the
// point's block record is the hashes of the seed's data blocks, read here
// through the point's own export, which is what verify and a later resync
// compare against. The seed must never be written again (the chain reads
// through it); the caller moves it where nothing else opens it.
func (s *Store) Adopt(ctx context.Context, spec BeginSpec) (lifeboat.Point, error) {
	start := time.Now()
	for _, d := range spec.Disks {
		if d.Seed == "" {
			return lifeboat.Point{}, fmt.Errorf("vm %q disk %q: no image to adopt", spec.VM, d.Name)
		}
	}
	w, err := s.Begin(ctx, spec)
	if err != nil {
		return lifeboat.Point{}, err
	}
	abort := func(err error) (lifeboat.Point, error) {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		return lifeboat.Point{}, errors.Join(err, w.Abort(actx))
	}
	var stats lifeboat.CycleStats
	for _, ds := range spec.Disks {
		s.log.Info("adopting a disk image: hashing its data blocks into the point's record (read here, nothing is copied)", "vm", spec.VM, "disk", ds.Name, "point", spec.ID, "image", ds.Seed)
		t := time.Now()
		n, err := w.recordSeed(ctx, ds.Name)
		if err != nil {
			return abort(err)
		}
		s.log.Info("disk image adopted", "vm", spec.VM, "disk", ds.Name, "point", spec.ID, "data", n, "took", time.Since(t).Round(time.Millisecond))
		stats.BytesData += n
		stats.BytesChanged += ds.Size
	}
	stats.Duration = time.Since(start)
	pt, err := w.Commit(ctx, stats)
	if err != nil {
		return abort(err)
	}
	return pt, nil
}

// recordSeed puts the hash of every data block of disk's seed in the
// point's record, and returns the bytes of data it holds.
func (w *Writer) recordSeed(ctx context.Context, disk string) (int64, error) {
	d, err := w.disk(disk)
	if err != nil {
		return 0, err
	}
	defer w.inflight.Done()
	var data int64
	err = HashData(ctx, d.client, func(b int64, h lifeboat.Hash) error {
		data += lifeboat.BlockSize
		d.mu.Lock()
		defer d.mu.Unlock()
		d.pend.putData(b, h)
		return w.flushFull(d)
	})
	if err != nil {
		return 0, fmt.Errorf("vm %q disk %q: hashing the adopted image %s: %w", w.spec.VM, disk, d.spec.Seed, err)
	}
	return data, nil
}

// HashData calls fn with the hash of every block of c's export that holds
// data (the blocks base:allocation reports as not reading zeros and whose
// bytes are not all zero), in order: what a block map records of a disk.
// c must have negotiated base:allocation.
func HashData(ctx context.Context, c *nbd.Client, fn func(block int64, h lifeboat.Hash) error) error {
	const run = 16 * lifeboat.BlockSize
	size := c.Size()
	var data [][2]int64 // allocated, non-zero extents, on the block grid
	err := c.BlockStatus(ctx, nbd.ContextBaseAllocation, 0, size, func(e nbd.Extent) error {
		if e.Flags&nbd.StateZero != 0 {
			return nil
		}
		lo := e.Offset / lifeboat.BlockSize * lifeboat.BlockSize
		hi := min((e.Offset+e.Length+lifeboat.BlockSize-1)/lifeboat.BlockSize*lifeboat.BlockSize, size)
		if n := len(data); n > 0 && data[n-1][1] >= lo {
			data[n-1][1] = max(data[n-1][1], hi)
		} else {
			data = append(data, [2]int64{lo, hi})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("allocation: %w", err)
	}
	buf := make([]byte, run)
	for _, e := range data {
		for off := e[0]; off < e[1]; off += run {
			b := buf[:min(run, e[1]-off)]
			if err := c.Read(ctx, b, off); err != nil {
				return fmt.Errorf("read at %d: %w", off, err)
			}
			for i := 0; i < len(b); i += lifeboat.BlockSize {
				blk := b[i:min(i+lifeboat.BlockSize, len(b))]
				if lifeboat.AllZero(blk) {
					continue
				}
				if err := fn((off+int64(i))/lifeboat.BlockSize, lifeboat.HashBlock(blk)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

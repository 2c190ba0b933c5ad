package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// VerifyReport is what Verify checked.
type VerifyReport struct {
	VM       string
	Point    uint64
	Disks    []VerifyDisk
	Duration time.Duration
}

// VerifyDisk is what Verify checked of one disk.
type VerifyDisk struct {
	Name   string
	Blocks int64 // blocks read and checked
	Bytes  int64
}

// VerifyError names the first block of a point that does not read back as recorded.
type VerifyError struct {
	VM     string
	Point  uint64
	Disk   string
	Offset int64
	Want   lifeboat.Hash // lifeboat.ZeroHash: the block must read as zeros
	Got    lifeboat.Hash
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("vm %q point %d disk %q: block at offset %d reads %s, recorded %s: the image is damaged; restore from another point or resync the VM",
		e.VM, e.Point, e.Disk, e.Offset, e.Got, e.Want)
}

// verifyWorkers is how many blocks are read and hashed at once.
const verifyWorkers = 8

// Verify re-reads every block in the block map of point id (0 = latest), through
// the chain as the point sees it, and checks each against its recorded hash;
// blocks recorded as zeros must read as zeros. The first mismatch (lowest
// offset of the first disk that has one) is returned as a *VerifyError.
// progress, if not nil, is called with bytes done and bytes to check.
func (s *Store) Verify(ctx context.Context, vm string, id uint64, progress func(done, total int64)) (VerifyReport, error) {
	start := time.Now()
	unlock, err := s.lockChain(ctx, vm, false)
	if err != nil {
		return VerifyReport{}, err
	}
	defer unlock()
	p, err := s.Point(vm, id)
	if err != nil {
		return VerifyReport{}, err
	}
	rep := VerifyReport{VM: vm, Point: p.ID}

	maps := make([]map[int64]lifeboat.Hash, len(p.Disks))
	names := make([]string, len(p.Disks))
	files := make([]string, len(p.Disks))
	var total int64
	for i, d := range p.Disks {
		if maps[i], err = s.BlockMap(vm, d.Name, p.ID); err != nil {
			return rep, err
		}
		names[i], files[i] = d.Name, d.File
		for b := range maps[i] {
			total += blockLen(b, d.Size)
		}
	}

	run, err := s.runDir()
	if err != nil {
		return rep, err
	}
	defer os.RemoveAll(run)
	daemon, err := s.startDaemon(ctx, run, names, files, false)
	if err != nil {
		return rep, fmt.Errorf("vm %q point %d: opening the point to verify: %w", vm, p.ID, err)
	}
	defer daemon.Kill() // read-only: nothing to save on the way out

	var done atomic.Int64
	for i, d := range p.Disks {
		vd, err := s.verifyDisk(ctx, vm, p.ID, d, daemon, maps[i], &done, total, progress)
		rep.Disks = append(rep.Disks, vd)
		if err != nil {
			rep.Duration = time.Since(start)
			return rep, err
		}
	}
	rep.Duration = time.Since(start)
	return rep, daemon.Stop(ctx)
}

// blockLen is the length of block b of a disk of size bytes.
func blockLen(b, size int64) int64 {
	return min(lifeboat.BlockSize, size-b*lifeboat.BlockSize)
}

func (s *Store) verifyDisk(ctx context.Context, vm string, point uint64, d lifeboat.PointDisk, daemon *qemu.Daemon,
	m map[int64]lifeboat.Hash, done *atomic.Int64, total int64, progress func(done, total int64)) (VerifyDisk, error) {
	vd := VerifyDisk{Name: d.Name}
	c, err := dialExport(ctx, daemon, d.Name, d.Size)
	if err != nil {
		return vd, fmt.Errorf("vm %q point %d: %w", vm, point, err)
	}
	defer c.Close()

	blocks := make([]int64, 0, len(m))
	for b := range m {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	var progressMu sync.Mutex // progress is called from one goroutine at a time

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next    atomic.Int64
		stopAt  atomic.Int64 // index of the lowest mismatch found so far
		mu      sync.Mutex
		first   *VerifyError
		readErr error
		checked atomic.Int64
		bytes   atomic.Int64
		wg      sync.WaitGroup
	)
	stopAt.Store(int64(len(blocks)))
	for range verifyWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, lifeboat.BlockSize)
			for {
				k := next.Add(1) - 1
				if k >= stopAt.Load() || ctx.Err() != nil {
					return
				}
				b := blocks[k]
				off, n := b*lifeboat.BlockSize, blockLen(b, d.Size)
				if err := c.Read(ctx, buf[:n], off); err != nil {
					mu.Lock()
					if readErr == nil && ctx.Err() == nil {
						readErr = fmt.Errorf("vm %q point %d disk %q: reading offset %d: %w", vm, point, d.Name, off, err)
					}
					mu.Unlock()
					cancel()
					return
				}
				want := m[b]
				ok := false
				var got lifeboat.Hash
				if want.IsZero() {
					ok = lifeboat.AllZero(buf[:n])
					if !ok {
						got = lifeboat.HashBlock(buf[:n])
					}
				} else {
					got = lifeboat.HashBlock(buf[:n])
					ok = got == want
				}
				if !ok {
					mu.Lock()
					// Keep the lowest offset; blocks after it need not be read.
					if first == nil || off < first.Offset {
						first = &VerifyError{VM: vm, Point: point, Disk: d.Name, Offset: off, Want: want, Got: got}
						stopAt.Store(k)
					}
					mu.Unlock()
					continue
				}
				checked.Add(1)
				bytes.Add(n)
				if dn := done.Add(n); progress != nil {
					progressMu.Lock()
					progress(dn, total)
					progressMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	vd.Blocks, vd.Bytes = checked.Load(), bytes.Load()
	if first != nil {
		return vd, first
	}
	if readErr != nil {
		return vd, readErr
	}
	if err := ctx.Err(); err != nil {
		return vd, errors.Join(fmt.Errorf("vm %q point %d disk %q: verify interrupted", vm, point, d.Name), err)
	}
	return vd, nil
}

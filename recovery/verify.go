package recovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
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
	// Zero are the blocks among them that the block map does not hold as
	// data (zeroed, discarded or never written) but the image has allocated:
	// each must read as zeros. Blocks the image reports as zeros are not read.
	Zero int64
}

// VerifyError names the first block of a point that does not read back as recorded.
type VerifyError struct {
	VM     string
	Point  uint64
	Disk   string
	Offset int64
	Want   lifeboat.Hash // lifeboat.ZeroHash: the block must read as zeros
	Got    lifeboat.Hash
	// Unreadable is why the block could not be read at all (the image's
	// metadata damaged: QEMU answers EIO), nil when it read other bytes.
	Unreadable error
}

func (e *VerifyError) Error() string {
	if e.Unreadable != nil {
		return fmt.Sprintf("vm %q point %d disk %q: block at offset %d cannot be read (%v), recorded %s: the image is damaged; a failover or export can take another point (`lifeboat points %s`), and `lifeboat sync %s --whole` at its protected site repairs the replica (a point holding the whole disk)",
			e.VM, e.Point, e.Disk, e.Offset, e.Unreadable, e.Want, e.VM, e.VM)
	}
	return fmt.Sprintf("vm %q point %d disk %q: block at offset %d reads %s, recorded %s: the image is damaged; a failover or export can take another point (`lifeboat points %s`), and `lifeboat sync %s --whole` at its protected site repairs the replica (a point holding the whole disk)",
		e.VM, e.Point, e.Disk, e.Offset, e.Got, e.Want, e.VM, e.VM)
}

// verifyWorkers is how many blocks are read and hashed at once.
const verifyWorkers = 8

// Verify re-reads every data block in the block map of point id (0 = latest),
// through the chain as the point sees it, and checks each against its
// recorded hash; every other block (zeroed, discarded or never written) must
// read as zeros, which is checked by reading only the blocks the image
// reports as allocated (NBD block status), so a sparse 16 TiB disk costs its
// data, not its size. The first mismatch (lowest offset of the first disk
// that has one) is returned as a *VerifyError. progress, if not nil, is
// called with bytes done and bytes to check.
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

	names := make([]string, len(p.Disks))
	files := make([]string, len(p.Disks))
	for i, d := range p.Disks {
		names[i], files[i] = d.Name, d.File
	}
	run, err := s.runDir()
	if err != nil {
		return rep, err
	}
	defer os.RemoveAll(run)
	daemon, err := s.startDaemon(ctx, run, names, files, nil, false)
	if err != nil {
		return rep, fmt.Errorf("vm %q point %d: opening the point to verify: %w", vm, p.ID, err)
	}
	defer daemon.Kill() // read-only: nothing to save on the way out

	plans := make([]*checkPlan, len(p.Disks))
	var total int64
	for i, d := range p.Disks {
		c, err := dialExport(ctx, daemon, d.Name, d.Size)
		if err != nil {
			return rep, fmt.Errorf("vm %q point %d: %w", vm, p.ID, err)
		}
		defer c.Close()
		if plans[i], err = s.planVerify(ctx, vm, p.ID, d, c); err != nil {
			return rep, err
		}
		total += plans[i].bytes
	}
	var done atomic.Int64
	for i, d := range p.Disks {
		vd := VerifyDisk{Name: d.Name, Zero: plans[i].zero}
		var mis *blockMismatch
		mis, vd.Blocks, vd.Bytes, err = checkBlocks(ctx, plans[i], func(n int64) {
			if dn := done.Add(n); progress != nil {
				progress(dn, total)
			}
		})
		rep.Disks = append(rep.Disks, vd)
		if err != nil {
			err = fmt.Errorf("vm %q point %d disk %q: %w", vm, p.ID, d.Name, err)
		} else if mis != nil {
			err = &VerifyError{VM: vm, Point: p.ID, Disk: d.Name, Offset: mis.off, Want: mis.want, Got: mis.got, Unreadable: mis.err}
		}
		if err != nil {
			rep.Duration = time.Since(start)
			if mis != nil {
				mark := &lifeboat.DamageMark{Disk: d.Name, Offset: mis.off, Point: p.ID, At: time.Now().UTC()}
				if merr := s.markDamage(vm, p.ID, mark); merr != nil {
					err = errors.Join(err, fmt.Errorf("recording the damage in the catalog: %w", merr))
				}
			}
			return rep, err
		}
	}
	rep.Duration = time.Since(start)
	if err := s.clearDamage(vm, p.ID); err != nil {
		return rep, fmt.Errorf("vm %q point %d reads as written, but clearing its damage mark failed: %w", vm, p.ID, err)
	}
	return rep, daemon.Stop(ctx)
}

// ErrDamaged marks an error about a point marked damaged
// (lifeboat.Point.Damaged): a verify found a block of it damaged, or an
// image of its chain is gone.
var ErrDamaged = errors.New("the point is marked damaged")

// damageError says that point id of vm reads the damaged block of mark.
func damageError(vm string, id uint64, mark *lifeboat.DamageMark) error {
	if mark.Missing != "" {
		return fmt.Errorf("vm %q point %d disk %q: %w: its chain reads the image %s, which is gone (deleted outside lifeboat, or the images put back from a backup older than the catalog); the point does not read as it was written: put the file back and restart the site, take a point that does not read it (`lifeboat points %s`), or `lifeboat forget %s --yes` and let its protected site send it whole",
			vm, id, mark.Disk, ErrDamaged, mark.Missing, vm, vm)
	}
	return fmt.Errorf("vm %q point %d disk %q: %w: a verify found the block at offset %d damaged (the verify of point %d at %s); the point does not read as it was written: take a point that does not read it (`lifeboat points %s`), or `lifeboat sync %s --whole` at its protected site for a new one",
		vm, id, mark.Disk, ErrDamaged, mark.Offset, mark.Point, mark.At.Format(time.RFC3339), vm, vm)
}

// blockSource is the point whose image and record hold block b of disk in
// point id's view, and false when no record of its chain holds it.
func blockSource(tx *bolt.Tx, vm, disk string, id uint64, b int64) (uint64, bool, error) {
	chain, err := chainOf(tx, vm, disk, id)
	if err != nil {
		return 0, false, err
	}
	for _, lv := range chain {
		has, err := lv.rec.has(b)
		if err != nil {
			return 0, false, err
		}
		if has {
			return lv.id, true, nil
		}
	}
	return 0, false, nil
}

// markDamage records the damage the verify of mark.Point found on every
// listed point that reads the damaged block from the same image: the
// verified point, those below it that share that image, and those above
// that did not write the block since. A block no record holds (it had to
// read as zeros) marks the verified point only.
func (s *Store) markDamage(vm string, id uint64, mark *lifeboat.DamageMark) error {
	b := mark.Offset / lifeboat.BlockSize
	return s.db.Update(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err != nil {
			return err
		}
		src, found, err := blockSource(tx, vm, mark.Disk, id, b)
		if err != nil {
			return err
		}
		for _, r := range pts {
			if r.Point.ID != id {
				if _, ok := r.disk(mark.Disk); !ok || !found {
					continue
				}
				if ps, ok, err := blockSource(tx, vm, mark.Disk, r.Point.ID, b); err != nil {
					return err
				} else if !ok || ps != src {
					continue
				}
			}
			m := *mark
			r.Point.Damaged = &m
			if err := putPoint(vmBucket(tx, vm), r); err != nil {
				return err
			}
		}
		return nil
	})
}

// clearDamage clears, once a verify of point id found every block as
// written, its damage mark and those of the points that read their marked
// block from the same image as point id.
func (s *Store) clearDamage(vm string, id uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err != nil {
			return err
		}
		self, ok, err := readPoint(tx, vm, id)
		if err != nil || !ok {
			return err
		}
		for _, r := range pts {
			m := r.Point.Damaged
			if m == nil {
				continue
			}
			if r.Point.ID != id {
				if _, ok := self.disk(m.Disk); !ok {
					continue
				}
				b := m.Offset / lifeboat.BlockSize
				theirs, ok1, err := blockSource(tx, vm, m.Disk, r.Point.ID, b)
				if err != nil {
					return err
				}
				ours, ok2, err := blockSource(tx, vm, m.Disk, id, b)
				if err != nil {
					return err
				}
				if !ok1 || !ok2 || theirs != ours {
					continue
				}
			}
			r.Point.Damaged = nil
			if err := putPoint(vmBucket(tx, vm), r); err != nil {
				return err
			}
		}
		return nil
	})
}

// blockLen is the length of block b of a disk of size bytes.
func blockLen(b, size int64) int64 {
	return min(lifeboat.BlockSize, size-b*lifeboat.BlockSize)
}

// blockCheck is one block to read back: it must hash to want, or read as
// zeros when want is lifeboat.ZeroHash.
type blockCheck struct {
	b    int64
	want lifeboat.Hash
}

// checkPlan is what to read back from one export, in block order.
type checkPlan struct {
	c      *nbd.Client
	size   int64
	checks []blockCheck
	bytes  int64 // to read
	zero   int64 // checks that must read as zeros
}

func (pl *checkPlan) add(b int64, want lifeboat.Hash) {
	pl.checks = append(pl.checks, blockCheck{b, want})
	pl.bytes += blockLen(b, pl.size)
	if want.IsZero() {
		pl.zero++
	}
}

// sort puts the checks in block order, so the first mismatch found is the lowest.
func (pl *checkPlan) sort() {
	slices.SortFunc(pl.checks, func(a, b blockCheck) int { return cmp.Compare(a.b, b.b) })
}

// addAllocatedZeros adds a zero check for every block of [lo, hi) that the
// export reports as allocated and skip does not claim.
func (pl *checkPlan) addAllocatedZeros(ctx context.Context, lo, hi int64, skip func(b int64) bool) error {
	off, end := lo*lifeboat.BlockSize, min(hi*lifeboat.BlockSize, pl.size)
	if end <= off {
		return nil
	}
	return pl.c.BlockStatus(ctx, nbd.ContextBaseAllocation, off, end-off, func(e nbd.Extent) error {
		if e.Flags&nbd.StateZero != 0 {
			return nil
		}
		for b := e.Offset / lifeboat.BlockSize; b < blockCount(e.Offset+e.Length); b++ {
			if !skip(b) {
				pl.add(b, lifeboat.ZeroHash)
			}
		}
		return nil
	})
}

// planVerify lists what Verify reads of one disk: every data block of the
// block map, and every other block the image has allocated (it must read as
// zeros), except the blocks a resize left unknown.
func (s *Store) planVerify(ctx context.Context, vm string, point uint64, d lifeboat.PointDisk, c *nbd.Client) (*checkPlan, error) {
	pl := &checkPlan{c: c, size: d.Size}
	data := map[int64]bool{}
	var unknown map[int64]bool
	err := s.db.View(func(tx *bolt.Tx) error {
		chain, err := chainOf(tx, vm, d.Name, point)
		if err != nil {
			return err
		}
		if unknown, err = unknownBlocks(tx, vm, d.Name, point); err != nil {
			return err
		}
		return eachFolded(chain, func(b int64, h lifeboat.Hash) error {
			data[b] = true
			pl.add(b, h)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("vm %q point %d disk %q: reading the block map: %w", vm, point, d.Name, err)
	}
	skip := func(b int64) bool { return data[b] || unknown[b] }
	if err := pl.addAllocatedZeros(ctx, 0, blockCount(d.Size), skip); unreadable(err) {
		// The image's metadata is damaged (QEMU answers block status
		// with EIO): every other block is read instead, and the first
		// that cannot be read says where.
		s.log.Warn("verify: the image's allocation cannot be read; reading every block", "vm", vm, "point", point, "disk", d.Name, "err", err)
		for b := range blockCount(d.Size) {
			if !skip(b) {
				pl.add(b, lifeboat.ZeroHash)
			}
		}
	} else if err != nil {
		return nil, fmt.Errorf("vm %q point %d disk %q: allocation of the image: %w", vm, point, d.Name, err)
	}
	pl.sort()
	return pl, nil
}

// blockMismatch is the first block of a plan that did not read back as planned.
type blockMismatch struct {
	off       int64
	want, got lifeboat.Hash
	err       error // the block could not be read (unreadable)
}

// unreadable says of a read's error that the server answered it with EIO:
// the image is damaged there (QEMU finds its metadata corrupt), unlike a
// connection that failed.
func unreadable(err error) bool {
	var ne *nbd.Error
	return errors.As(err, &ne) && ne.Errno == syscall.EIO
}

// checkBlocks reads back every block of pl with a few workers and returns the
// lowest mismatch, if any, with the blocks and bytes that matched. progress,
// if not nil, gets the bytes of each block that matched (from one goroutine
// at a time).
func checkBlocks(ctx context.Context, pl *checkPlan, progress func(n int64)) (_ *blockMismatch, blocks, bytes int64, _ error) {
	var progressMu sync.Mutex
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next    atomic.Int64
		stopAt  atomic.Int64 // index of the lowest mismatch found so far
		mu      sync.Mutex
		first   *blockMismatch
		readErr error
		checked atomic.Int64
		nbytes  atomic.Int64
		wg      sync.WaitGroup
	)
	stopAt.Store(int64(len(pl.checks)))
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
				ck := pl.checks[k]
				off, n := ck.b*lifeboat.BlockSize, blockLen(ck.b, pl.size)
				// mismatch keeps the lowest offset; blocks after it need not be read.
				mismatch := func(mis *blockMismatch) {
					mu.Lock()
					defer mu.Unlock()
					if first == nil || mis.off < first.off {
						first = mis
						stopAt.Store(k)
					}
				}
				if err := pl.c.Read(ctx, buf[:n], off); unreadable(err) {
					mismatch(&blockMismatch{off: off, want: ck.want, err: err})
					continue
				} else if err != nil {
					mu.Lock()
					if readErr == nil && ctx.Err() == nil {
						readErr = fmt.Errorf("reading offset %d: %w", off, err)
					}
					mu.Unlock()
					cancel()
					return
				}
				ok := false
				var got lifeboat.Hash
				if ck.want.IsZero() {
					ok = lifeboat.AllZero(buf[:n])
					if !ok {
						got = lifeboat.HashBlock(buf[:n])
					}
				} else {
					got = lifeboat.HashBlock(buf[:n])
					ok = got == ck.want
				}
				if !ok {
					mismatch(&blockMismatch{off: off, want: ck.want, got: got})
					continue
				}
				checked.Add(1)
				nbytes.Add(n)
				if progress != nil {
					progressMu.Lock()
					progress(n)
					progressMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first, checked.Load(), nbytes.Load(), nil
	}
	if readErr != nil {
		return nil, checked.Load(), nbytes.Load(), readErr
	}
	if err := ctx.Err(); err != nil {
		return nil, checked.Load(), nbytes.Load(), errors.Join(errors.New("verify interrupted"), err)
	}
	return nil, checked.Load(), nbytes.Load(), nil
}

// markMissing marks, as the store opens, every listed point whose chain
// reads an image that is gone (deleted outside lifeboat, or the images put
// back from a backup older than the catalog), and clears such marks whose
// images are all back: one stat per image, one catalog transaction when a
// mark changes. Before, such points were listed as good until a failover,
// export or next point tried to open the image.
func (s *Store) markMissing() error {
	type change struct {
		vm   string
		id   uint64
		mark *lifeboat.DamageMark
	}
	var changes []change
	exists := map[string]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, vm := range listVMs(tx) {
			pts, err := readPoints(tx, vm)
			if err != nil {
				return err
			}
			// Each point's record is read once, and each disk's chain
			// below a point looked at once: a site's start stays linear
			// in its points.
			recs := map[uint64]pointRecord{}
			for _, r := range pts {
				recs[r.Point.ID] = r
			}
			type key struct {
				disk string
				id   uint64
			}
			memo := map[key]string{}
			// gone is the first image of disk's chain at point id that is
			// gone, "" when none is (readFiles' chain, down to a whole image).
			var gone func(disk string, id uint64) (string, error)
			gone = func(disk string, id uint64) (string, error) {
				if id == 0 {
					return "", nil
				}
				if f, ok := memo[key{disk, id}]; ok {
					return f, nil
				}
				r, ok := recs[id]
				if !ok {
					// A recorded merge's dropped point: hidden, still read.
					var err error
					if r, ok, err = readPoint(tx, vm, id); err != nil || !ok {
						return "", err
					}
					recs[id] = r
				}
				d, ok := r.disk(disk)
				if !ok {
					return "", nil
				}
				there, seen := exists[d.File]
				if !seen {
					_, err := os.Stat(s.abs(d.File))
					there = !errors.Is(err, os.ErrNotExist)
					exists[d.File] = there
				}
				f := ""
				if !there {
					f = d.File
				} else if parent := r.Parents[disk]; !d.Whole && parent < id {
					var err error
					if f, err = gone(disk, parent); err != nil {
						return "", err
					}
				}
				memo[key{disk, id}] = f
				return f, nil
			}
			for _, r := range pts {
				var mark *lifeboat.DamageMark
				for _, d := range r.Point.Disks {
					f, err := gone(d.Name, r.Point.ID)
					if err != nil {
						return err
					}
					if f != "" {
						mark = &lifeboat.DamageMark{Disk: d.Name, Missing: f, At: time.Now().UTC()}
						break
					}
				}
				cur := r.Point.Damaged
				switch {
				case mark != nil && (cur == nil || cur.Missing != mark.Missing):
					s.log.Error("an image of the point's chain is gone: the point is marked damaged", "vm", vm, "point", r.Point.ID, "disk", mark.Disk, "file", s.abs(mark.Missing))
					changes = append(changes, change{vm, r.Point.ID, mark})
				case mark == nil && cur != nil && cur.Missing != "":
					s.log.Warn("the images of the point's chain are all there again: its damage mark is cleared", "vm", vm, "point", r.Point.ID)
					changes = append(changes, change{vm, r.Point.ID, nil})
				}
			}
		}
		return nil
	})
	if err != nil || len(changes) == 0 {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, c := range changes {
			r, ok, err := readPoint(tx, c.vm, c.id)
			if err != nil || !ok {
				return err
			}
			r.Point.Damaged = c.mark
			if err := putPoint(vmBucket(tx, c.vm), r); err != nil {
				return err
			}
		}
		return nil
	})
}

package protect

// Production safety: a cycle may fail, the VM it protects may not. The fleece's
// copy-before-write filter (blockdev-backup sync=none) fails the guest's write
// when it cannot copy, and QEMU 7.2 cannot put an explicit filter with
// on-cbw-error=break-snapshot under a running export (see docs/ARCHITECTURE.md,
// "Production safety"). So a cycle starts only with room in the fleece
// directory, reserves each overlay's share of it before the instant, and the
// fleece breaks itself (the filter leaves the guest's write path) before an
// overlay outgrows that share: the cycle then fails, the generation is merged
// back, and the next cycle sends everything.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Defaults of Safety, used where its fields are zero.
const (
	DefaultFleeceFloor     = 256 << 20
	DefaultFleeceShare     = 0.5
	DefaultFleeceMinBudget = 128 << 20
)

// Safety bounds what a cycle may take from the file system of VM.WorkDir, where
// the fleece overlays grow by every block the guest overwrites while the cycle
// reads.
type Safety struct {
	// FleeceFloor is the free space a cycle never takes (DefaultFleeceFloor):
	// the VM's own images or anything else may share the file system.
	FleeceFloor int64
	// FleeceShare is the part of the free space above the floor set aside for
	// the overlays, split evenly among the VM's disks (DefaultFleeceShare).
	FleeceShare float64
	// FleeceMinBudget is the least budget a disk's overlay may get, or the cycle
	// is refused (DefaultFleeceMinBudget). The fleece breaks at half its budget
	// and the other half absorbs what the guest writes until the filter is gone,
	// so this bounds how fast a guest may write while lifeboat reacts: 64 MiB
	// is 100 ms at 640 MB/s.
	FleeceMinBudget int64
}

// fleeceBudgets checks the fleece directory's free space before the instant and
// gives each disk its overlay's budget: its share of the free space above the
// floor, at most what an overlay of the whole disk could need. Too little for
// any disk refuses the cycle.
func (c *cycle) fleeceBudgets() ([]int64, error) {
	p := c.p
	dir := p.VM.WorkDir
	// An overlay a dead lifeboat left (RemoveStale has removed its node) still
	// holds its reservation: it would count against this cycle.
	for _, d := range c.disks {
		if err := os.Remove(c.fleeceFile(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove the fleece overlay a previous cycle left: %w", err)
		}
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return nil, fmt.Errorf("free space of the fleece directory %s: %w", dir, err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	floor := cmp.Or(p.Safety.FleeceFloor, DefaultFleeceFloor)
	share := cmp.Or(p.Safety.FleeceShare, DefaultFleeceShare)
	minBudget := cmp.Or(p.Safety.FleeceMinBudget, DefaultFleeceMinBudget)
	// Even shares, except that a disk whose whole overlay needs less than its
	// share leaves the rest to the others.
	caps := make([]int64, len(c.disks))
	for i, d := range c.disks {
		// A whole-disk overlay: the data plus about 1/4096 of it in L2 and
		// refcount tables, plus the header.
		caps[i] = d.size + d.size/1024 + (4 << 20)
	}
	budgets := shareOut(max(int64(float64(free-floor)*share), 0), caps)
	short := false
	for i, b := range budgets {
		short = short || b < min(minBudget, caps[i])
	}
	if short {
		need := floor + int64(float64(minBudget*int64(len(c.disks)))/share)
		return nil, fmt.Errorf("not starting a cycle: the fleece directory %s has %s free, less than the %s lifeboat needs before it takes an instant of %d disk(s) (%s it leaves untouched, the rest set aside for copying what the VM overwrites while the cycle reads, so that the copy can never fail the VM's writes): give state_dir more space",
			dir, mib(free), mib(need), len(c.disks), mib(floor))
	}
	return budgets, nil
}

// shareOut splits pool evenly among len(caps) parts, none above its cap; what
// a capped part leaves goes to the others.
func shareOut(pool int64, caps []int64) []int64 {
	out := make([]int64, len(caps))
	left := len(caps)
	for left > 0 {
		each := pool / int64(left)
		capped := false
		for i, c := range caps {
			if out[i] == 0 && c <= each {
				out[i], pool, left, capped = c, pool-c, left-1, true
			}
		}
		if !capped {
			for i := range out {
				if out[i] == 0 {
					out[i] = each
				}
			}
			break
		}
	}
	return out
}

// fleeceFile is where a disk's fleece overlay lives during a cycle.
func (c *cycle) fleeceFile(d *diskState) string {
	return filepath.Join(c.p.VM.WorkDir, c.p.VM.Name+"-"+d.node+"-fleece.qcow2")
}

// watchFleece returns a context that ends, with the fleece's error as cause,
// when the fleece breaks itself; stop releases it.
func (c *cycle) watchFleece(ctx context.Context) (context.Context, func()) {
	for _, f := range c.fleece.Unreserved() {
		c.p.warnOnce("unreserved:"+f, "the fleece directory's file system cannot reserve space (no fallocate): the overlay is watched, but a neighbour filling the file system could still make a copy fail the VM's write; put state_dir on ext4, xfs or tmpfs", "overlay", f)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	stop := make(chan struct{})
	go func() {
		select {
		case <-c.fleece.Broken():
			cancel(c.fleece.Err())
		case <-stop:
		}
	}()
	return ctx, func() { close(stop); cancel(nil) }
}

// fleeceFailure is the cycle's error when the fleece broke itself, saying what
// to do; otherwise err.
func (c *cycle) fleeceFailure(err error) error {
	ferr := c.instantErr()
	if ferr == nil || !(errors.Is(ferr, qemu.ErrFleeceFull) || errors.Is(ferr, ErrScratchFull)) {
		return err
	}
	c.log.Warn("cycle abandoned: the fleece outgrew its budget; the VM's writes went on, no change is lost, the next cycle sends these too", "err", ferr)
	return fmt.Errorf("point %d abandoned to keep the VM's writes from failing: the VM overwrote more during the cycle than the fleece directory %s can hold: %w; no change is lost (the next cycle sends these too); give state_dir more space, or shorten the interval so a cycle reads for less time",
		c.id, c.p.VM.WorkDir, ferr)
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

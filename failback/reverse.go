package failback

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// Reversed is what a production site keeps of a VM it now keeps restore
// points of instead of running (dir/<vm>.reversed.json): protection in
// reverse, the VM owned and run by Owner.
type Reversed struct {
	Owner string    `json:"owner"`
	Point uint64    `json:"point"` // the failback point the disks held: the first point here
	Since time.Time `json:"since"`
	// Seeds are the VM's disk images, moved into the recovery store, by
	// disk: From where the VM had them, To where the store's chain reads them.
	Seeds map[string]Seed `json:"seeds"`
	// Adopted: the store holds the point; until then a Reverse run again
	// finishes the moves and the adoption.
	Adopted bool `json:"adopted"`
}

// Seed is one disk image moved from the VM into the recovery store.
type Seed struct {
	From   string `json:"from"`
	To     string `json:"to"`
	Format string `json:"format"`
}

func (s *Store) reversedPath(vm string) string { return filepath.Join(s.dir, vm+".reversed.json") }

// ReversedOf is vm's reversal at this site, if it was reversed here.
func (s *Store) ReversedOf(vm string) (Reversed, bool, error) {
	var r Reversed
	ok, err := readRecord(s.reversedPath(vm), vm, "reversal record", &r)
	return r, ok, err
}

func (s *Store) saveReversed(vm string, r Reversed) error {
	return writeRecord(s.reversedPath(vm), vm, "reversal record", r)
}

// Reverse makes this production site vm's recovery site, keeping its
// points in rs, with no copy: the VM failed over to owner for good and is
// protected from there back to here. The disks must hold a failback point
// of owner's (a failback cycle committed since the failover: production's
// own writes after the shared point are overwritten and the disks are the
// owner's VM at that point's instant). Their images are moved into rs's
// directory (or, where that is another file system, renamed where they
// are), out of the production VM's reach (started again, it would write
// into the base of every later point: its start now fails instead),
// and become that point, the first of the VM here (recovery.Store.Adopt);
// the owner's next cycle continues it from the generation that point
// started on the owner's disks, so it sends only what changed since.
//
// Every step may be repeated: a Reverse cut off anywhere finishes when run
// again, and one that finished returns the adopted point.
func (s *Store) Reverse(ctx context.Context, vm, owner string, rs *recovery.Store) (lifeboat.Point, error) {
	r, inProgress, err := s.ReversedOf(vm)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if inProgress && r.Adopted { // finished before
		if r.Owner != owner {
			return lifeboat.Point{}, fmt.Errorf("%w: vm %q is protected in reverse by site %q, not %q", recovery.ErrNotOwner, vm, r.Owner, owner)
		}
		return rs.Point(vm, r.Point)
	}
	var rec record
	v, err := s.vm(vm)
	switch {
	case err == nil:
		s.mu.Lock()
		rec = v.rec
		s.mu.Unlock()
	case inProgress:
		// A reversal cut off after the disks were closed: the record says
		// what they hold.
		if ok, err := readRecord(s.path(vm), vm, "failback record", &rec); err != nil || !ok {
			return lifeboat.Point{}, errors.Join(err, fmt.Errorf("vm %q: a reversal is under way, but its failback record %s is gone", vm, s.path(vm)))
		}
	default:
		return lifeboat.Point{}, fmt.Errorf("%w: run `lifeboat failback %s` at site %q first: the reversal takes the disks from a failback", err, vm, owner)
	}
	if rec.Owner != owner {
		return lifeboat.Point{}, fmt.Errorf("%w: vm %q fails back to this site from site %q; site %q may not reverse it", recovery.ErrNotOwner, vm, rec.Owner, owner)
	}
	if !rec.OwnSent {
		return lifeboat.Point{}, fmt.Errorf("vm %q: the disks here still hold production's own writes after point %d: run one failback cycle (`lifeboat failback %s` at site %q) before reversing", vm, rec.Holds.ID, vm, owner)
	}
	holds := rec.Holds
	// The store must take the VM before anything moves: a store that keeps
	// another VM of that name (this site is a recovery site of another's)
	// would refuse the adoption once the disks were out of the VM's reach.
	if pt, found, err := rs.Latest(vm); err != nil {
		return lifeboat.Point{}, err
	} else if found && pt.ID != holds.ID {
		return lifeboat.Point{}, fmt.Errorf("vm %q: this site keeps restore points of a VM of that name already (point %d, from site %q): it cannot keep this one's too; nothing was moved", vm, pt.ID, pt.Site)
	}
	if v != nil {
		// The disks become the point they hold: written since its commit
		// (a VM started here while lifeboat let go of them), they are not
		// that point, and the owner's cycles, incremental from it, would
		// never send those blocks again.
		for _, d := range holds.Disks {
			if why := v.prod.untouchedWhy(ctx, d.Name, rec.Since[d.Name]); why != "" {
				return lifeboat.Point{}, fmt.Errorf("vm %q disk %q "+notHeldPhrase+" %d any more (%s): run one failback cycle (`lifeboat failback %s` at site %q) before reversing; nothing was moved", vm, d.Name, holds.ID, why, vm, owner)
			}
		}
	}
	if !inProgress || r.Point != holds.ID {
		if v == nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q: the reversal record names point %d, the disks hold %d: remove %s and run the failback and the reversal again", vm, r.Point, holds.ID, s.reversedPath(vm))
		}
		r = Reversed{Owner: owner, Point: holds.ID, Since: time.Now().UTC(), Seeds: map[string]Seed{}}
		for _, d := range holds.Disks {
			dk, ok := v.prod.disks[d.Name]
			if !ok {
				return lifeboat.Point{}, fmt.Errorf("vm %q: point %d has disk %q, which production does not", vm, holds.ID, d.Name)
			}
			r.Seeds[d.Name] = Seed{From: dk.File, To: seedPath(rs.Dir(), vm, d.Name, holds.ID, dk), Format: dk.Format}
		}
		if err := s.saveReversed(vm, r); err != nil { // before any image moves
			return lifeboat.Point{}, err
		}
	}
	if v != nil {
		// The disks' daemon lets go of the images before they move; they
		// take no more failback points.
		s.mu.Lock()
		delete(s.vms, vm)
		s.mu.Unlock()
		if err := v.prod.Close(ctx); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q: closing the disks: %w", vm, err)
		}
	}
	spec := recovery.BeginSpec{VM: vm, ID: holds.ID, Instant: holds.Instant, Consistency: holds.Consistency, Group: holds.Group,
		Freeze: holds.Freeze, Note: holds.Note, Site: owner, Definition: holds.Definition}
	for _, d := range holds.Disks {
		sd := r.Seeds[d.Name]
		if err := moveSeed(ctx, sd); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q disk %q: %w", vm, d.Name, err)
		}
		spec.Disks = append(spec.Disks, recovery.DiskSpec{Name: d.Name, Size: d.Size, Resync: true,
			Lineage: d.Lineage, Generation: d.Generation, Seed: sd.To})
	}
	if testHookReverseMoved != nil {
		if err := testHookReverseMoved(); err != nil {
			return lifeboat.Point{}, err
		}
	}
	pt, found, err := rs.Latest(vm)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if !found || pt.ID != holds.ID {
		if pt, err = rs.Adopt(ctx, spec); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q: adopting its disks as point %d: %w", vm, holds.ID, err)
		}
	}
	r.Adopted = true
	if err := s.saveReversed(vm, r); err != nil {
		return lifeboat.Point{}, err
	}
	if err := os.Remove(s.path(vm)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return lifeboat.Point{}, err
	}
	s.log.Info("vm reversed: this site keeps its restore points now, from its disks", "vm", vm, "owner", owner, "point", pt.ID)
	return pt, nil
}

// seedPath is where a disk image goes when it becomes the base of the VM's
// points: into the store, or, when the store is on another file system
// (where a rename cannot take it, and a copy is what the reversal avoids),
// beside where it was, under a name the VM's definition does not use.
func seedPath(store, vm, disk string, id uint64, dk *disk) string {
	in := filepath.Join(store, "vms", vm, disk, fmt.Sprintf("seed-%016d.%s", id, dk.Format))
	if sameFS(filepath.Dir(dk.File), store) {
		return in
	}
	return fmt.Sprintf("%s.lifeboat-%s-point-%d", dk.File, vm, id)
}

// sameFS reports whether two existing paths are on one file system.
func sameFS(a, b string) bool {
	var sa, sb syscall.Stat_t
	if syscall.Stat(a, &sa) != nil || syscall.Stat(b, &sb) != nil {
		return true // the rename says what is wrong
	}
	return sa.Dev == sb.Dev
}

// testHookReverseMoved, when set (by a test), is called once the images have
// moved, before the store adopts them: an error stands for the site dying there.
var testHookReverseMoved func() error

// moveSeed moves a disk image where the VM's old definition no longer
// finds it (seedPath), and makes it read-only. A backing file the image
// names relative to its directory is named by its absolute path first, so
// that the image still finds it once moved. A move cut off before is
// finished.
func moveSeed(ctx context.Context, sd Seed) error {
	if _, err := os.Stat(sd.To); err == nil {
		if _, err := os.Stat(sd.From); err == nil {
			return fmt.Errorf("both %s and %s exist: which holds the disk is unclear; remove the one that does not", sd.From, sd.To)
		}
	} else {
		info, err := qemu.ReadImageInfo(ctx, sd.From)
		if err != nil {
			return err
		}
		if b := info.BackingFile; b != "" && !filepath.IsAbs(b) && !strings.Contains(b, ":") {
			if err := qemu.RebaseUnsafe(ctx, sd.From, filepath.Join(filepath.Dir(sd.From), b), info.BackingFormat); err != nil {
				return fmt.Errorf("naming the backing file of %s by its absolute path before the move: %w", sd.From, err)
			}
		}
		if err := os.MkdirAll(filepath.Dir(sd.To), 0o750); err != nil {
			return err
		}
		if err := os.Rename(sd.From, sd.To); err != nil {
			return fmt.Errorf("moving the image out of the VM's reach: %w", err)
		}
	}
	return os.Chmod(sd.To, 0o400)
}

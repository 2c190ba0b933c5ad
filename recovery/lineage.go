package recovery

import (
	"errors"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// ErrLineage is wrapped by the error of a Begin whose delta does not continue
// the history the recovery site holds: the sender must resynchronise.
var ErrLineage = errors.New("the delta does not continue this recovery site's history of the disk")

// checkLineage checks that every disk of spec continues what latest (nil: the
// VM has no point yet) holds: the same lineage, a delta computed from latest
// itself, and dirty blocks read from the very generation latest started. A
// disk new to the VM must be sent whole. This is what keeps a delta from being
// applied onto a point it was not computed from.
func checkLineage(spec BeginSpec, latest *pointRecord) error {
	var latestID uint64
	if latest != nil {
		latestID = latest.Point.ID
	}
	for _, d := range spec.Disks {
		fail := func(format string, args ...any) error {
			return fmt.Errorf("vm %q disk %q point %d: %s: %w", spec.VM, d.Name, spec.ID, fmt.Sprintf(format, args...), ErrLineage)
		}
		if d.Lineage == "" {
			return fail("no lineage given (a protected site older than this recovery site?): upgrade it")
		}
		var (
			ld  lifeboat.PointDisk
			has bool
		)
		if latest != nil {
			ld, has = latest.disk(d.Name)
		}
		if !has {
			if d.Base != 0 || !d.Resync {
				return fail("the disk is new to this recovery site, but the delta was computed from point %d: it must be sent whole", d.Base)
			}
			continue
		}
		if ld.Lineage != "" && ld.Lineage != d.Lineage {
			return fail("lineage %s is not the disk's lineage here (%s): the sender mistook another disk's history for this one's", d.Lineage, ld.Lineage)
		}
		if d.Base != latestID {
			return fail("the delta was computed from point %d, but the latest point here is %d: the sender will resync", d.Base, latestID)
		}
		if d.Resync {
			continue
		}
		if ld.Generation == "" {
			return fail("the latest point %d records no bitmap generation, so no delta can be proven to start at it: resync the disk", latestID)
		}
		if d.BaseGeneration != ld.Generation {
			return fail("the dirty blocks come from generation %q, but point %d started generation %q: resync the disk", d.BaseGeneration, latestID, ld.Generation)
		}
	}
	return nil
}

// SetGenerations records, by disk name, the bitmap generation that starts at
// point id of vm on the disks its owner will replicate from: a failback's
// finalize, whose production site started them on its disks when they
// took the point's content. The point's owner-to-be may then continue the
// chain incrementally from it. A disk not of the point is an error.
func (s *Store) SetGenerations(vm string, id uint64, gens map[string]string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		r, err := pointAt(tx, vm, id)
		if err != nil {
			return err
		}
		for name, gen := range gens {
			i := slices.IndexFunc(r.Point.Disks, func(d lifeboat.PointDisk) bool { return d.Name == name })
			if i < 0 {
				return fmt.Errorf("vm %q point %d has no disk %q", vm, id, name)
			}
			if gen == "" {
				return fmt.Errorf("vm %q point %d disk %q: an empty generation", vm, id, name)
			}
			r.Point.Disks[i].Generation = gen
		}
		return putPoint(vmBucket(tx, vm), r)
	})
}

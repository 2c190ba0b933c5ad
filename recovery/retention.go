package recovery

import (
	"context"
	"errors"
	"fmt"
	"maps"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Merge steps, named for the test hook that stops a merge after one of them.
const (
	stepRecorded  = "recorded"  // the intent is in the catalog, no image touched
	stepCommitted = "committed" // Keep's data is in Drop's image
	stepResized   = "resized"   // Drop's image has Keep's size
	stepRebased   = "rebased"   // the images above Keep point at Drop's image
	stepCataloged = "cataloged" // the catalog no longer has Drop
)

// ApplyRetention merges the VM's oldest points while more than Keep exist. Each
// merge commits point k+1's image into point k's (the chain reads the same at
// every moment), rebases k+2's image onto k's (metadata only), then in one
// catalog transaction drops k and makes k's image k+1's, with the folded block
// record; only then is k+1's old image deleted. The merge is recorded before it
// starts, and a crash at any step is finished by Open.
func (s *Store) ApplyRetention(ctx context.Context, vm string) error {
	unlock, err := s.lockChain(ctx, vm, true)
	if err != nil {
		return err
	}
	defer unlock()
	if err := s.finishMerge(ctx, vm); err != nil {
		return err
	}
	for {
		var intent *mergeIntent
		err := s.db.Update(func(tx *bolt.Tx) error {
			pts, err := readPoints(tx, vm)
			if err != nil || len(pts) <= s.keep {
				return err
			}
			intent, err = planMerge(vm, pts)
			if err != nil {
				return err
			}
			b, err := vmBucketCreate(tx, vm)
			if err != nil {
				return err
			}
			return putIntent(b, intent)
		})
		if err != nil {
			return fmt.Errorf("vm %q: recording a retention merge: %w", vm, err)
		}
		if intent == nil {
			return nil
		}
		s.log.Info("retention: merging the oldest point into the next", "vm", vm, "drop", intent.Drop, "into", intent.Keep)
		if err := s.runMerge(ctx, vm, intent); err != nil {
			return fmt.Errorf("vm %q: merging point %d into %d (it is finished on the next attempt or restart): %w", vm, intent.Drop, intent.Keep, err)
		}
	}
}

// planMerge plans merging pts[0] into pts[1].
func planMerge(vm string, pts []pointRecord) (*mergeIntent, error) {
	drop, keep := pts[0], pts[1]
	var next *pointRecord
	if len(pts) > 2 {
		next = &pts[2]
	}
	m := &mergeIntent{Drop: drop.Point.ID, Keep: keep.Point.ID}
	merged := map[string]bool{}
	for _, kd := range keep.Point.Disks {
		if keep.Parents[kd.Name] != drop.Point.ID {
			continue // a disk new in keep: its base stays as it is
		}
		dd, ok := drop.disk(kd.Name)
		if !ok {
			return nil, fmt.Errorf("point %d disk %q names point %d as parent, which lacks it: %w", keep.Point.ID, kd.Name, drop.Point.ID, errCatalog)
		}
		md := mergeDisk{Name: kd.Name, Into: dd.File, From: kd.File}
		if next != nil && next.Parents[kd.Name] == keep.Point.ID {
			nd, _ := next.disk(kd.Name)
			md.Above = append(md.Above, nd.File)
		}
		m.Disks = append(m.Disks, md)
		m.Remove = append(m.Remove, kd.File)
		merged[kd.Name] = true
	}
	for _, dd := range drop.Point.Disks {
		if drop.Parents[dd.Name] != 0 {
			return nil, fmt.Errorf("vm %q: oldest point %d disk %q has a parent: %w", vm, drop.Point.ID, dd.Name, errCatalog)
		}
		if !merged[dd.Name] {
			m.Remove = append(m.Remove, dd.File) // a disk the VM no longer has
		}
	}
	return m, nil
}

// finishMerge completes a merge recorded for vm, if any.
func (s *Store) finishMerge(ctx context.Context, vm string) error {
	var intent *mergeIntent
	if err := s.db.View(func(tx *bolt.Tx) (err error) { intent, err = readIntent(tx, vm); return err }); err != nil || intent == nil {
		return err
	}
	s.log.Warn("finishing an interrupted retention merge", "vm", vm, "drop", intent.Drop, "into", intent.Keep, "cataloged", intent.Done)
	return s.runMerge(ctx, vm, intent)
}

// runMerge performs (or repeats: every step is idempotent) a recorded merge.
func (s *Store) runMerge(ctx context.Context, vm string, m *mergeIntent) error {
	if !m.Done {
		if err := s.mergeHook(stepRecorded); err != nil {
			return err
		}
		for _, d := range m.Disks {
			// Committing again after a crash copies the same clusters again.
			if err := qemu.Commit(ctx, s.abs(d.From)); err != nil {
				return fmt.Errorf("disk %q: committing %s into %s: %w", d.Name, d.From, d.Into, err)
			}
		}
		if err := s.mergeHook(stepCommitted); err != nil {
			return err
		}
		if err := s.resizeMerged(ctx, vm, m); err != nil {
			return err
		}
		if err := s.mergeHook(stepResized); err != nil {
			return err
		}
		for _, d := range m.Disks {
			for _, above := range d.Above {
				if err := qemu.RebaseUnsafe(ctx, s.abs(above), s.abs(d.Into), "qcow2"); err != nil {
					return fmt.Errorf("disk %q: rebasing %s onto %s: %w", d.Name, above, d.Into, err)
				}
			}
		}
		if err := s.mergeHook(stepRebased); err != nil {
			return err
		}
		if err := s.db.Update(func(tx *bolt.Tx) error { return catalogMerge(tx, vm, m) }); err != nil {
			return fmt.Errorf("catalog update: %w", err)
		}
		if err := s.mergeHook(stepCataloged); err != nil {
			return err
		}
	}
	if err := s.removeFiles(m.Remove); err != nil {
		return fmt.Errorf("deleting merged images: %w", err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := sub(vmBucket(tx, vm), bucketMerge)
		if b == nil {
			return nil
		}
		return b.Delete(keyIntent)
	})
}

// catalogMerge drops m.Drop and gives m.Keep the merged images and the folded
// block records, in the caller's transaction.
func catalogMerge(tx *bolt.Tx, vm string, m *mergeIntent) error {
	b := vmBucket(tx, vm)
	keep, ok, err := readPoint(tx, vm, m.Keep)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("point %d to merge into is gone: %w", m.Keep, errCatalog)
	}
	drop, ok, err := readPoint(tx, vm, m.Drop)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("point %d to merge is gone: %w", m.Drop, errCatalog)
	}
	blocks := b.Bucket(bucketBlocks)
	parents := maps.Clone(keep.Parents)
	for _, d := range m.Disks {
		fold, err := foldBlocks(tx, vm, d.Name, m.Keep)
		if err != nil {
			return err
		}
		if err := blocks.Put(blocksKey(m.Keep, d.Name), encodeBlockRecord(fold)); err != nil {
			return err
		}
		for i := range keep.Point.Disks {
			if keep.Point.Disks[i].Name == d.Name {
				keep.Point.Disks[i].File = d.Into
			}
		}
		parents[d.Name] = 0
	}
	keep.Parents = parents
	if err := putPoint(b, keep); err != nil {
		return err
	}
	for _, d := range drop.Point.Disks {
		if err := blocks.Delete(blocksKey(m.Drop, d.Name)); err != nil {
			return err
		}
	}
	if err := b.Bucket(bucketPoints).Delete(idKey(m.Drop)); err != nil {
		return err
	}
	m.Done = true
	return putIntent(b, m)
}

// resizeMerged gives each image that received a commit the size of the point
// that now owns it: a commit grows its base to the top's size, but never
// shrinks it, so a disk that shrank needs a block_resize of its own.
func (s *Store) resizeMerged(ctx context.Context, vm string, m *mergeIntent) error {
	var keep pointRecord
	if err := s.db.View(func(tx *bolt.Tx) (err error) {
		var ok bool
		keep, ok, err = readPoint(tx, vm, m.Keep)
		if err == nil && !ok {
			err = fmt.Errorf("point %d to merge into is gone: %w", m.Keep, errCatalog)
		}
		return err
	}); err != nil {
		return err
	}
	for _, d := range m.Disks {
		kd, _ := keep.disk(d.Name)
		info, err := qemu.ReadImageInfo(ctx, s.abs(d.Into))
		if err != nil {
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		if info.VirtualSize == kd.Size {
			continue
		}
		if err := s.resizeImage(ctx, vm, s.abs(d.Into), kd.Size); err != nil {
			return fmt.Errorf("disk %q: resizing %s from %d to %d bytes: %w", d.Name, d.Into, info.VirtualSize, kd.Size, err)
		}
	}
	return nil
}

// mergeHook lets a test stop a merge after a step, as a crash would (the real
// parts cannot be made to crash at an exact step).
func (s *Store) mergeHook(step string) error {
	if s.testMergeHook == nil {
		return nil
	}
	return s.testMergeHook(step)
}

// errMergeStopped is what test hooks return to stop a merge.
var errMergeStopped = errors.New("merge stopped by test hook")

package recovery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
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
// starts, and a crash at any step is finished by Open. A merge that fails stays
// recorded and is finished first by the next retention, once no pin holds the
// VM; until then RetentionFailure says why.
func (s *Store) ApplyRetention(ctx context.Context, vm string) error {
	err := s.applyRetention(ctx, vm)
	if err != nil && ctx.Err() == nil {
		s.setRetentionFailure(vm, err)
	}
	return err
}

func (s *Store) applyRetention(ctx context.Context, vm string) error {
	unlock, err := s.lockChain(ctx, vm, true)
	if err != nil {
		return err
	}
	defer unlock()
	// The pins first: a merge recorded before rewrites the chain as much as
	// a new one.
	pins, err := s.Pins(vm)
	if err != nil {
		return err
	}
	if len(pins) > 0 {
		// A VM started from a point reads the chain: no merge until it ends.
		recorded, err := s.recordedMerge(vm)
		if err != nil {
			return err
		}
		if n, _ := s.pointCount(vm); n > s.keep || recorded != nil {
			log := s.log.With("vm", vm, "points", n, "keep", s.keep, "pins", len(pins))
			if recorded != nil {
				log = log.With("recorded_merge_drop", recorded.Drop, "recorded_merge_into", recorded.Keep)
			}
			log.Info("retention waits: a VM started from a point reads the chain")
		}
		return nil
	}
	if err := s.dropBelowWhole(ctx, vm); err != nil {
		return err
	}
	if err := s.finishMerge(ctx, vm); err != nil {
		return err
	}
	for {
		var (
			intent *mergeIntent
			latest uint64
			held   string
			over   string // a hold given up: the VM holds twice keep points
		)
		err := s.db.Update(func(tx *bolt.Tx) error {
			pts, err := readPoints(tx, vm)
			if err != nil || len(pts) <= s.keep {
				return err
			}
			if held, err = heldForGroup(tx, vm, pts); err != nil {
				return err
			}
			// The hold is bounded: a member refused for good must not fill
			// the store with the others' points.
			if held != "" && len(pts) > 2*s.keep {
				over, held = held, ""
			}
			if held != "" {
				return nil
			}
			latest = pts[len(pts)-1].Point.ID
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
		s.setRetentionHeld(vm, held)
		if intent == nil {
			if held != "" {
				s.log.Warn("retention waits: "+held, "vm", vm, "keep", s.keep)
			}
			s.clearRetentionFailure(vm)
			return nil
		}
		if over != "" {
			s.log.Warn("retention merges away a consistency group's last common instant: the VM holds twice keep points since, and waiting longer would fill the store; a plan of the group then needs --apart, each VM from its own point", "vm", vm, "keep", s.keep, "was", over)
		}
		s.log.Info("retention: merging the oldest point into the next", "vm", vm, "drop", intent.Drop, "into", intent.Keep)
		var took mergeTimes
		if err := s.runMerge(ctx, vm, intent, intent.Keep == latest, &took); err != nil {
			return s.full(fmt.Errorf("vm %q: merging point %d into %d (it is finished on the next attempt or restart): %w", vm, intent.Drop, intent.Keep, err))
		}
		s.log.Info("retention: merged", "vm", vm, "drop", intent.Drop, "into", intent.Keep, "took", took.total.Round(time.Millisecond),
			"commit", took.commit.Round(time.Millisecond), "check", took.check.Round(time.Millisecond), "waited", took.waited.Round(time.Millisecond))
	}
}

// heldForGroup says why vm's oldest point must stay, "" when it may be
// merged away: it is the newest instant of its consistency group that vm
// shares with another VM here, and vm holds later points of the group (a
// group cycle that committed some members only left them apart). A plan
// starts the group from an instant all its VMs hold: dropping this one would
// leave them none. A VM with no later point of the group (taken out of it)
// is no longer held.
func heldForGroup(tx *bolt.Tx, vm string, pts []pointRecord) (string, error) {
	tag := pts[0].Point.Group
	if tag == "" {
		return "", nil
	}
	g := lifeboat.GroupName(tag)
	later := map[string]bool{}
	for _, r := range pts[1:] {
		if lifeboat.GroupName(r.Point.Group) == g {
			later[r.Point.Group] = true
		}
	}
	if len(later) == 0 {
		return "", nil
	}
	for _, other := range listVMs(tx) {
		if other == vm {
			continue
		}
		ops, err := readPoints(tx, other)
		if err != nil {
			return "", err
		}
		holds, shares := false, false
		for _, r := range ops {
			holds = holds || r.Point.Group == tag
			shares = shares || later[r.Point.Group]
		}
		if holds && !shares {
			return fmt.Sprintf("point %d is consistency group %q's last instant (%s) that vm %q holds too; it stays until a later group point of both is committed (`lifeboat sync %s` at the protected site), or vm %q's points are gone (`lifeboat forget %s`)",
				pts[0].Point.ID, g, tag, other, g, other, other), nil
		}
	}
	return "", nil
}

// retainLater applies the VMs' retention in the background, one VM after
// another: a commit answers without waiting for a merge, and the next point
// is written beside it (see vmLock); Open's catch-up of every VM past keep
// starts one merge at a time, not hundreds of QEMU processes at once. A
// failure is logged and retried after the next point.
func (s *Store) retainLater(vms ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		for _, vm := range vms {
			if err := s.ApplyRetention(s.bgCtx, vm); err != nil && s.bgCtx.Err() == nil {
				s.log.Error("retention failed; it runs again after the next point", "vm", vm, "err", err)
			}
		}
	}()
}

// SettleRetention waits until the retention started by the commits so far
// has run; no commit may be in progress meanwhile (tests, tools).
func (s *Store) SettleRetention() { s.bg.Wait() }

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

// recordedMerge is the merge recorded for vm and not finished, if any.
func (s *Store) recordedMerge(vm string) (intent *mergeIntent, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		intent, err = readIntent(tx, vm)
		return err
	})
	return intent, err
}

// finishMerge completes a merge recorded for vm, if any. Its error names the
// VM and the merge, and says what to do when the store is full.
func (s *Store) finishMerge(ctx context.Context, vm string) error {
	var (
		intent *mergeIntent
		latest uint64
	)
	if err := s.db.View(func(tx *bolt.Tx) (err error) {
		if intent, err = readIntent(tx, vm); err != nil || intent == nil {
			return err
		}
		pts, err := readPoints(tx, vm)
		if len(pts) > 0 {
			latest = pts[len(pts)-1].Point.ID
		}
		return err
	}); err != nil || intent == nil {
		return err
	}
	s.log.Warn("finishing a retention merge recorded before", "vm", vm, "drop", intent.Drop, "into", intent.Keep, "cataloged", intent.Done)
	if err := s.runMerge(ctx, vm, intent, intent.Keep == latest, &mergeTimes{}); err != nil {
		return s.full(fmt.Errorf("vm %q: finishing the merge of point %d into %d recorded before (point %d stays hidden, the others read as they should; retention retries it after the next point): %w",
			vm, intent.Drop, intent.Keep, intent.Drop, err))
	}
	return nil
}

// RetentionFailure is why the VM's retention last failed, and when; a merge
// that fails stays recorded and the VM keeps its points until retention runs
// through again.
type RetentionFailure struct {
	Err string
	At  time.Time
}

// RetentionFailure says why vm's retention failed, while it has not run
// through since (false: it has, or it never failed).
func (s *Store) RetentionFailure(vm string) (RetentionFailure, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.retentionFailures[vm]
	return f, ok
}

func (s *Store) setRetentionFailure(vm string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.retentionFailures[vm] = RetentionFailure{Err: err.Error(), At: time.Now().UTC()}
}

func (s *Store) clearRetentionFailure(vm string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.retentionFailures, vm)
}

// RetentionHeld says why vm's retention keeps its oldest point past keep
// for its consistency group (heldForGroup), while it does: up to twice keep
// points, for good if the VM sends no more, and the count alone would not
// say why.
func (s *Store) RetentionHeld(vm string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	why, ok := s.retentionHeld[vm]
	return why, ok
}

func (s *Store) setRetentionHeld(vm, why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if why == "" {
		delete(s.retentionHeld, vm)
	} else {
		s.retentionHeld[vm] = why
	}
}

// mergeTimes is where a merge's time went, for its log line.
type mergeTimes struct{ total, commit, check, waited time.Duration }

// runMerge performs (or repeats: every step is idempotent) a recorded merge.
// The caller holds the chain alone. A writer may be writing the next point
// meanwhile, except when m.Keep is the latest point (keepLatest): a writer's
// own image names that point's image as its backing, which the merge
// deletes, so the merge then holds the writer slot throughout. The shape is
// held while headers, the catalog and the files a writer opens change.
func (s *Store) runMerge(ctx context.Context, vm string, m *mergeIntent, keepLatest bool, took *mergeTimes) error {
	start := time.Now()
	defer func() { took.total = time.Since(start) }()
	l := s.vmLock(vm)
	shape := func() (func(), error) {
		t := time.Now()
		defer func() { took.waited += time.Since(t) }()
		return l.lockShape(ctx, vm)
	}
	if keepLatest {
		t := time.Now()
		if err := l.lockWriter(ctx, vm); err != nil {
			return err
		}
		took.waited += time.Since(t)
		defer l.unlockWriter()
	}
	if !m.Done {
		if err := s.refreshAbove(vm, m); err != nil {
			return err
		}
		if err := s.mergeHook(stepRecorded); err != nil {
			return err
		}
		// An image cut short outside lifeboat reads zeros past the cut; a
		// commit into it writes clusters past its end, after which the cut
		// is no longer seen (by Begin, a failover, an export), though the
		// lost clusters still read as zeros.
		for _, d := range m.Disks {
			for _, f := range []string{d.Into, d.From} {
				if err := qemu.CheckQcow2End(s.abs(f)); errors.Is(err, qemu.ErrTruncated) {
					return fmt.Errorf("disk %q: %w; the merge would hide it, so it waits: `lifeboat sync %s --whole` at its protected site writes a point holding the whole disk, and retention drops the points below it once %d stand from it on", d.Name, err, vm, s.keep)
				} else if err != nil {
					return fmt.Errorf("disk %q: checking %s before the merge: %w", d.Name, f, err)
				}
			}
		}
		commitStart := time.Now()
		for _, d := range m.Disks {
			// Committing again after a crash copies the same clusters again.
			if err := s.commitImage(ctx, vm, d); err != nil {
				return err
			}
		}
		took.commit = time.Since(commitStart)
		if err := s.mergeHook(stepCommitted); err != nil {
			return err
		}
		// Headers change: Drop's image's size, and the backing named by the
		// image above Keep's. A writer being set up reads them.
		unlock, err := shape()
		if err != nil {
			return err
		}
		err = s.rewriteHeaders(ctx, vm, m)
		unlock()
		if err != nil {
			return err
		}
		if err := s.mergeHook(stepRebased); err != nil {
			return err
		}
		checkStart := time.Now()
		learned, err := s.checkMerged(ctx, vm, m)
		if err != nil {
			return err
		}
		took.check = time.Since(checkStart)
		// The catalog's chain changes: a writer being set up reads it and
		// then opens the files it names, Keep's old image among them.
		if unlock, err = shape(); err != nil {
			return err
		}
		defer unlock()
		if err := s.db.Update(func(tx *bolt.Tx) error { return catalogMerge(tx, vm, m, learned) }); err != nil {
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

// refreshAbove names, for each disk, the images of the points whose parent
// is Keep now, and records it: a point committed since the merge was planned
// (its writer began when Keep was the latest) names Keep's image as its
// backing, and must be rebased before that image is deleted.
func (s *Store) refreshAbove(vm string, m *mergeIntent) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err != nil {
			return err
		}
		for i := range m.Disks {
			d := &m.Disks[i]
			d.Above = nil
			for _, p := range pts {
				if p.Parents[d.Name] != m.Keep {
					continue
				}
				if pd, ok := p.disk(d.Name); ok {
					d.Above = append(d.Above, pd.File)
				}
			}
		}
		b, err := vmBucketCreate(tx, vm)
		if err != nil {
			return err
		}
		return putIntent(b, m)
	})
	if err != nil {
		return fmt.Errorf("recording the images above point %d: %w", m.Keep, err)
	}
	return nil
}

// rewriteHeaders gives Drop's images Keep's sizes and rebases the images
// above Keep's onto them (metadata only: the chain reads the same).
func (s *Store) rewriteHeaders(ctx context.Context, vm string, m *mergeIntent) error {
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
	return nil
}

// commitImage commits a merge's newer image of one disk into the older,
// with O_DIRECT where the store takes it. An image may live on another file
// system than the store (a reversal's seed renamed in place): if the direct
// commit fails, it is tried once more through the page cache.
func (s *Store) commitImage(ctx context.Context, vm string, d mergeDisk) error {
	err := qemu.Commit(ctx, s.abs(d.From), s.direct)
	if err != nil && s.direct && ctx.Err() == nil {
		s.log.Warn("retention: committing with O_DIRECT failed; trying through the page cache", "vm", vm, "disk", d.Name, "image", d.From, "err", err)
		err = qemu.Commit(ctx, s.abs(d.From), false)
	}
	if err != nil {
		return fmt.Errorf("disk %q: committing %s into %s: %w", d.Name, d.From, d.Into, err)
	}
	return nil
}

// catalogMerge drops m.Drop and gives m.Keep the merged images and the folded
// block records, in the caller's transaction.
func catalogMerge(tx *bolt.Tx, vm string, m *mergeIntent, learned map[string]blockCheck) error {
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
	recs := b.Bucket(bucketRecs)
	parents := maps.Clone(keep.Parents)
	records := maps.Clone(keep.Records)
	if records == nil {
		records = map[string]uint64{}
	}
	for _, d := range m.Disks {
		var ck *blockCheck
		if l, ok := learned[d.Name]; ok && l.b >= 0 {
			ck = &l
		}
		if err := mergeRecord(recs, &drop, &keep, d.Name, ck); err != nil {
			return fmt.Errorf("disk %q: merging the block record of point %d into point %d's: %w", d.Name, m.Keep, m.Drop, err)
		}
		for i := range keep.Point.Disks {
			if keep.Point.Disks[i].Name == d.Name {
				keep.Point.Disks[i].File = d.Into
			}
		}
		parents[d.Name] = 0
		records[d.Name] = recordID(&drop, d.Name)
	}
	keep.Records = records
	keep.Parents = parents
	if err := putPoint(b, keep); err != nil {
		return err
	}
	for _, d := range drop.Point.Disks {
		if keep.Records[d.Name] == recordID(&drop, d.Name) {
			continue // now Keep's
		}
		if err := recs.DeleteBucket(drop.recordKey(d.Name)); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
			return err
		}
	}
	if err := b.Bucket(bucketPoints).Delete(idKey(m.Drop)); err != nil {
		return err
	}
	m.Done = true
	return putIntent(b, m)
}

// mergeSample is how many blocks of the merged base that the merge did not
// touch are read back after it, besides every block it touched.
const mergeSample = 64

// checkMerged reads back the merged base images before the catalog names
// them: every data block of Keep's own record (what the commit copied) must
// hash as recorded, every block of Keep's zero runs that the image has
// allocated must read as zeros, and a sample of mergeSample of Drop's data
// blocks still in the fold must hash as recorded. The cost is the merged
// point's blocks plus the sample, not the disk: a whole-image check is what
// `lifeboat verify` is for. A mismatch leaves the merge recorded (the chain
// still reads right through Keep's own image, not yet deleted), so it is
// retried, and the error says what to do.
//
// It also returns, per disk whose size changed between the two points, the
// short block that the change left unknown and that Keep did not write, as
// the merged image reads it (b -1 when there is none).
func (s *Store) checkMerged(ctx context.Context, vm string, m *mergeIntent) (map[string]blockCheck, error) {
	learned := map[string]blockCheck{}
	if len(m.Disks) == 0 {
		return learned, nil
	}
	var keep, drop pointRecord
	if err := s.db.View(func(tx *bolt.Tx) (err error) {
		var ok, ok2 bool
		keep, ok, err = readPoint(tx, vm, m.Keep)
		if err == nil {
			drop, ok2, err = readPoint(tx, vm, m.Drop)
		}
		if err == nil && (!ok || !ok2) {
			err = fmt.Errorf("point %d or %d of the merge is gone: %w", m.Drop, m.Keep, errCatalog)
		}
		return err
	}); err != nil {
		return nil, err
	}
	names := make([]string, len(m.Disks))
	files := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i], files[i] = d.Name, s.abs(d.Into)
	}
	run, err := s.runDir()
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(run)
	daemon, err := s.startDaemon(ctx, run, names, files, nil, false)
	if err != nil {
		return nil, fmt.Errorf("opening the merged images to check them: %w", err)
	}
	defer daemon.Kill() // read-only
	for _, d := range m.Disks {
		kd, _ := keep.disk(d.Name)
		dd, _ := drop.disk(d.Name)
		c, err := dialExport(ctx, daemon, d.Name, kd.Size)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		pl, err := s.planMergeCheck(ctx, vm, m, d.Name, c, kd.Size)
		if err != nil {
			return nil, fmt.Errorf("disk %q: planning the check of the merged image: %w", d.Name, err)
		}
		mis, _, _, err := checkBlocks(ctx, pl, nil)
		if err != nil {
			return nil, fmt.Errorf("disk %q: reading back the merged image %s: %w", d.Name, d.Into, err)
		}
		if mis != nil {
			got := mis.got.String()
			if mis.err != nil {
				got = fmt.Sprintf("nothing (%v)", mis.err)
			}
			return nil, fmt.Errorf("disk %q: the merged image %s reads %s at offset %d where the record says %s: the merge stays recorded and is retried (point %d still reads through its own image); if it fails again, run `lifeboat verify %s`, and `lifeboat sync %s --whole` at its protected site, which writes a point holding the whole disk",
				d.Name, d.Into, got, mis.off, mis.want, m.Keep, vm, vm)
		}
		s.log.Info("retention: merged image read back as recorded", "vm", vm, "disk", d.Name, "point", m.Keep, "blocks", len(pl.checks))
		learned[d.Name] = blockCheck{b: -1}
		if w := wholeBlocks(dd.Size, kd.Size); w >= 0 && min(dd.Size, kd.Size)%lifeboat.BlockSize != 0 {
			ck, err := s.readUnknown(ctx, vm, m.Keep, d.Name, c, w, kd.Size)
			if err != nil {
				return nil, fmt.Errorf("disk %q: reading the block its size change left unknown: %w", d.Name, err)
			}
			learned[d.Name] = ck
		}
	}
	return learned, daemon.Stop(ctx)
}

// readUnknown reads block b of the merged image unless Keep's own record
// says what it holds (then b is -1).
func (s *Store) readUnknown(ctx context.Context, vm string, keep uint64, disk string, c *nbd.Client, b, size int64) (blockCheck, error) {
	var has bool
	if err := s.db.View(func(tx *bolt.Tx) error {
		chain, err := chainOf(tx, vm, disk, keep)
		if err == nil {
			has, err = chain[0].rec.has(b)
		}
		return err
	}); err != nil || has {
		return blockCheck{b: -1}, err
	}
	buf := make([]byte, blockLen(b, size))
	if err := c.Read(ctx, buf, b*lifeboat.BlockSize); err != nil {
		return blockCheck{}, err
	}
	if lifeboat.AllZero(buf) {
		return blockCheck{b: b}, nil
	}
	return blockCheck{b: b, want: lifeboat.HashBlock(buf)}, nil
}

// planMergeCheck lists the blocks checkMerged reads of one disk.
func (s *Store) planMergeCheck(ctx context.Context, vm string, m *mergeIntent, disk string, c *nbd.Client, size int64) (*checkPlan, error) {
	pl := &checkPlan{c: c, size: size}
	var zeros [][2]int64
	touched := map[int64]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		chain, err := chainOf(tx, vm, disk, m.Keep)
		if err != nil {
			return err
		}
		if len(chain) != 2 || chain[1].id != m.Drop {
			return fmt.Errorf("point %d of the merge is not backed by point %d: %w", m.Keep, m.Drop, errCatalog)
		}
		own := chain[0].rec
		if err := own.eachData(0, func(b int64, h lifeboat.Hash) error {
			pl.add(b, h)
			touched[b] = true
			return nil
		}); err != nil {
			return err
		}
		if err := own.eachZeros(func(lo, hi int64) error {
			zeros = append(zeros, [2]int64{lo, hi})
			return nil
		}); err != nil {
			return err
		}
		// A sample of Drop's blocks the merge left alone: the data block at or
		// after each of mergeSample random places (a cursor seek each, so the
		// cost does not grow with the base), seeded by the merge so that a
		// retry reads the same blocks.
		rng := rand.New(rand.NewPCG(m.Drop, m.Keep))
		base, limit := chain[1].rec, chain[1].limit
		n := min(blockCount(size), limit)
		if n <= 0 {
			return nil
		}
		c := base.d.Cursor()
		for range mergeSample {
			k, v := c.Seek(blockKey(rng.Int64N(n)))
			if k == nil {
				k, v = c.First()
			}
			if k == nil {
				break // Drop has no data blocks
			}
			b, h, err := decodeDataEntry(k, v)
			if err != nil {
				return err
			}
			if touched[b] || b >= limit {
				continue
			}
			if has, err := own.has(b); err != nil || has {
				if err != nil {
					return err
				}
				continue // Keep zeroed it: checked with the zero runs
			}
			touched[b] = true // once
			pl.add(b, h)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, z := range zeros {
		if err := pl.addAllocatedZeros(ctx, z[0], z[1], func(int64) bool { return false }); err != nil {
			return nil, err
		}
	}
	pl.sort()
	return pl, nil
}

// recordID is the id naming the record of disk's image in point r.
func recordID(r *pointRecord, disk string) uint64 {
	if id, ok := r.Records[disk]; ok {
		return id
	}
	return r.Point.ID
}

// mergeRecord folds keep's record of disk into drop's, which then becomes
// keep's: drop's blocks a size change made unknown are cut, keep's zero runs
// and data blocks are put over it, and keep's own record is deleted. The work
// is keep's entries and the entries of drop's they replace, not the disk's.
func mergeRecord(recs *bolt.Bucket, drop, keep *pointRecord, disk string, learned *blockCheck) error {
	into, ok := openRecord(recs, drop.recordKey(disk))
	if !ok {
		return fmt.Errorf("point %d has no block record: %w", drop.Point.ID, errCatalog)
	}
	from, ok := openRecord(recs, keep.recordKey(disk))
	if !ok {
		return fmt.Errorf("point %d has no block record: %w", keep.Point.ID, errCatalog)
	}
	dd, _ := drop.disk(disk)
	kd, _ := keep.disk(disk)
	if w := wholeBlocks(dd.Size, kd.Size); w >= 0 {
		if err := into.cut(w); err != nil {
			return err
		}
	}
	if err := from.eachZeros(into.putZeros); err != nil {
		return err
	}
	if err := from.eachData(0, into.putData); err != nil {
		return err
	}
	// The short block the size change left unknown, as the merged image reads
	// it: once the sizes are gone from the chain nothing else would say so.
	if learned != nil {
		var err error
		if learned.want.IsZero() {
			err = into.putZeros(learned.b, learned.b+1)
		} else {
			err = into.putData(learned.b, learned.want)
		}
		if err != nil {
			return err
		}
	}
	return recs.DeleteBucket(keep.recordKey(disk))
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

// wholeAbove is the index in pts of the newest point that retention may keep
// as the oldest without a merge, or 0 when there is none: a point that
// holds every disk with a parent whole (lifeboat.PointDisk.Whole), not the latest
// (a writer's image, and a writer made ahead, name the latest as backing),
// with keep points from it on, and above the point a recorded merge keeps.
func wholeAbove(pts []pointRecord, keep int, m *mergeIntent) int {
	lo := 1
	if m != nil {
		lo = slices.IndexFunc(pts, func(p pointRecord) bool { return p.Point.ID == m.Keep }) + 1
		lo = max(lo, 1)
	}
	for w := min(len(pts)-keep, len(pts)-2); w >= lo; w-- {
		whole := true
		for _, d := range pts[w].Point.Disks {
			if pts[w].Parents[d.Name] != 0 && !d.Whole {
				whole = false
			}
		}
		if whole {
			return w
		}
	}
	return 0
}

// seedsBelow lists the images that the bases of pts (and of the point a
// recorded merge drops) read through: the disks a reversal adopted
// (Adopt), which no record names. dropBelowWhole drops them with the
// points, Forget refuses those outside the store.
func (s *Store) seedsBelow(ctx context.Context, vm string, pts []pointRecord, intent *mergeIntent) ([]string, error) {
	if intent != nil && !intent.Done {
		if err := s.db.View(func(tx *bolt.Tx) error {
			p, ok, err := readPoint(tx, vm, intent.Drop)
			if ok {
				pts = append(slices.Clip(pts), p)
			}
			return err
		}); err != nil {
			return nil, err
		}
	}
	var seeds []string
	for _, p := range pts {
		for _, d := range p.Point.Disks {
			if p.Parents[d.Name] != 0 {
				continue
			}
			if _, err := os.Stat(s.abs(d.File)); errors.Is(err, os.ErrNotExist) {
				continue
			}
			info, err := qemu.ReadImageInfo(ctx, s.abs(d.File))
			if err != nil {
				return nil, fmt.Errorf("vm %q: retention: point %d disk %q: %w", vm, p.Point.ID, d.Name, err)
			}
			if b := info.BackingFile; b != "" {
				if !filepath.IsAbs(b) {
					b = filepath.Join(filepath.Dir(s.abs(d.File)), b)
				}
				seeds = append(seeds, filepath.Clean(b))
			}
		}
	}
	return seeds, nil
}

// dropBelowWhole drops, without a merge, the oldest points retention drops
// when a later point holds its disks whole (wholeAbove): that point's images
// lose their backing (metadata only: they read the same), then one catalog
// transaction deletes the points below it, their block records and a merge
// recorded among them, and records the files to delete, which go last (Open
// finishes a crash after the catalog, as a merge's last step). This is how a
// replica repaired by `lifeboat sync --whole` gets rid of the damaged points
// below: their merge's read-back check trips on the damage, so a merge of
// them never finishes, and the VM's points would grow without bound.
func (s *Store) dropBelowWhole(ctx context.Context, vm string) error {
	pts, intent, err := s.pointsAndMerge(vm)
	if err != nil {
		return err
	}
	w := wholeAbove(pts, s.keep, intent)
	if w == 0 {
		return nil
	}
	top := pts[w]
	inStore := func(file string) bool {
		return !filepath.IsAbs(file) || strings.HasPrefix(file, s.dir+string(filepath.Separator))
	}
	seeds, err := s.seedsBelow(ctx, vm, pts[:w], intent)
	if err != nil {
		return err
	}
	unlock, err := s.vmLock(vm).lockShape(ctx, vm)
	if err != nil {
		return err
	}
	defer unlock()
	for _, d := range top.Point.Disks {
		if top.Parents[d.Name] == 0 {
			continue
		}
		if err := qemu.RebaseUnsafe(ctx, s.abs(d.File), "", ""); err != nil {
			return fmt.Errorf("vm %q: retention: point %d disk %q holds the disk whole, but taking its image off the points below failed: %w", vm, top.Point.ID, d.Name, err)
		}
	}
	m := &mergeIntent{Drop: pts[w-1].Point.ID, Keep: top.Point.ID, Done: true}
	for _, seed := range seeds {
		if inStore(seed) {
			m.Remove = append(m.Remove, seed)
		} else {
			s.log.Warn("retention: the disk image a reversal adopted lies outside the store and no point reads it any more: delete it by hand", "vm", vm, "image", seed)
		}
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := vmBucket(tx, vm)
		recs := b.Bucket(bucketRecs)
		drop := slices.Clone(pts[:w])
		if intent != nil && !intent.Done {
			// The point a recorded merge drops is out of readPoints' list.
			if p, ok, err := readPoint(tx, vm, intent.Drop); err != nil {
				return err
			} else if ok {
				drop = append(drop, p)
			}
		}
		if intent != nil {
			m.Remove = append(m.Remove, intent.Remove...)
		}
		for _, p := range drop {
			for _, d := range p.Point.Disks {
				if inStore(d.File) {
					m.Remove = append(m.Remove, d.File)
				}
				if err := recs.DeleteBucket(p.recordKey(d.Name)); err != nil && !errors.Is(err, bolt.ErrBucketNotFound) {
					return err
				}
			}
			if err := b.Bucket(bucketPoints).Delete(idKey(p.Point.ID)); err != nil {
				return err
			}
		}
		top.Parents = maps.Clone(top.Parents)
		for name := range top.Parents {
			top.Parents[name] = 0
		}
		if err := putPoint(b, top); err != nil {
			return err
		}
		return putIntent(b, m)
	})
	if err != nil {
		return fmt.Errorf("vm %q: retention: dropping the points below point %d, which holds the disks whole: %w", vm, top.Point.ID, err)
	}
	unlock()
	s.log.Info("retention: dropped the oldest points without a merge: a later point holds the disks whole", "vm", vm,
		"dropped", w, "from", pts[0].Point.ID, "below", top.Point.ID)
	return s.runMerge(ctx, vm, m, false, &mergeTimes{})
}

// pointsAndMerge reads vm's points (readPoints) and the merge recorded for
// it, if any, in one transaction.
func (s *Store) pointsAndMerge(vm string) (pts []pointRecord, intent *mergeIntent, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		if pts, err = readPoints(tx, vm); err != nil {
			return err
		}
		intent, err = readIntent(tx, vm)
		return err
	})
	return pts, intent, err
}

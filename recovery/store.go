// Package recovery is the recovery site's store of restore points: a qcow2 chain
// per disk, a bbolt catalog, and the writing, export, verify and retention of points.
package recovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// DefaultKeep is how many points per VM retention keeps when Options.Keep is 0.
const DefaultKeep = 24

// Options tune a Store.
type Options struct {
	// Keep is how many points per VM retention keeps (DefaultKeep when 0).
	Keep   int
	Logger *slog.Logger
	// Owners declares which protected site owns a VM before its first point
	// (vm -> site); a VM not named is owned by the first site to commit a point.
	Owners map[string]string
}

// ErrNoPoint is returned (wrapped, naming the VM and point) when a point does not exist.
var ErrNoPoint = errors.New("no such restore point")

// ErrNoDisk is returned (wrapped) when a point has no disk of the given name.
var ErrNoDisk = errors.New("no such disk in the restore point")

// Store is the recovery site's set of restore points under one directory:
// dir/catalog.db and the images under dir/vms/<vm>/<disk>/.
type Store struct {
	dir    string
	db     *bolt.DB
	keep   int
	log    *slog.Logger
	owners map[string]string
	// direct: the writer daemon opens new images with O_DIRECT (the store's
	// file system takes it; see directIO).
	direct bool
	// prealloc: the writer daemon puts QEMU's preallocate filter under new
	// images (see startDaemonOnce); cleared for good if QEMU lacks it.
	prealloc atomic.Bool
	// plainImages: this QEMU makes no qcow2 subclusters (older than 5.2),
	// so points are created without pointImageOpts (createPointImage).
	plainImages atomic.Bool
	// noNativeAIO: the kernel refused QEMU a Linux AIO context; files are
	// opened with QEMU's thread pool from then on (blockdevAdd).
	noNativeAIO atomic.Bool

	mu      sync.Mutex
	locks   map[string]*vmLock
	writers map[*Writer]struct{}
	// spares are the writers made ahead for VMs' next points (see spare),
	// lastCommit when each VM's latest point was committed.
	spares     map[string]*spare
	lastCommit map[string]time.Time
	// retentionFailures are why VMs' retention failed, until it runs
	// through (RetentionFailure).
	retentionFailures map[string]RetentionFailure
	// retentionHeld are why VMs' oldest points stay for their group
	// (RetentionHeld).
	retentionHeld map[string]string
	closed        bool

	// Retention runs in the background after a commit (retainLater), so
	// that the protected site hears of its point without waiting for a
	// merge; Close cancels it (a merge is recorded and finished by Open)
	// and waits for it.
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bg       sync.WaitGroup
	// stops are daemons being stopped in the background (inBackground);
	// Close waits for them last.
	stopMu    sync.Mutex
	stops     sync.WaitGroup
	stopsDone bool

	// testMergeHook, when set by a test, runs after each merge step; an
	// error stops the merge there as a crash would.
	testMergeHook func(step string) error
	// testForgetHook, when set by a test, runs after each step of Forget; an
	// error stops it there as a crash would.
	testForgetHook func(step string) error
}

// names of VMs and disks become directory names and qemu option values.
var validName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

func checkName(kind, name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("%s name %q is not usable: use 1-128 letters, digits, '_', '-' or '.', not starting with '.' or '-'", kind, name)
	}
	return nil
}

// Open opens (creating if needed) the store in dir. It discards points that
// were being written when the site stopped and finishes interrupted retention
// merges, so what it lists afterwards is only whole, committed points. A
// merge that cannot finish now (the store full, a merged image that does not
// read back, a pin) is logged and left recorded for retention to retry: the
// store opens all the same, since the chain reads right meanwhile and the
// point being dropped stays hidden.
func Open(ctx context.Context, dir string, opts Options) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("recovery store %q: %w", dir, err)
	}
	for _, d := range []string{abs, filepath.Join(abs, "vms"), filepath.Join(abs, "run")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return nil, fmt.Errorf("recovery store: creating %s: %w", d, err)
		}
	}
	catalog := filepath.Join(abs, "catalog.db")
	db, err := openCatalog(catalog)
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("recovery store %s: the catalog is held by another process (is another lifeboat serving this directory?): %w", abs, err)
		}
		if errors.Is(err, errCatalogDamaged) {
			return nil, fmt.Errorf("recovery store %s: %s: %w; the restore points' images under %s are untouched: stop here, put back catalog.db from a backup of the recovery site taken with its images, and start again", abs, catalog, err, filepath.Join(abs, "vms"))
		}
		return nil, fmt.Errorf("recovery store %s: opening the catalog: %w", abs, err)
	}
	keep := opts.Keep
	if keep <= 0 {
		keep = DefaultKeep
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Store{
		dir:     abs,
		db:      db,
		keep:    keep,
		owners:  opts.Owners,
		log:     log.With("component", "recovery"),
		locks:   map[string]*vmLock{},
		writers: map[*Writer]struct{}{},
		spares:  map[string]*spare{},
		// A VM's first commit since Open makes no spare: its next point may be far off.
		lastCommit:        map[string]time.Time{},
		retentionFailures: map[string]RetentionFailure{},
		retentionHeld:     map[string]string{},
	}
	s.bgCtx, s.bgCancel = context.WithCancel(context.Background())
	s.direct = directIO(filepath.Join(abs, "vms"))
	s.prealloc.Store(true)
	if !s.direct {
		s.log.Warn("the store's file system does not take O_DIRECT: restore points are written through the page cache, which costs more CPU", "dir", abs)
	}
	if err := s.migrateRecords(); err != nil {
		db.Close()
		return nil, fmt.Errorf("recovery store %s: %w", abs, err)
	}
	if err := s.checkVMDirs(); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.recover(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.markMissing(); err != nil {
		s.log.Error("could not check that the images of every point are there", "err", err)
	}
	// A VM with more points than keep (keep lowered since, or merges that
	// waited for a pin): retention catches up now, not at its next point,
	// which may never come (production lost, the VM protected elsewhere).
	// One VM after another: hundreds of VMs past a lowered keep must not
	// each start a merge at once.
	vms, _ := s.VMs()
	var past []string
	for _, vm := range vms {
		if n, err := s.pointCount(vm); err == nil && n > s.keep {
			past = append(past, vm)
		}
	}
	if len(past) > 0 {
		s.retainLater(past...)
	}
	return s, nil
}

// checkVMDirs refuses a catalog that does not name the points' images
// under vms/: one that knows no VM whose images lie there (lost, emptied,
// made anew, or put back from a backup older than the VM), or that names
// none of some images of a VM it knows (put back from a backup older than
// them: retention merged points since, so the images it names hold later
// data or are gone). Opened as it was, the first listed no point of the VM
// and its next point was written over their images; the second listed
// points that no longer read as they were.
func (s *Store) checkVMDirs() error {
	ents, err := os.ReadDir(filepath.Join(s.dir, "vms"))
	if err != nil {
		return fmt.Errorf("recovery store %s: %w", s.dir, err)
	}
	var unknown, unnamed []string
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue // a forgotten VM's files (sweepForgotten)
		}
		vm := e.Name()
		// Points' images only (imageRel): a reversal moves its seed in
		// before the catalog hears of the VM (failback.seedPath).
		imgs, _ := filepath.Glob(filepath.Join(s.dir, "vms", vm, "*", "[0-9]*.qcow2"))
		if len(imgs) == 0 {
			continue
		}
		var named map[string]bool
		if err := s.db.View(func(tx *bolt.Tx) (err error) { named, err = namedFiles(tx, vm); return err }); err != nil {
			return fmt.Errorf("recovery store %s: %w", s.dir, err)
		}
		if named == nil {
			unknown = append(unknown, fmt.Sprintf("%q (%d images)", vm, len(imgs)))
			continue
		}
		for _, img := range imgs {
			if rel, err := filepath.Rel(s.dir, img); err == nil && !named[rel] {
				unnamed = append(unnamed, fmt.Sprintf("%s of VM %q", rel, vm))
			}
		}
	}
	catalog, vms := filepath.Join(s.dir, "catalog.db"), filepath.Join(s.dir, "vms")
	switch {
	case len(unknown) > 0:
		return fmt.Errorf("recovery store %s: the catalog %s knows no VM %s, whose restore points' images are under %s: the catalog was lost or put back from a backup older than them; put back catalog.db from a backup of the recovery site taken with its images, or, to give up those points, move each such VM's directory out of %s and start again (its protected site then sends it whole)",
			s.dir, catalog, strings.Join(unknown, ", "), vms, vms)
	case len(unnamed) > 0:
		return fmt.Errorf("recovery store %s: the catalog %s names none of the images %s: it was put back from a backup older than them, and the points it lists may no longer read as they were (retention merged them since); put back catalog.db from a backup of the recovery site taken with its images, or, to give up such a VM's points, move its directory out of %s and start again (its protected site then sends it whole)",
			s.dir, catalog, strings.Join(unnamed, ", "), vms)
	}
	return nil
}

// recover discards pending points and finishes merges of every VM.
func (s *Store) recover(ctx context.Context) error {
	var vms []string
	if err := s.db.View(func(tx *bolt.Tx) error { vms = listVMs(tx); return nil }); err != nil {
		return err
	}
	// Nothing runs yet: whatever a crash left in the runtime directory is
	// stale, and so are the images of writers made ahead. Its daemons go
	// first: one may hold an image that a merge must finish writing (a
	// merge's read-back check opens the merged point with QEMU's locks; a
	// lifeboat killed meanwhile leaves it running, and the merge's commit
	// then failed to get its write lock, found by `make soak`).
	if err := sweepSpares(ctx, s.dir); err != nil {
		s.log.Warn("could not clear what writers made ahead left", "err", err)
	}
	s.sweepForgotten()
	for _, vm := range vms {
		var pending []pendingRecord
		err := s.db.View(func(tx *bolt.Tx) (err error) { pending, err = readPending(tx, vm); return err })
		if err != nil {
			return err
		}
		// Pending points first: their daemons may hold locks the merge needs.
		for _, p := range pending {
			s.log.Warn("discarding a restore point interrupted before its commit", "vm", vm, "point", p.ID)
			if err := s.discardPending(ctx, vm, p); err != nil {
				return fmt.Errorf("recovery store: discarding interrupted point %d of vm %q: %w", p.ID, vm, err)
			}
		}
		s.finishMergeOnOpen(ctx, vm)
		if ctx.Err() != nil {
			return fmt.Errorf("recovery store: opening: %w", ctx.Err())
		}
	}
	run := filepath.Join(s.dir, "run")
	entries, _ := os.ReadDir(run)
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(run, e.Name()))
	}
	return nil
}

// finishMergeOnOpen finishes the merge recorded for vm, unless a pin holds
// the VM (a failover's VM outlives lifeboat and reads the chain). A failure
// is logged and recorded (RetentionFailure), not returned: one VM's merge
// must not keep the site from starting, for it and every other VM.
func (s *Store) finishMergeOnOpen(ctx context.Context, vm string) {
	m, err := s.recordedMerge(vm)
	if err == nil && m != nil {
		var pins map[string]Pin
		if pins, err = s.Pins(vm); err == nil && len(pins) > 0 {
			s.log.Warn("a retention merge recorded before waits: a VM started from a point reads the chain; retention finishes it once no run does",
				"vm", vm, "drop", m.Drop, "into", m.Keep, "pins", len(pins))
			return
		}
	}
	if err == nil {
		err = s.finishMerge(ctx, vm)
	}
	if err != nil && ctx.Err() == nil {
		s.setRetentionFailure(vm, err)
		s.log.Error("retention: the merge recorded before could not finish; the store opens all the same and retention tries again after the VM's next point", "vm", vm, "err", err)
	}
}

// Close aborts the points still being written and closes the catalog.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ws := make([]*Writer, 0, len(s.writers))
	for w := range s.writers {
		ws = append(ws, w)
	}
	s.mu.Unlock()
	var errs []error
	for _, w := range ws {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		errs = append(errs, w.Abort(ctx))
		cancel()
	}
	s.bgCancel()
	s.bg.Wait()
	s.mu.Lock()
	for vm, sp := range s.spares {
		delete(s.spares, vm)
		s.discardSpare(sp)
	}
	s.mu.Unlock()
	s.stopMu.Lock()
	s.stopsDone = true
	s.stopMu.Unlock()
	s.stops.Wait()
	errs = append(errs, s.db.Close())
	return errors.Join(errs...)
}

// Dir is the store's directory (absolute).
func (s *Store) Dir() string { return s.dir }

// ErrStoreFull marks an error of a write or merge that found the store's
// file system full.
var ErrStoreFull = errors.New("the store's file system is full")

// full says, of an error that came from a full file system (QEMU and its
// tools say ENOSPC in words), that the store is full and what to do.
func (s *Store) full(err error) error {
	if err == nil || errors.Is(err, ErrStoreFull) {
		return err
	}
	if msg := err.Error(); errors.Is(err, syscall.ENOSPC) || strings.Contains(msg, "No space left") || strings.Contains(msg, "no space left") || strings.Contains(msg, "ENOSPC") {
		return fmt.Errorf("%w (%s): free space there, or lower retention's keep; nothing listed is lost: %w", ErrStoreFull, s.dir, err)
	}
	return err
}

// Keep is how many points per VM retention keeps.
func (s *Store) Keep() int { return s.keep }

// VMs lists the VMs that have at least one committed point, sorted.
func (s *Store) VMs() ([]string, error) {
	var out []string
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, vm := range listVMs(tx) {
			pts, err := readPoints(tx, vm)
			if err != nil {
				return err
			}
			if len(pts) > 0 {
				out = append(out, vm)
			}
		}
		return nil
	})
	return out, err
}

// Points lists the VM's committed points, oldest first (none for an unknown VM).
func (s *Store) Points(vm string) ([]lifeboat.Point, error) {
	var out []lifeboat.Point
	err := s.db.View(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		for _, r := range pts {
			out = append(out, s.public(r))
		}
		return err
	})
	return out, err
}

// Point returns one committed point; id 0 is the latest. A missing point is
// an error wrapping ErrNoPoint.
func (s *Store) Point(vm string, id uint64) (lifeboat.Point, error) {
	var out lifeboat.Point
	err := s.db.View(func(tx *bolt.Tx) error {
		r, err := pointAt(tx, vm, id)
		out = s.public(r)
		return err
	})
	return out, err
}

// Latest returns the VM's newest committed point, and false when it has none.
func (s *Store) Latest(vm string) (lifeboat.Point, bool, error) {
	p, err := s.Point(vm, 0)
	if errors.Is(err, ErrNoPoint) {
		return lifeboat.Point{}, false, nil
	}
	return p, err == nil, err
}

// EachBlock calls fn for every data block of the disk's block map at point id
// (0 = latest): the content hash of the newest write of each block from the
// disk's base up to that point. Blocks written as zeros or never written are
// not reported: they read as zeros. A block whose content a resize of the disk
// altered (its short last block) is reported last, with lifeboat.UnknownHash:
// whoever compares it sends or reads it. The rest come newest record first,
// in block order within each. It reads the catalog in one transaction and
// holds no more than one block in memory.
func (s *Store) EachBlock(vm, disk string, id uint64, fn func(b int64, h lifeboat.Hash) error) error {
	return s.db.View(func(tx *bolt.Tx) error {
		r, err := pointAt(tx, vm, id)
		if err != nil {
			return err
		}
		chain, err := chainOf(tx, vm, disk, r.Point.ID)
		if err != nil {
			return err
		}
		unknown, err := unknownBlocks(tx, vm, disk, r.Point.ID)
		if err != nil {
			return err
		}
		err = eachFolded(chain, func(b int64, h lifeboat.Hash) error {
			if unknown[b] {
				return nil // no record above the resize holds it: none below does either
			}
			return fn(b, h)
		})
		if err != nil {
			return err
		}
		for _, b := range slices.Sorted(maps.Keys(unknown)) {
			if err := fn(b, lifeboat.UnknownHash); err != nil {
				return err
			}
		}
		return nil
	})
}

// BlockMap collects EachBlock into a map: it grows with the disk's data, not
// its size.
func (s *Store) BlockMap(vm, disk string, id uint64) (map[int64]lifeboat.Hash, error) {
	out := map[int64]lifeboat.Hash{}
	err := s.EachBlock(vm, disk, id, func(b int64, h lifeboat.Hash) error {
		out[b] = h
		return nil
	})
	return out, err
}

// RecordStat is the size of one disk's block record at one point, as the
// catalog keeps it: what a commit or a merge of that point costs.
type RecordStat struct {
	Point    uint64
	Disk     string
	Data     int // data blocks (one entry each)
	ZeroRuns int // runs of zeroed or discarded blocks (one entry each, whatever their length)
}

// RecordStats lists the block record of every disk of every committed point of vm.
func (s *Store) RecordStats(vm string) ([]RecordStat, error) {
	var out []RecordStat
	err := s.db.View(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err != nil {
			return err
		}
		recs := sub(vmBucket(tx, vm), bucketRecs)
		for _, r := range pts {
			for _, d := range r.Point.Disks {
				rec, ok := openRecord(recs, r.recordKey(d.Name))
				if !ok {
					return fmt.Errorf("vm %q point %d disk %q: the block record is missing from the catalog: %w", vm, r.Point.ID, d.Name, errCatalog)
				}
				st := RecordStat{Point: r.Point.ID, Disk: d.Name}
				st.Data, st.ZeroRuns = rec.entries()
				out = append(out, st)
			}
		}
		return nil
	})
	return out, err
}

// ImagePath returns the qcow2 image holding the point's view of a disk (id 0 =
// latest). Open it read-only, or as the backing of a new overlay.
func (s *Store) ImagePath(vm string, id uint64, disk string) (string, error) {
	p, err := s.Point(vm, id)
	if err != nil {
		return "", err
	}
	for _, d := range p.Disks {
		if d.Name == disk {
			return d.File, nil
		}
	}
	return "", fmt.Errorf("vm %q point %d has no disk %q (it has %s): %w", vm, p.ID, disk, diskNames(p.Disks), ErrNoDisk)
}

// CheckImages checks that no image a point reads through (each disk's
// chain, the point's own first, down to an image that holds the disk whole)
// was cut short since it was written: the
// start of every cluster its refcounts use lies within its file
// (qemu.CheckQcow2End: a few metadata reads per image, whatever its size).
// QEMU reads the clusters past a truncated file's end as zeros, so a VM
// started from such a point would boot on zeroed data without a word. An
// error wraps qemu.ErrTruncated and names the VM, point, disk and file; or
// ErrDamaged, when a verify found a block the point reads damaged.
func (s *Store) CheckImages(vm string, id uint64) error {
	p, err := s.Point(vm, id)
	if err != nil {
		return err
	}
	if p.Damaged != nil {
		return damageError(vm, p.ID, p.Damaged)
	}
	for _, d := range p.Disks {
		if err := s.checkDiskImages(vm, p.ID, d.Name); err != nil {
			return err
		}
	}
	return nil
}

// checkDiskImages is CheckImages of one disk of committed point id.
func (s *Store) checkDiskImages(vm string, id uint64, disk string) error {
	var (
		files []string
		mark  *lifeboat.DamageMark
	)
	err := s.db.View(func(tx *bolt.Tx) error {
		r, ok, err := readPoint(tx, vm, id)
		if err != nil {
			return err
		}
		if ok {
			mark = r.Point.Damaged
		}
		files, err = readFiles(tx, vm, disk, id)
		return err
	})
	if err != nil {
		return err
	}
	if mark != nil && mark.Disk == disk {
		return damageError(vm, id, s.publicMark(mark))
	}
	for _, f := range files {
		if err := qemu.CheckQcow2End(s.abs(f)); err != nil {
			return fmt.Errorf("vm %q point %d disk %q: %w; the point does not read as it was written: take an earlier point whose chain does not hold this image (`lifeboat points %s`), or `lifeboat sync %s --whole` at its protected site for a new one", vm, id, disk, err, vm, vm)
		}
	}
	return nil
}

func diskNames(ds []lifeboat.PointDisk) string {
	names := make([]string, len(ds))
	for i, d := range ds {
		names[i] = d.Name
	}
	sort.Strings(names)
	b, _ := json.Marshal(names)
	return string(b)
}

// pointAt reads point id of vm, the latest for id 0.
func pointAt(tx *bolt.Tx, vm string, id uint64) (pointRecord, error) {
	pts, err := readPoints(tx, vm)
	if err != nil {
		return pointRecord{}, err
	}
	if id == 0 {
		if len(pts) == 0 {
			return pointRecord{}, fmt.Errorf("vm %q has no restore point yet: %w", vm, ErrNoPoint)
		}
		return pts[len(pts)-1], nil
	}
	for _, r := range pts {
		if r.Point.ID == id {
			return r, nil
		}
	}
	return pointRecord{}, fmt.Errorf("vm %q has no restore point %d (list them with `lifeboat points %s`): %w", vm, id, vm, ErrNoPoint)
}

// public turns a catalog record into the Point callers see: absolute file names.
func (s *Store) public(r pointRecord) lifeboat.Point {
	p := r.Point
	p.Disks = append([]lifeboat.PointDisk(nil), p.Disks...)
	for i := range p.Disks {
		p.Disks[i].File = s.abs(p.Disks[i].File)
	}
	p.Damaged = s.publicMark(p.Damaged)
	return p
}

// publicMark is a damage mark as callers see it: an absolute file name.
func (s *Store) publicMark(m *lifeboat.DamageMark) *lifeboat.DamageMark {
	if m == nil || m.Missing == "" {
		return m
	}
	c := *m
	c.Missing = s.abs(c.Missing)
	return &c
}

func (s *Store) abs(rel string) string {
	if rel == "" || filepath.IsAbs(rel) {
		return rel
	}
	return filepath.Join(s.dir, rel)
}

// imageRel is where point id's image of a disk lives, relative to the store.
func imageRel(vm, disk string, id uint64) string {
	return filepath.Join("vms", vm, disk, fmt.Sprintf("%016d.qcow2", id))
}

// removeFiles deletes store-relative files; missing ones are fine (a repeat).
func (s *Store) removeFiles(rels []string) error {
	var errs []error
	for _, rel := range rels {
		if err := os.Remove(s.abs(rel)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

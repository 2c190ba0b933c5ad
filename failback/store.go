package failback

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/disksink"
	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Store is the production site's side of the wire during a failback: what
// the recovery site's failback cycles send to (wire.Server's Store). Its
// points go into the production disks, and the point the disks hold is
// recorded in dir, so that a restarted production site still knows it.
type Store struct {
	dir string
	log *slog.Logger

	mu      sync.Mutex
	vms     map[string]*vmFailback
	pending map[string]uint64 // VM -> fold: failbacks finished here, the VM not replicating since (finish.go)
}

// vmFailback is one VM's failback at production.
type vmFailback struct {
	prod *Production
	rec  record
}

// record is what the production site keeps of a VM's failback, in
// dir/<vm>.json: it is rewritten after every point the disks take.
type record struct {
	// Owner is the site the failback comes from, which owns the VM now.
	Owner string `json:"owner"`
	// Holds is the point the disks hold, as the owner names it: at first the
	// point the failover started from (its disks' generations those the
	// failover started on the recovered VM), then each failback point.
	Holds lifeboat.Point `json:"holds"`
	// Own is, by disk, production's own generations at the shared point:
	// what Changes reads production's writes after it from.
	Own map[string]Shared `json:"own"`
	// OwnSent: a failback point has been committed since the shared point,
	// so production's own writes are overwritten (they were in its blocks).
	OwnSent bool `json:"own_sent"`
	// Since are, by disk, the generations started as the disks took Holds
	// (a failback point): every write since, what a VM started here while
	// lifeboat did not hold the disks wrote (Changed).
	Since map[string]string `json:"since,omitempty"`
	// Resized are, by disk, the sizes production's disks had when it took
	// the failback, where they were not Holds' (resized outside lifeboat):
	// a shrink clears the generations' bits past the new end and a grow
	// adds clean ones, so a disk grown back to its size keeps generations
	// that lie. Until a failback point holds the disk again, its own
	// record is void and it is compared by hashes.
	Resized map[string]int64 `json:"resized,omitempty"`
}

// NewStore keeps failback records in dir.
func NewStore(dir string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("failback records: %w", err)
	}
	s := &Store{dir: dir, log: log.With("component", "failback"), vms: map[string]*vmFailback{}, pending: map[string]uint64{}}
	homes, err := filepath.Glob(filepath.Join(dir, "*.home.json"))
	if err != nil {
		return nil, err
	}
	for _, p := range homes {
		vm := strings.TrimSuffix(filepath.Base(p), ".home.json")
		h, ok, err := s.readHome(vm)
		if err != nil {
			// One VM's unreadable record must not stop the site: that VM's
			// failbacks are refused with this error until it is fixed.
			s.log.Error("reading a finished failback record; fix or remove it", "vm", vm, "err", err)
			continue
		}
		if ok && !h.Resumed {
			s.pending[vm] = h.Fold
		}
	}
	return s, nil
}

// Prepare readies vm's failback from owner: its disks, open (the production
// VM stopped), hold point holds; own says, by disk, which of production's
// generations were current at that point. A VM prepared before keeps what
// its record says the disks hold (see reopened).
func (s *Store) Prepare(ctx context.Context, vm, owner string, prod *Production, holds lifeboat.Point, own map[string]Shared) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, busy := s.vms[vm]; busy {
		return fmt.Errorf("vm %q: a failback is prepared already", vm)
	}
	for _, d := range holds.Disks {
		if _, ok := prod.disks[d.Name]; !ok {
			return fmt.Errorf("vm %q: point %d has disk %q, which production does not", vm, holds.ID, d.Name)
		}
	}
	rec := record{Owner: owner, Holds: holds, Own: own}
	var old record
	if ok, err := readRecord(s.path(vm), vm, "failback record", &old); err != nil {
		return err
	} else if ok && old.Owner == owner && old.Holds.ID >= holds.ID {
		rec = s.reopened(ctx, prod, old)
	}
	for _, d := range rec.Holds.Disks {
		if dk, ok := prod.disks[d.Name]; ok && dk.size != d.Size {
			size := dk.size
			s.log.Warn("failback: production's disk is not the size of the point it holds (resized outside lifeboat?): its own change record cannot show what a shrink cut off, so it is compared by hashes", "vm", vm, "disk", d.Name, "point", rec.Holds.ID, "size", size, "point_size", d.Size)
			if rec.Resized == nil {
				rec.Resized = map[string]int64{}
			}
			rec.Resized[d.Name] = size
		}
	}
	if len(rec.Resized) > 0 && rec.OwnSent {
		// Held since a failback point: only a resync compares the disk
		// (before one, Changed says production has no record, and the
		// cycle compares its hashes with the shared point's).
		rec.Holds.Disks = slices.Clone(rec.Holds.Disks)
		for i, d := range rec.Holds.Disks {
			if _, ok := rec.Resized[d.Name]; ok {
				rec.Holds.Disks[i].Generation = "" // the next cycle compares it by hashes
			}
		}
	}
	if err := s.save(vm, rec); err != nil {
		return err
	}
	s.vms[vm] = &vmFailback{prod: prod, rec: rec}
	return nil
}

// reopened is rec, the record of a failback whose disks lifeboat let go
// of (a restart of this site), for the disks prod opened again: whatever
// a VM started here meanwhile wrote must be overwritten too. Before the
// first failback point it is among production's own writes (Changes);
// after it, the generation started at that point's commit holds it
// (WrittenSince). A disk whose generation cannot prove it (a raw disk, a
// VM killed here, a record of an older lifeboat) loses the generation of
// the point it holds in rec, so that the next failback cycle compares it
// by hashes (a resync) instead of sending only the recovered VM's changes.
func (s *Store) reopened(ctx context.Context, prod *Production, rec record) record {
	if !rec.OwnSent {
		return rec
	}
	disks := slices.Clone(rec.Holds.Disks)
	for i, d := range disks {
		_, n, err := prod.node(ctx, d.Name)
		why := sinceWhy(n, rec.Since[d.Name])
		if err != nil {
			why = err.Error()
		}
		if why != "" && d.Generation != "" {
			s.log.Warn("failback: production's disk may have been written since lifeboat let go of it, and nothing proves what: its next failback cycle compares it by hashes", "vm", prod.VM, "disk", d.Name, "point", rec.Holds.ID, "why", why)
			disks[i].Generation = ""
		}
	}
	rec.Holds.Disks = disks
	return rec
}

// dropLost forgets vm's open disks when the daemon over them has died
// (killed, or the OOM killer) while this site ran on, and reports whether
// it did: lifeboat no longer holds the disks, a VM started here meanwhile
// may have written them, and every call about them would fail on the dead
// daemon until a restart. The record stays: the disks are opened again from
// it (Prepare, reopened), as after a restart.
func (s *Store) dropLost(ctx context.Context, vm string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vms[vm]
	if !ok {
		return false
	}
	select {
	case <-v.prod.daemon.Exited():
	default:
		return false
	}
	s.log.Warn("failback: the qemu-storage-daemon over production's disks has died, so lifeboat let go of them: opening them again", "vm", vm, "point", v.rec.Holds.ID)
	v.prod.Close(context.WithoutCancel(ctx)) // nothing left to flush: the clients are closed
	delete(s.vms, vm)
	return true
}

// Status is what the production site shows of a VM's failback.
type Status struct {
	From    string    `json:"from"`     // the site the failback comes from, which owns the VM now
	Holds   uint64    `json:"holds"`    // the point the disks hold
	Instant time.Time `json:"instant"`  // that point's instant
	OwnSent bool      `json:"own_sent"` // production's own writes since the shared point are overwritten
}

// Status is vm's failback, if this store took one.
func (s *Store) Status(vm string) (Status, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vms[vm]
	if !ok {
		return Status{}, false
	}
	return Status{From: v.rec.Owner, Holds: v.rec.Holds.ID, Instant: v.rec.Holds.Instant, OwnSent: v.rec.OwnSent}, true
}

// Close closes the disks of every failback this store took.
func (s *Store) Close(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for name, v := range s.vms {
		if err := v.prod.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("vm %q: %w", name, err))
		}
		delete(s.vms, name)
	}
	return errors.Join(errs...)
}

func (s *Store) path(vm string) string { return filepath.Join(s.dir, vm+".json") }

func (s *Store) save(vm string, rec record) error {
	return writeRecord(s.path(vm), vm, "failback record", rec)
}

// readRecord reads a record file of vm's into v; ok is false when there is
// none. what names the record in an error.
func readRecord(path, vm, what string, v any) (ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err == nil {
		err = json.Unmarshal(b, v)
	}
	if err != nil {
		return false, fmt.Errorf("vm %q: %s %s: %w", vm, what, path, err)
	}
	return true, nil
}

// writeRecord replaces a record file of vm's with v, readable by this site
// only.
func writeRecord(path, vm, what string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("vm %q: %s: %w", vm, what, err)
	}
	return nil
}

func (s *Store) vm(name string) (*vmFailback, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vms[name]
	if !ok {
		return nil, fmt.Errorf("vm %q: no failback is prepared at this production site", name)
	}
	return v, nil
}

// Authorize lets only the site the failback comes from send and read.
func (s *Store) Authorize(vm, site string) error {
	v, err := s.vm(vm)
	if err != nil {
		return fmt.Errorf("%w: %w", recovery.ErrNotOwner, err)
	}
	if site != v.rec.Owner {
		return fmt.Errorf("%w: vm %q fails back to this site from site %q, which owns it now; site %q may not send or read its points here",
			recovery.ErrNotOwner, vm, v.rec.Owner, site)
	}
	return nil
}

// Latest is the point the disks hold.
func (s *Store) Latest(vm string) (lifeboat.Point, bool, error) {
	v, err := s.vm(vm)
	if err != nil {
		return lifeboat.Point{}, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return v.rec.Holds, true, nil
}

// Points is the one point the disks hold.
func (s *Store) Points(vm string) ([]lifeboat.Point, error) {
	p, _, err := s.Latest(vm)
	if err != nil {
		return nil, err
	}
	return []lifeboat.Point{p}, nil
}

// EachBlock is the hashes of what a disk holds now (point 0 or the latest).
func (s *Store) EachBlock(vm, disk string, id uint64, fn func(b int64, h lifeboat.Hash) error) error {
	v, err := s.vm(vm)
	if err != nil {
		return err
	}
	if held, _, _ := s.Latest(vm); id != 0 && id != held.ID {
		return fmt.Errorf("vm %q: production holds point %d, not %d", vm, held.ID, id)
	}
	return v.prod.Hashes(context.Background(), disk, fn)
}

// Changed is what production wrote on its own since the shared point, until a
// failback point has overwritten it; after that, what was written into the
// disk since it took that point (by a VM started here meanwhile).
func (s *Store) Changed(ctx context.Context, vm, disk string, fn func(off, length int64) error) error {
	v, err := s.vm(vm)
	if err != nil {
		return err
	}
	s.mu.Lock()
	sent, since := v.rec.OwnSent, v.rec.Since[disk]
	own, ok := v.rec.Own[disk]
	size, resized := v.rec.Resized[disk]
	held := v.rec.Holds.ID
	s.mu.Unlock()
	if resized {
		return fmt.Errorf("vm %q disk %q: %w: the disk was %d bytes when production took the failback, not the size of point %d: its generations cannot show what a shrink cut off", vm, disk, lifeboat.ErrNoChangeRecord, size, held)
	}
	if sent {
		return v.prod.WrittenSince(ctx, disk, since, fn)
	}
	if !ok {
		return fmt.Errorf("vm %q disk %q: %w: the shared point names no generation of production's", vm, disk, lifeboat.ErrNoChangeRecord)
	}
	return v.prod.Changes(ctx, disk, own, fn)
}

// BeginPoint takes a failback point into the disks. It must build on the
// point they hold (or resynchronise every disk): anything else would mix two
// histories in one disk.
func (s *Store) BeginPoint(ctx context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	v, err := s.vm(p.VM)
	if err != nil {
		return nil, err
	}
	held, _, _ := s.Latest(p.VM)
	for _, d := range p.Disks {
		if !d.Resync && d.Base != held.ID {
			return nil, fmt.Errorf("vm %q point %d disk %q builds on point %d, but production holds point %d", p.VM, p.ID, d.Name, d.Base, held.ID)
		}
	}
	sink, err := disksink.Open(ctx, p, v.prod.Clients())
	if err != nil {
		return nil, err
	}
	s.log.Info("failback point begun", "vm", p.VM, "point", p.ID, "base", held.ID)
	return &pointWriter{s: s, vm: v, sink: sink}, nil
}

// pointWriter is a failback point on its way into the production disks.
type pointWriter struct {
	s    *Store
	vm   *vmFailback
	sink *disksink.Sink
}

func (w *pointWriter) WriteBlocks(_ context.Context, disk string, off int64, data []byte, hashes []lifeboat.Hash) error {
	_, err := w.sink.SendBlocks(disk, off, data, hashes)
	return err
}

func (w *pointWriter) WriteZeroes(_ context.Context, disk string, off, length int64) error {
	return w.sink.SendZeroes(disk, off, length)
}

func (w *pointWriter) WritePatch(_ context.Context, disk string, off int64, dirty lifeboat.Dirty, data []byte, sum, h lifeboat.Hash) error {
	return w.sink.WritePatch(disk, off, dirty, data, sum, h)
}

func (w *pointWriter) CopyBlock(_ context.Context, disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	return w.sink.SendCopy(disk, off, srcDisk, srcOff, length, h)
}

// Commit flushes the disks, starts the generations that record every write
// from the point on, then records that the disks hold the point. Until the
// record is written, the last point's generations hold this one's writes
// too: a point that fails here is sent again from there.
func (w *pointWriter) Commit(ctx context.Context, stats lifeboat.CycleStats) (lifeboat.Point, error) {
	p, err := w.sink.Commit(stats)
	if err != nil {
		return lifeboat.Point{}, err
	}
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	since, err := w.vm.prod.startSince(ctx, p)
	if err != nil {
		w.vm.prod.removeBitmaps(context.WithoutCancel(ctx), since)
		return lifeboat.Point{}, err
	}
	rec := w.vm.rec
	rec.Holds, rec.OwnSent, rec.Since, rec.Resized = p, true, since, nil
	if err := w.s.save(p.VM, rec); err != nil {
		w.vm.prod.removeBitmaps(context.WithoutCancel(ctx), since)
		return lifeboat.Point{}, err
	}
	w.vm.prod.removeBitmaps(ctx, w.vm.rec.Since)
	w.vm.rec = rec
	w.s.log.Info("failback point committed", "vm", p.VM, "point", p.ID, "written", w.sink.Written(), "zeroed", w.sink.Zeroed())
	return p, nil
}

// Abort leaves the disks part old, part new: the owner's next cycle from the
// point they held resends every block this one may have written.
func (w *pointWriter) Abort(context.Context) error {
	w.sink.Abort()
	return nil
}

var (
	_ wire.Store        = (*Store)(nil)
	_ wire.ChangeLister = (*Store)(nil)
)

// Target is the production site as the target of a failback cycle at the
// site the VM runs at: the wire client to production, which also says what
// production changed on its own since the shared point (protect.ChangedTarget).
//
// Production's record covers its writes since the latest point it sent. When
// the failover started from an earlier point, what the later points wrote is
// production's change too: the blocks whose content differs between the
// shared point's block map here (SharedMap) and the latest's (LatestMap; nil
// when the failover started from the latest point). When production has no
// record of its own writes, its disk is compared by hashes with the shared
// point's map instead, which covers both. Once production holds a failback
// point, its own writes since the shared point are overwritten; what a VM
// started there since wrote is what production's generation started at
// that point's commit holds (Store.Changed), or production's Latest names
// no generation for the disk and the cycle compares it by hashes.
type Target struct {
	*wire.Client
	// Hashed counts the bytes of production's data blocks it compared by
	// hashes (what production read to answer, where its record was lost).
	Hashed    atomic.Int64
	Shared    uint64 // the point the failover started from
	SharedMap func(ctx context.Context, disk string) (map[int64]lifeboat.Hash, error)
	LatestMap func(ctx context.Context, disk string) (map[int64]lifeboat.Hash, error)
	Log       *slog.Logger
}

// TargetChanged is what production changed on its own since the shared point.
func (t *Target) TargetChanged(ctx context.Context, vm, disk string, fn func(off, length int64) error) error {
	held, ok, err := t.Client.Latest(ctx, vm)
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	if held.ID != t.Shared {
		if err := t.Client.Changed(ctx, vm, disk, fn); err != nil {
			return fmt.Errorf("vm %q disk %q: what production wrote since it took failback point %d: %w", vm, disk, held.ID, err)
		}
		return nil
	}
	err = t.Client.Changed(ctx, vm, disk, fn)
	if err == nil {
		if t.LatestMap == nil {
			return nil
		}
		shared, err := t.map_(ctx, vm, disk, t.SharedMap, "shared")
		if err != nil {
			return err
		}
		latest, err := t.map_(ctx, vm, disk, t.LatestMap, "latest")
		if err != nil {
			return err
		}
		return Differing(shared, latest, fn)
	}
	if !errors.Is(err, lifeboat.ErrNoChangeRecord) {
		return err
	}
	log := t.Log
	if log == nil {
		log = slog.Default()
	}
	log.Warn("production has no record of its own writes since the shared point: comparing its blocks' hashes with the point's", "vm", vm, "disk", disk, "why", err)
	prod, err := t.Client.BlockMap(ctx, vm, disk)
	if err != nil {
		return err
	}
	t.Hashed.Add(int64(len(prod)) * lifeboat.BlockSize)
	shared, err := t.map_(ctx, vm, disk, t.SharedMap, "shared")
	if err != nil {
		return err
	}
	return Differing(shared, prod, fn)
}

func (t *Target) map_(ctx context.Context, vm, disk string, f func(context.Context, string) (map[int64]lifeboat.Hash, error), which string) (map[int64]lifeboat.Hash, error) {
	m, err := f(ctx, disk)
	if err != nil {
		return nil, fmt.Errorf("vm %q disk %q: the %s point's block map here: %w", vm, disk, which, err)
	}
	return m, nil
}

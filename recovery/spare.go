package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A spare is the writer of a VM's next point, made ready while the
// protected site is between cycles: its images created above the latest
// point's and its daemon started with every disk's chain open. Opening the
// chain is most of what Begin costs, and grows with its depth (retention's
// keep): 220 ms of the 270 ms a Begin of two disks above 24 points took
// here, in the cycle's prepare phase, where it adds to the RPO.
//
// A spare is made after a commit of a VM whose points come often (a Begin
// within spareIdle of the commit before it), and the next Begin takes it if
// the chain is still the one it opened: the same latest point, the same
// image of each disk (a merge into the latest point changes it), the same
// disks and sizes. Otherwise, or when unused for spareIdle, it is thrown
// away. It is made under the VM's shape, as a Begin opens the chain; a
// Begin waits for the spare being made, and then needs no shape: the chain
// is open, and its catalog transaction checks that the spare still fits
// (a merge's catalog change is one transaction too). Its images live beside
// the points' as spare-*.part files until a Begin renames them: Open
// deletes such files and kills daemons left in the runtime directory by a
// crash.
type spare struct {
	vm     string
	parent uint64            // the latest point when it was made
	files  map[string]string // disk → the latest point's image (store-relative), the spare's backing
	sizes  map[string]int64
	images map[string]string // disk → the spare's image (absolute)
	runDir string
	daemon *qemu.Daemon // nil if it could not be made
	timer  *time.Timer
	ready  chan struct{} // closed once made, or not
	// The daemon's layout: each disk's index (its nodes d<i>, e<i>) and
	// the node below its top; carried counts the points it went on from.
	index   map[string]int
	below   map[string]string
	carried int
}

// A writer's daemon goes on to write the next point (carry): at commit its
// top images are closed, and the spare made from it opens the committed
// images above the chain it has open and the next images above them,
// instead of opening the whole chain again. It goes on at most maxCarry
// times: merges delete images it still holds open (the chain reads the
// same through them, see vmLock), and their room comes back when it stops.
const maxCarry = 16

// errSpareUnfit: the spare does not fit the chain (the catalog transaction
// that found it is rolled back).
var errSpareUnfit = errors.New("the writer made ahead does not fit the chain")

// spareIdle is how soon after a commit the next Begin must come for its VM
// to get a spare, and how long an unused spare is kept.
const spareIdle = time.Minute

// spareImage is where a spare keeps a disk's image until a Begin takes it.
func spareImage(vm, disk, runDir string) string {
	return filepath.Join("vms", vm, disk, "spare-"+filepath.Base(runDir)+".part")
}

// prepareSpare makes vm's next writer in the background, under the VM's
// shape, which it waits for there (a merge may be rewriting the chain's
// headers or its catalog entry): the caller never waits. A Begin meanwhile
// waits for the spare (takeSpare) holding the writer slot, which no holder
// of the shape waits for (see vmLock).
//
// from, if not nil, is the committed writer's daemon to go on from (see
// maxCarry), which prepareSpare owns from then on.
func (s *Store) prepareSpare(vm string, from *spare) {
	l := s.vmLock(vm)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		if from != nil {
			s.discardSpare(from)
		}
		return
	}
	if old := s.spares[vm]; old != nil {
		// Not taken (the last Begin came while it was being made): made
		// above an older point.
		delete(s.spares, vm)
		go func() { <-old.ready; s.discardSpare(old) }()
	}
	sp := &spare{vm: vm, ready: make(chan struct{})}
	s.spares[vm] = sp
	s.bg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.bg.Done()
		defer close(sp.ready)
		unlock, err := l.lockShape(s.bgCtx, vm)
		if err != nil {
			// Closing: the spare has no daemon and is discarded below.
			unlock = func() {}
			if from != nil {
				s.discardSpare(from)
				from = nil
			}
		} else if from != nil {
			if err = s.carrySpare(s.bgCtx, sp, from); err != nil {
				s.discardSpare(from)
				if s.bgCtx.Err() == nil {
					s.log.Warn("the writer's daemon could not go on to the next point; opening the chain again", "vm", vm, "err", err)
				}
			}
		}
		if s.bgCtx.Err() == nil && (from == nil || err != nil) {
			err = s.makeSpare(s.bgCtx, sp)
		}
		unlock()
		if err != nil && s.bgCtx.Err() == nil {
			s.log.Warn("could not make the next point's writer ahead; the next Begin makes it", "vm", vm, "err", err)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.spares[vm] != sp {
			return // taken by a Begin meanwhile
		}
		if sp.daemon == nil || s.closed {
			delete(s.spares, vm)
			s.discardSpare(sp)
			return
		}
		sp.timer = time.AfterFunc(spareIdle, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.spares[vm] == sp {
				delete(s.spares, vm)
				s.discardSpare(sp)
			}
		})
	}()
}

// makeSpare creates the images of the VM's next point above its latest
// and starts their writing daemon, which it leaves nil if the VM has no
// point or on an error (what was made is deleted). The shape is held.
func (s *Store) makeSpare(ctx context.Context, sp *spare) (err error) {
	vm := sp.vm
	sp.files, sp.sizes, sp.images = map[string]string{}, map[string]int64{}, map[string]string{}
	sp.index, sp.below = map[string]int{}, map[string]string{}
	chains := map[string][]string{}
	var disks []string
	err = s.db.View(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err != nil || len(pts) == 0 {
			return err
		}
		latest := pts[len(pts)-1]
		sp.parent = latest.Point.ID
		for _, d := range latest.Point.Disks {
			files, err := chainFiles(tx, vm, d.Name, latest.Point.ID)
			if err != nil {
				return err
			}
			for _, f := range files {
				chains[d.Name] = append(chains[d.Name], s.abs(f))
			}
			sp.files[d.Name], sp.sizes[d.Name] = d.File, d.Size
			disks = append(disks, d.Name)
		}
		return nil
	})
	if err != nil || len(disks) == 0 {
		return err
	}
	if sp.runDir, err = s.runDir(); err != nil {
		return err
	}
	if filepath.Dir(sp.runDir) != filepath.Join(s.dir, "run") {
		// Open would not find its daemon after a crash.
		os.RemoveAll(sp.runDir)
		sp.runDir = ""
		return nil
	}
	defer func() {
		if err != nil {
			s.discardSpare(sp)
			sp.daemon = nil
		}
	}()
	names := make([]string, len(disks))
	files := make([]string, len(disks))
	below := make([][]string, len(disks))
	for i, disk := range disks {
		img := s.abs(spareImage(vm, disk, sp.runDir))
		sp.images[disk] = img
		if err := s.createPointImage(ctx, img, sp.sizes[disk], s.abs(sp.files[disk]), "qcow2"); err != nil {
			return fmt.Errorf("disk %q: %w", disk, err)
		}
		names[i], files[i], below[i] = disk, img, chains[disk]
		sp.index[disk], sp.below[disk] = i, chainNode(i, chains[disk][0])
	}
	sp.daemon, err = s.startDaemon(ctx, sp.runDir, names, files, below, true)
	return err
}

// carrySpare makes sp from the daemon of the point just committed (from):
// its images, closed at the commit, are opened read-only above the chain
// the daemon holds, and the next images above them. The shape is held.
// On an error sp holds nothing; from is the caller's to discard.
func (s *Store) carrySpare(ctx context.Context, sp *spare, from *spare) error {
	vm := sp.vm
	var latest *pointRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		if err == nil && len(pts) > 0 {
			latest = &pts[len(pts)-1]
		}
		return err
	})
	if err != nil {
		return err
	}
	if latest == nil || latest.Point.ID != from.parent || len(latest.Point.Disks) != len(from.index) {
		return errors.New("the latest point is not the one the daemon wrote")
	}
	for _, d := range latest.Point.Disks {
		if _, ok := from.index[d.Name]; !ok || d.File != from.files[d.Name] {
			// A merge into the latest point replaced its image.
			return fmt.Errorf("disk %q: the latest point's image is not the one the daemon wrote", d.Name)
		}
	}
	prealloc := int64(0)
	if s.prealloc.Load() {
		prealloc = preallocSize(s.abs(filepath.Dir(latest.Point.Disks[0].File)))
	}
	next := &spare{vm: vm, parent: latest.Point.ID, runDir: from.runDir, daemon: from.daemon, carried: from.carried,
		files: map[string]string{}, sizes: map[string]int64{}, images: map[string]string{},
		index: from.index, below: map[string]string{}}
	for _, d := range latest.Point.Disks {
		i := from.index[d.Name]
		var top string
		if err := bounded(ctx, next.daemon, "opening "+d.File, func(ctx context.Context) (err error) {
			top, err = s.addChain(ctx, next.daemon, i, from.below[d.Name], []string{s.abs(d.File)})
			return err
		}); err != nil {
			return err
		}
		img := s.abs(spareImage(vm, d.Name, next.runDir))
		next.images[d.Name] = img
		if err := s.createPointImage(ctx, img, d.Size, s.abs(d.File), "qcow2"); err != nil {
			s.removeSpareImages(next)
			return fmt.Errorf("disk %q: %w", d.Name, err)
		}
		if err := s.openImage(ctx, next.daemon, i, d.Name, img, top, true, prealloc); err != nil {
			s.removeSpareImages(next)
			return err
		}
		next.files[d.Name], next.sizes[d.Name], next.below[d.Name] = d.File, d.Size, top
	}
	// Field by field: a Begin waiting for sp reads its ready channel.
	sp.parent, sp.files, sp.sizes, sp.images, sp.runDir = next.parent, next.files, next.sizes, next.images, next.runDir
	sp.daemon, sp.index, sp.below, sp.carried = next.daemon, next.index, next.below, next.carried
	return nil
}

// removeSpareImages deletes the images a spare made.
func (s *Store) removeSpareImages(sp *spare) {
	for _, img := range sp.images {
		_ = os.Remove(img)
	}
}

// discardSpare stops a spare's daemon and deletes its images and runtime
// directory.
func (s *Store) discardSpare(sp *spare) {
	if sp.timer != nil {
		sp.timer.Stop()
	}
	s.removeSpareImages(sp) // its daemon may hold them open: unlinked all the same
	d, runDir := sp.daemon, sp.runDir
	s.inBackground(func() {
		if d != nil {
			_ = d.Kill()
		}
		if runDir != "" {
			_ = os.RemoveAll(runDir)
		}
	})
}

// inBackground runs stop, the end of a daemon that holds no image open for
// writing (a kill or a quit, then the removal of its runtime directory),
// without waiting for it. A writer's daemon that went on held the chain of
// many points and the images merges deleted meanwhile, and its exit took
// 1.8–4 s in `make bench`'s RPO run at 40 MB/s: inside a commit, or a
// Begin, that was the RPO's worst moments. Close waits for every stop; after
// it, stop runs in the caller. A crash leaves the daemons to the next Open
// (sweepSpares).
func (s *Store) inBackground(stop func()) {
	s.stopMu.Lock()
	if s.stopsDone {
		s.stopMu.Unlock()
		stop()
		return
	}
	s.stops.Add(1)
	s.stopMu.Unlock()
	go func() {
		defer s.stops.Done()
		stop()
	}()
}

// takeSpare removes vm's spare from the store and returns it once made, or
// nil if there is none, it could not be made, or its daemon has exited
// since (killed, out of memory): the Begin then opens the chain itself.
func (s *Store) takeSpare(ctx context.Context, vm string) (*spare, error) {
	s.mu.Lock()
	sp := s.spares[vm]
	delete(s.spares, vm)
	s.mu.Unlock()
	if sp == nil {
		return nil, nil
	}
	select {
	case <-sp.ready:
	case <-ctx.Done():
		go func() { <-sp.ready; s.discardSpare(sp) }()
		return nil, fmt.Errorf("vm %q: waiting for the writer made ahead: %w", vm, ctx.Err())
	}
	if sp.timer != nil {
		sp.timer.Stop()
	}
	if sp.daemon == nil {
		return nil, nil
	}
	select {
	case <-sp.daemon.Exited():
		s.log.Warn("the writer made ahead for the VM's next point is gone; opening the chain again", "vm", vm, "daemon", sp.daemon.Diagnosis())
		s.discardSpare(sp)
		return nil, nil
	default:
	}
	return sp, nil
}

// fits says whether a spare made above latest can write the point spec
// describes.
func (sp *spare) fits(spec BeginSpec, latest *pointRecord) bool {
	if latest == nil || latest.Point.ID != sp.parent || len(spec.Disks) != len(sp.files) || len(latest.Point.Disks) != len(sp.files) {
		return false
	}
	for _, d := range spec.Disks {
		prev, ok := latest.disk(d.Name)
		if !ok || d.Seed != "" || prev.File != sp.files[d.Name] || d.Size != sp.sizes[d.Name] {
			return false
		}
	}
	return true
}

// adoptSpare moves a fitting spare's images to the point's files and gives
// its daemon to the writer.
func (w *Writer) adoptSpare(sp *spare) error {
	for name, d := range w.disks {
		if err := os.Rename(sp.images[name], w.s.abs(d.file)); err != nil {
			return fmt.Errorf("vm %q disk %q: taking the image made ahead: %w", w.spec.VM, name, err)
		}
		delete(sp.images, name)
	}
	w.daemon = sp.daemon
	w.index, w.below, w.carried = sp.index, sp.below, sp.carried
	sp.daemon, sp.runDir = nil, "" // the writer's now
	return nil
}

// sweepSpares deletes what spares of a stopped lifeboat left: their daemons
// (in the runtime directory under dir) and their images.
func sweepSpares(ctx context.Context, dir string) error {
	run := filepath.Join(dir, "run")
	entries, _ := os.ReadDir(run)
	var errs []error
	for _, e := range entries {
		if err := qemu.KillLeftover(ctx, filepath.Join(run, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	parts, err := filepath.Glob(filepath.Join(dir, "vms", "*", "*", "spare-*.part"))
	if err != nil {
		return err
	}
	for _, p := range parts {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// roomToCarry says whether w's daemon may go on to the next point: its
// runtime directory is where Open looks after a crash, and the store has
// room for the images that merges delete while the daemon holds them
// (256 MiB free, as the preallocate filter asks).
func (s *Store) roomToCarry(w *Writer) bool {
	if filepath.Dir(s.abs(w.rec.RunDir)) != filepath.Join(s.dir, "run") || len(w.spec.Disks) == 0 {
		return false
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.abs(w.disks[w.spec.Disks[0].Name].file), &st); err != nil {
		return false
	}
	return int64(st.Bavail)*int64(st.Bsize) >= 256<<20
}

package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
// away. It is made under the VM's shape, as a Begin opens the chain, and
// its images live beside the points' as spare-*.part files until a Begin
// renames them: Open deletes such files and kills daemons left in the
// runtime directory by a crash.
type spare struct {
	vm     string
	parent uint64            // the latest point when it was made
	files  map[string]string // disk → the latest point's image (store-relative), the spare's backing
	sizes  map[string]int64
	images map[string]string // disk → the spare's image (absolute)
	runDir string
	daemon *qemu.Daemon
	timer  *time.Timer
}

// spareIdle is how soon after a commit the next Begin must come for its VM
// to get a spare, and how long an unused spare is kept.
const spareIdle = time.Minute

// spareImage is where a spare keeps a disk's image until a Begin takes it.
func spareImage(vm, disk, runDir string) string {
	return filepath.Join("vms", vm, disk, "spare-"+filepath.Base(runDir)+".part")
}

// prepareSpare makes vm's next writer in the background, if nothing else
// holds the VM's shape now (a merge rewriting it, a Begin): never waits.
func (s *Store) prepareSpare(vm string) {
	l := s.vmLock(vm)
	select {
	case l.shape <- struct{}{}:
	default:
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-l.shape
		return
	}
	s.bg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.bg.Done()
		// The shape is released only once the spare is listed or gone, so
		// a Begin (which takes the shape first) always finds it finished.
		defer func() { <-l.shape }()
		sp, err := s.makeSpare(s.bgCtx, vm)
		if err != nil {
			if s.bgCtx.Err() == nil {
				s.log.Warn("could not make the next point's writer ahead; the next Begin makes it", "vm", vm, "err", err)
			}
			return
		}
		if sp == nil {
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closed {
			s.discardSpare(sp)
			return
		}
		if old := s.spares[vm]; old != nil {
			s.discardSpare(old)
		}
		s.spares[vm] = sp
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

// makeSpare creates the images of vm's next point above its latest and
// starts their writing daemon; nil if the VM has no point. The shape is held.
func (s *Store) makeSpare(ctx context.Context, vm string) (_ *spare, err error) {
	sp := &spare{vm: vm, files: map[string]string{}, sizes: map[string]int64{}, images: map[string]string{}}
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
		return nil, err
	}
	if sp.runDir, err = s.runDir(); err != nil {
		return nil, err
	}
	if filepath.Dir(sp.runDir) != filepath.Join(s.dir, "run") {
		// Open would not find its daemon after a crash.
		os.RemoveAll(sp.runDir)
		return nil, nil
	}
	defer func() {
		if err != nil {
			s.discardSpare(sp)
		}
	}()
	names := make([]string, len(disks))
	files := make([]string, len(disks))
	below := make([][]string, len(disks))
	for i, disk := range disks {
		img := s.abs(spareImage(vm, disk, sp.runDir))
		if err := qemu.CreateImage(ctx, img, "qcow2", sp.sizes[disk], s.abs(sp.files[disk]), "qcow2"); err != nil {
			return nil, fmt.Errorf("disk %q: %w", disk, err)
		}
		sp.images[disk] = img
		if err := os.Chmod(img, 0o600); err != nil {
			return nil, err
		}
		names[i], files[i], below[i] = disk, img, chains[disk]
	}
	if sp.daemon, err = s.startDaemon(ctx, sp.runDir, names, files, below, true); err != nil {
		return nil, err
	}
	return sp, nil
}

// discardSpare stops a spare's daemon and deletes its images and runtime
// directory.
func (s *Store) discardSpare(sp *spare) {
	if sp.timer != nil {
		sp.timer.Stop()
	}
	if sp.daemon != nil {
		_ = sp.daemon.Kill()
	}
	for _, img := range sp.images {
		_ = os.Remove(img)
	}
	if sp.runDir != "" {
		_ = os.RemoveAll(sp.runDir)
	}
}

// takeSpare removes vm's spare from the store and returns it, or nil.
func (s *Store) takeSpare(vm string) *spare {
	s.mu.Lock()
	defer s.mu.Unlock()
	sp := s.spares[vm]
	if sp != nil {
		delete(s.spares, vm)
		sp.timer.Stop()
	}
	return sp
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

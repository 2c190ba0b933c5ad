package failback

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/virt"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Finalized is what a finalize did (Back.Finalize).
type Finalized struct {
	ShutDown bool           `json:"shut_down"` // the guest powered off (else its CPUs were stopped)
	Last     lifeboat.Point `json:"last"`      // the last failback point, which production's disks hold
	Fold     lifeboat.Point `json:"fold"`      // the same state, a point of this site's chain
	Epoch    uint64         `json:"epoch"`     // production's ownership from now on
	Home     string         `json:"home"`      // the production site
	// Stopped is when the guest was stopped here, Took how long it was
	// down until Finalize returned (the VM then waits to be started there).
	Stopped time.Time     `json:"stopped"`
	Took    time.Duration `json:"took_ns"`
	// Resumed is, when the finalize waited for it (FinalizeOptions.Wait),
	// the first point production sent after the handover: the VM ran there
	// again at its instant. Down is how long the VM was down at most, from
	// its stop here to that instant; nil and 0 when it did not run there in
	// the wait.
	Resumed *lifeboat.Point `json:"resumed,omitempty"`
	Down    time.Duration   `json:"down_ns,omitempty"`
}

// FinalizeOptions bound the guest's power-off, and say how long to wait
// for the VM to run at production and replicate again.
type FinalizeOptions struct {
	ShutdownTimeout time.Duration // protect.DefaultShutdownTimeout when 0
	// Wait is how long, once the VM is handed over, the finalize waits for
	// production's first point (its daemon starts the VM, or waits for it
	// to be started, and cycles at once). 0: it does not wait.
	Wait time.Duration
}

// Finalize brings the VM home (`lifeboat failback VM --finalize`):
//  1. the recovered VM's guest is powered off (protect.ShutDown: through its
//     agent, else the power button; its CPUs stopped if it has not within
//     the timeout), QEMU paused with its disks open;
//  2. a last failback cycle: production's disks take the VM's last state;
//  3. the fold: a cycle from the same stopped VM into this site's own
//     chain, out of the overlays' home generations (every write since the
//     failover), so that this site's latest point is that state too;
//  4. production starts on its disks the generations that continue the
//     chain from the fold's point, and releases them (FinishFailback);
//     this site records them on that point;
//  5. the VM is handed to production under a new epoch, the recovered
//     VM's QEMU quits, the failover run ends (failover.Manager.Finish).
//
// m is this site's failover manager, which ends the run. Then the VM is
// started at production, and its next cycle there is incremental from the
// fold's point. A step that fails leaves the VM as it is (the guest powered
// off, QEMU paused) and Finalize may be run again: every step takes up
// where the last attempt stopped.
func (b *Back) Finalize(ctx context.Context, m *failover.Manager, opts FinalizeOptions) (Finalized, error) {
	run := b.Run
	vm := run.VM
	home, err := Home(run)
	if err != nil {
		return Finalized{}, err
	}
	if len(run.Home) == 0 {
		return Finalized{}, fmt.Errorf("vm %q: run %s was started by a lifeboat that kept no home generations on its overlays, so its writes cannot be folded into this site's chain without comparing whole disks: not built yet", vm, run.ID)
	}
	latest, ok, err := b.Store.Latest(vm)
	if err != nil || !ok {
		return Finalized{}, fmt.Errorf("vm %q: no latest point here: %v", vm, err)
	}
	fin := Finalized{Home: home, Stopped: time.Now()}
	if f := run.Finalizing; f != nil {
		// An earlier attempt got as far as production: only this site's
		// steps are left.
		if fin.Fold, err = b.Store.Point(vm, f.Fold); err != nil {
			return fin, err
		}
		fin.Last = lifeboat.Point{VM: vm, ID: f.Last}
		if fin, err = b.finish(ctx, m, fin, f.Generations); err != nil {
			return fin, err
		}
		return b.awaitHome(ctx, fin, opts.Wait), nil
	}
	fold, folded := b.folded(run, latest)
	if folded {
		// An earlier attempt folded the VM's last state, after its last
		// failback cycle: production holds it too, unless the VM ran again.
		if err := stillStopped(ctx, run); err != nil {
			return fin, err
		}
		wrote, why := writtenSince(ctx, run, fold)
		_, _, held, err := b.prepare(ctx)
		switch {
		case IsFinished(err) && wrote:
			return fin, fmt.Errorf("vm %q: production finished its failback with fold point %d, and the recovered VM wrote here since (%s): those writes cannot reach production any more. Not built yet: bringing them home; the VM is stopped (paused) here", vm, fold.ID, why)
		case err != nil && !IsFinished(err):
			return fin, fmt.Errorf("%w; the recovered VM is stopped (paused): run the finalize again", err)
		case err == nil && why != "":
			// The VM ran again after the fold (the operator resumed the
			// service here meanwhile), or nothing proves it did not: the
			// old fold is not its state any more. Stopped again, it takes
			// a last cycle and a new fold on top of the old one.
			b.Log.Warn("finalize: the recovered VM may have written since the earlier fold: a last failback cycle and a new fold", "vm", vm, "fold", fold.ID, "why", why)
			folded, latest = false, fold
		default:
			fin.Fold, fin.ShutDown = fold, fold.Consistency == lifeboat.Filesystem
			if err == nil {
				fin.Last = held
			}
		}
	}
	if !folded {
		timeout := opts.ShutdownTimeout
		if timeout <= 0 {
			timeout = protect.DefaultShutdownTimeout
		}
		fin.Stopped = time.Now()
		if run.Domain != "" {
			// libvirt ends QEMU when its guest powers off: the guest is
			// frozen and paused instead, as for a planned migration.
			fin.ShutDown, err = protect.PauseDomain(ctx, vm, protect.LibvirtDomain{URI: run.Libvirt, Domain: run.Domain}, b.Log)
		} else {
			fin.ShutDown, err = protect.ShutDown(ctx, vm, run.QMP, run.Agent, timeout, b.Log)
		}
		if err != nil {
			return fin, fmt.Errorf("vm %q: stopping the recovered VM: %w", vm, err)
		}
		b.Log.Warn("finalize: the recovered VM is stopped; its last cycles", "vm", vm, "shut_down", fin.ShutDown)
		if fin.Last, err = b.Cycle(ctx); err != nil {
			return fin, fmt.Errorf("%w; the recovered VM is stopped (paused): run the finalize again", err)
		}
		if fin.Fold, err = b.fold(ctx, latest, fin.ShutDown); err != nil {
			return fin, fmt.Errorf("vm %q: folding its last state into this site's chain: %w; the recovered VM is stopped (paused): run the finalize again", vm, err)
		}
	}
	gens, err := b.Client.FinishFailback(ctx, vm, fin.Last.ID, fin.Fold)
	if IsNotHeld(err) {
		// Production's disks may have been written since the last failback
		// point (its site let go of them meanwhile: a restart, a VM started
		// there): a failback cycle of the stopped VM makes them its state
		// again, the fold's.
		b.Log.Warn("finalize: production's disks may have been written since the last failback point: one more failback cycle", "vm", vm, "point", fin.Last.ID, "why", err)
		if fin.Last, err = b.Cycle(ctx); err != nil {
			return fin, fmt.Errorf("%w; the recovered VM is stopped (paused): run the finalize again", err)
		}
		gens, err = b.Client.FinishFailback(ctx, vm, fin.Last.ID, fin.Fold)
	}
	if err != nil {
		return fin, fmt.Errorf("%w; the recovered VM is stopped (paused): run the finalize again", err)
	}
	run.Finalizing = &failover.Finalizing{Last: fin.Last.ID, Fold: fin.Fold.ID, Generations: gens}
	if err := m.Record(run); err != nil {
		return fin, err
	}
	fin, err = b.finish(ctx, m, fin, gens)
	fin.Took = time.Since(fin.Stopped)
	if err != nil {
		return fin, err
	}
	return b.awaitHome(ctx, fin, opts.Wait), nil
}

// homePoll is how often awaitHome looks for production's first point.
const homePoll = 200 * time.Millisecond

// awaitHome waits, for at most wait, for the first point production sends
// after fin's handover (a point after the fold, from the VM's home), and
// notes it in fin. The VM is home whatever comes of the wait: a VM not
// started there in time is said, not failed.
func (b *Back) awaitHome(ctx context.Context, fin Finalized, wait time.Duration) Finalized {
	if wait <= 0 {
		return fin
	}
	vm := b.Run.VM
	b.Log.Info("finalize: waiting for the VM to run at its production site and replicate again", "vm", vm, "home", fin.Home, "for", wait)
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	t := time.NewTicker(homePoll)
	defer t.Stop()
	for {
		if p, ok, err := b.Store.Latest(vm); err == nil && ok && p.ID > fin.Fold.ID && p.Site == fin.Home {
			fin.Resumed, fin.Down = &p, p.Instant.Sub(fin.Stopped)
			b.Log.Warn("finalize: the VM runs at its production site again", "vm", vm, "home", fin.Home, "point", p.ID, "down", fin.Down.Round(time.Millisecond))
			return fin
		}
		if b.Progress != nil {
			b.Progress(protect.Progress{VM: vm, Point: fin.Fold.ID, Phase: "await"})
		}
		select {
		case <-wctx.Done():
			b.Log.Warn("finalize: the VM has not replicated from its production site within the wait: start it there", "vm", vm, "home", fin.Home, "waited", wait)
			return fin
		case <-t.C:
		}
	}
}

// finish is this site's last steps: production's generations recorded on
// the fold's point, the VM handed to production, the run ended.
func (b *Back) finish(ctx context.Context, m *failover.Manager, fin Finalized, gens map[string]string) (Finalized, error) {
	vm := b.Run.VM
	if err := b.Store.SetGenerations(vm, fin.Fold.ID, gens); err != nil {
		return fin, err
	}
	if err := m.Finish(ctx, b.Run, fin.Home); err != nil {
		return fin, err
	}
	if o, ok, err := b.Store.Owner(vm); err == nil && ok {
		fin.Epoch = o.Epoch
	}
	b.Log.Warn("failback finalized: the VM is its production site's again, which starts it; its next cycle continues this site's chain", "vm", vm, "home", fin.Home, "epoch", fin.Epoch, "fold", fin.Fold.ID)
	return fin, nil
}

// stillStopped checks that the recovered VM's CPUs have not run again since
// an earlier finalize stopped them: its writes since would be lost.
func stillStopped(ctx context.Context, run *failover.Run) error {
	if run.Domain != "" {
		return run.WithDomain(ctx, func(d *virt.Domain) error {
			running, err := d.Running(ctx)
			if err == nil && running {
				err = ranAgain(run.VM)
			}
			return err
		})
	}
	m, err := qemu.Dial(ctx, run.QMP)
	if err != nil {
		return fmt.Errorf("vm %q: the recovered VM's QMP: %w", run.VM, err)
	}
	defer m.Close()
	var st struct {
		Running bool `json:"running"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("vm %q: query-status: %w", run.VM, err)
	}
	if st.Running {
		return ranAgain(run.VM)
	}
	return nil
}

// writtenSince says whether the recovered VM may have written since fold
// was taken: why is empty only when every disk's generation that the fold
// started is there, consistent and clean (nothing written since); wrote is
// true when one of them shows writes. A libvirt domain's generations are
// checkpoints that libvirt keeps: they are not looked at, so nothing is
// proven there.
func writtenSince(ctx context.Context, run *failover.Run, fold lifeboat.Point) (wrote bool, why string) {
	if run.Domain != "" {
		return false, "a libvirt domain's checkpoints are not inspected"
	}
	m, err := qemu.Dial(ctx, run.QMP)
	if err != nil {
		return false, fmt.Sprintf("the recovered VM's QMP: %v", err)
	}
	defer m.Close()
	disks, err := m.Disks(ctx)
	if err != nil {
		return false, fmt.Sprintf("its disks: %v", err)
	}
	for _, d := range fold.Disks {
		n, _, err := qemu.FindDisk(disks, d.Name)
		if err != nil {
			return false, err.Error()
		}
		bm, ok := n.Bitmap(d.Generation)
		switch {
		case !ok:
			return false, fmt.Sprintf("disk %q has no generation %q of fold point %d", d.Name, d.Generation, fold.ID)
		case bm.Inconsistent:
			return false, fmt.Sprintf("disk %q: generation %q of fold point %d is inconsistent", d.Name, d.Generation, fold.ID)
		case bm.Count > 0:
			return true, fmt.Sprintf("disk %q: %d bytes written since fold point %d", d.Name, bm.Count, fold.ID)
		}
	}
	return false, ""
}

func ranAgain(vm string) error {
	return fmt.Errorf("vm %q runs here again since an earlier finalize folded its state: stop it (power it off in the guest, or pause it), then finalize again: a last failback cycle and a new fold then take what it wrote since", vm)
}

// finishedPhrase is how production refuses a failback it finished: the
// recovery site, finalizing again, learns from it that only its own steps are left.
const finishedPhrase = "was finished here"

// notHeldPhrase is how production refuses to finish (or reverse) a failback
// whose disks may have been written since the failback point they hold: a
// failback cycle makes them the recovered VM's again.
const notHeldPhrase = "is not failback point"

// IsNotHeld reports whether err is production's refusal to take its disks
// for the failback point they held (as it arrives through the wire).
func IsNotHeld(err error) bool { return err != nil && strings.Contains(err.Error(), notHeldPhrase) }

// IsFinished reports whether err is production's refusal of a failback it
// finished already (as it arrives through the wire).
func IsFinished(err error) bool { return err != nil && strings.Contains(err.Error(), finishedPhrase) }

// folded is the point an earlier finalize of run folded, if latest is it:
// a point after the failover's, written by this site itself, whose note
// names run (or, from a lifeboat whose folds named no run, taken after run
// started). The note decides where there is one: this site's clock may have
// stepped back since the failover, and the fold then seems to come first.
func (b *Back) folded(run *failover.Run, latest lifeboat.Point) (lifeboat.Point, bool) {
	if latest.ID <= run.Point || latest.Site != b.Site {
		return lifeboat.Point{}, false
	}
	if _, of, ok := strings.Cut(latest.Note, foldedFrom); ok {
		if of != run.ID {
			return lifeboat.Point{}, false
		}
	} else if latest.Instant.Before(run.Started) {
		return lifeboat.Point{}, false
	}
	return latest, true
}

// foldedFrom ends a fold point's note, before its run's id.
const foldedFrom = ", folded from run "

// fold writes the stopped recovered VM's state as a point of this site's
// chain after latest (the failover's point): a cycle out of the overlays'
// home generations into the store.
func (b *Back) fold(ctx context.Context, latest lifeboat.Point, shutDown bool) (lifeboat.Point, error) {
	run := b.Run
	// The failback cycles' work directory: its NBD socket is how a cycle
	// knows the server a killed one left in the VM's QEMU for its own.
	workDir := filepath.Join(run.Dir, "failback")
	if err := os.MkdirAll(workDir, 0o750); err != nil {
		return lifeboat.Point{}, err
	}
	_, refold := b.folded(run, latest)
	t := &foldTarget{store: b.Store, site: b.Site, run: run, latest: latest, refold: refold, shutDown: shutDown}
	p := &protect.Protector{VM: b.recovered(workDir), Target: t, Log: b.Log, Progress: b.Progress}
	pt, err := p.Cycle(ctx)
	if err != nil {
		return lifeboat.Point{}, err
	}
	for _, d := range pt.Disks {
		if d.Resync {
			// A home generation was missing or broken: the fold compared
			// hashes (the disk was read whole). Correct, but say so.
			b.Log.Warn("finalize: the fold resynchronised a disk by hashes", "vm", run.VM, "disk", d.Name)
		}
	}
	return pt, nil
}

// foldTarget is this site's own store as a protect.Target, for the fold: its
// latest point is seen as started by the overlays' home generations (which
// tracked every write since the failover's point), in this site's
// namespace. When the failover started from an earlier point than the
// latest, the blocks whose content differs between the two are the
// target's own changes (protect.ChangedTarget): the fold sends them too, as
// the recovered VM holds them, so that the new point is the VM's state and
// not the latest's where the VM left those blocks as they were.
//
// A fold on top of an earlier fold of the run (refold: the VM ran again
// after it) is an ordinary incremental cycle from that fold's point, whose
// generations it started on the overlays.
type foldTarget struct {
	store    *recovery.Store
	site     string
	run      *failover.Run
	latest   lifeboat.Point
	refold   bool
	shutDown bool
}

func (t *foldTarget) Peer() string { return t.site }

func (t *foldTarget) Latest(_ context.Context, vm string) (lifeboat.Point, bool, error) {
	p := t.latest
	if t.refold {
		return p, true, nil
	}
	p.Disks = nil
	for _, d := range t.latest.Disks {
		if g, ok := t.run.Home[d.Name]; ok {
			d.Generation = g
		}
		p.Disks = append(p.Disks, d)
	}
	return p, true, nil
}

func (t *foldTarget) BlockMap(_ context.Context, vm, disk string) (map[int64]lifeboat.Hash, error) {
	return t.store.BlockMap(vm, disk, t.latest.ID)
}

// TargetChanged is what the latest point changed after the failover's (an
// earlier fold of the run holds the VM's own state: nothing).
func (t *foldTarget) TargetChanged(_ context.Context, vm, disk string, fn func(off, length int64) error) error {
	if t.latest.ID == t.run.Point || t.refold {
		return nil
	}
	from, err := t.store.BlockMap(vm, disk, t.run.Point)
	if err != nil {
		return fmt.Errorf("vm %q disk %q: the failover's point %d: %w", vm, disk, t.run.Point, err)
	}
	latest, err := t.store.BlockMap(vm, disk, t.latest.ID)
	if err != nil {
		return fmt.Errorf("vm %q disk %q: the latest point %d: %w", vm, disk, t.latest.ID, err)
	}
	return Differing(from, latest, fn)
}

// Begin opens the point in the store. The store checks that a delta comes
// from the generation its latest point started, the owner's: this delta
// comes from the home generation started at the same instant instead
// (Latest), which this site vouches for, so the point names the owner's.
func (t *foldTarget) Begin(ctx context.Context, p lifeboat.Point) (lifeboat.PointSink, error) {
	owner := map[string]string{}
	for _, d := range t.latest.Disks {
		owner[d.Name] = d.Generation
	}
	for i := range p.Disks {
		if !p.Disks[i].Resync {
			p.Disks[i].BaseGeneration = owner[p.Disks[i].Name]
		}
	}
	p.Site = t.site
	p.Definition = t.latest.Definition // the VM's own, not the recovered QEMU's
	p.Consistency, p.Note = lifeboat.Crash, fmt.Sprintf("failback: the recovered VM's last state, its CPUs stopped (it did not power off)%s%s", foldedFrom, t.run.ID)
	if t.shutDown {
		p.Consistency, p.Note = lifeboat.Filesystem, fmt.Sprintf("failback: the recovered VM's last state, powered off cleanly%s%s", foldedFrom, t.run.ID)
	}
	w, err := wire.RecoveryStore(t.store).BeginPoint(ctx, p)
	if err != nil {
		return nil, err
	}
	return &localSink{ctx: ctx, w: w}, nil
}

func (t *foldTarget) Failover(context.Context, string, uint64) (wire.FailoverResult, error) {
	return wire.FailoverResult{}, errors.New("a fold writes into this site's own store: it starts no VM")
}

// localSink is a point writer of this site's store as a lifeboat.PointSink.
type localSink struct {
	ctx context.Context
	w   wire.PointWriter
}

func (s *localSink) SendBlocks(disk string, off int64, data []byte, hashes []lifeboat.Hash) (int64, error) {
	return int64(len(data)), s.w.WriteBlocks(s.ctx, disk, off, data, hashes)
}

// SendPatch writes a block's changed parts, as the wire's receiver does.
func (s *localSink) SendPatch(disk string, off int64, block []byte, h lifeboat.Hash, dirty lifeboat.Dirty) (int64, error) {
	parts := dirty.Gather(nil, block)
	return int64(len(parts)), s.w.WritePatch(s.ctx, disk, off, dirty, parts, lifeboat.HashBlock(parts), h)
}

// SendCopy waits, as the wire's server does, for a source block whose
// write another reader has under way.
func (s *localSink) SendCopy(disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.w.CopyBlock(s.ctx, disk, off, srcDisk, srcOff, length, h)
		if !errors.Is(err, lifeboat.ErrSourcePending) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-s.ctx.Done():
			return s.ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (s *localSink) SendZeroes(disk string, off, length int64) error {
	return s.w.WriteZeroes(s.ctx, disk, off, length)
}

func (s *localSink) Commit(stats lifeboat.CycleStats) (lifeboat.Point, error) {
	return s.w.Commit(s.ctx, stats)
}

func (s *localSink) Abort() {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(s.ctx), 30*time.Second)
	defer cancel()
	s.w.Abort(ctx)
}

var _ protect.ChangedTarget = (*foldTarget)(nil)

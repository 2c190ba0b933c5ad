// Package failover runs a VM at the recovery site from one of its points:
// a writable overlay above the point's image (nothing copied, so the time
// to a running QEMU does not depend on the disk's size), qemu-system started
// from the definition the point carries, a persistent dirty bitmap on each
// overlay from the first instant (what a failback sends home). A real
// failover takes the VM's ownership for the recovery site under a new
// epoch, so the production site is refused from then on; a test leaves
// ownership and replication alone and isolates the VM's network. Retention
// merges none of the VM's points while a run reads them (recovery.Pin).
package failover

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/virt"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Bitmap is the dirty bitmap each overlay carries from the run's first
// instant: every block the recovered VM writes.
const Bitmap = "lifeboat-failover"

// Manager starts and ends runs at one recovery site.
type Manager struct {
	Store *recovery.Store
	// Dir holds one directory per run (state_dir/failover).
	Dir string
	// Site is this recovery site's name: the owner a real failover records.
	Site string
	// Networks maps a production network (a definition's NIC network) to a
	// bridge here. A NIC on a network not in it is isolated.
	Networks map[string]string
	Log      *slog.Logger
	// QEMU is the qemu-system binary (default qemu-system-x86_64).
	QEMU string
	// LastContact says when a VM's production site last called about it
	// (wire.Server.LastContact); a real failover within ContactWindow
	// (DefaultContactWindow) of it is refused unless forced: that site is
	// probably still running the VM. nil: no check.
	LastContact   func(vm string) wire.Contact
	ContactWindow time.Duration
	// CommitAfter, when set, commits a real failover left undecided that
	// long (Zerto's auto-commit): the VM keeps running here, and retention,
	// which waits while a failover may still be undone, goes on. 0 waits
	// for `--commit` or `--undo` however long it takes.
	CommitAfter time.Duration
	// Overrides change, per VM, what its definition says of its CPUs and
	// memory, for a failover here.
	Overrides map[string]Override
	// starting holds the VMs whose real failover is under way, so that two
	// at once (two commands, a plan and a command) cannot both pass the
	// check that none runs.
	mu       sync.Mutex
	starting map[string]bool
	// plans are the plans running now, by name: one run of a plan at a
	// time, and StopPlan ends a drill under way before its runs.
	plans map[string]*planRun
	// commits are the undecided real failovers' commit deadlines as this
	// process measures them, by run ID (CommitDue).
	commits map[string]commitClock
	// ending are the runs Stop is ending, by run ID: a commit of one is
	// refused, and so is a second stop.
	ending map[string]bool

	// Libvirt, when set, is the libvirtd (URI) that runs VMs whose points
	// carry a libvirt domain's XML: they start as domains of it. Other VMs
	// run under qemu-system as always.
	Libvirt string
}

// Override is what the recovery site changes of a VM's definition.
type Override struct {
	CPUs      int
	MemoryMiB int64
}

// Options says which point and how.
type Options struct {
	Point uint64 // 0: the latest
	// Before, with no Point, takes the latest point taken at or before it
	// (a plan's VMs all from before a time: an attack, a bad deploy).
	Before time.Time
	Test   bool
	Plan   string // the recovery plan starting the run, if any
	// Force fails over even when the production site was in contact within
	// the contact window (it is known to be lost, or fenced).
	Force bool
	// Planned: the owner asked, having shut the VM down (no split-brain check).
	Planned bool
	// AcceptDamage starts the VM even from a point an image of which was cut
	// short since it was written, whose lost clusters QEMU reads as zeros,
	// or that reads a block a verify found damaged
	// (recovery.Store.CheckImages): a last resort, logged.
	AcceptDamage bool
}

// Run is one VM started from a point.
type Run struct {
	ID      string    `json:"id"`
	VM      string    `json:"vm"`
	Point   uint64    `json:"point"`
	Instant time.Time `json:"instant"` // the point's
	Test    bool      `json:"test"`
	Plan    string    `json:"plan,omitempty"`
	Started time.Time `json:"started"`
	Dir     string    `json:"dir"`
	PID     int       `json:"pid"`
	QMP     string    `json:"qmp"`
	Agent   string    `json:"agent"`
	Console string    `json:"console"`
	// Overlays are the VM's writable images, by disk name, above the point's.
	Overlays map[string]string `json:"overlays"`
	// Generations are the dirty bitmaps on the overlays, by disk name,
	// started as the VM resumed from the point: each is a generation of the
	// disk's lineage for the site that owned the VM (lifeboat.NewGeneration),
	// what a failback to that site reads; Bitmap where the point names no
	// lineage or the VM had no owner. A libvirt domain's overlays carry the
	// checkpoint Bitmap instead, and no Generations.
	Generations map[string]string `json:"generations,omitempty"`
	// Home are the overlays' bitmaps in this site's own namespace, by disk
	// name, started with Generations but never rotated by a failback
	// cycle: every write since the VM resumed here, what a failback's
	// finalize folds into this site's chain of points (a real failover
	// from a point with lineages only).
	Home map[string]string `json:"home,omitempty"`
	// Networks says where each NIC is.
	Networks []string `json:"networks,omitempty"`
	// CPUs and MemoryMiB are what the VM got here (its definition's, or
	// the site's override).
	CPUs      int   `json:"cpus,omitempty"`
	MemoryMiB int64 `json:"memory_mib,omitempty"`
	// Owner is the VM's owner under the run (a real failover: this site),
	// Previous the owner before it, to whom an undo hands the VM back.
	Owner    *recovery.Owner `json:"owner,omitempty"`
	Previous *recovery.Owner `json:"previous,omitempty"`
	// ToRunning is the time from the command to QEMU running the guest;
	// ToAgent to its guest agent answering (0: not yet, or never asked).
	ToRunning time.Duration `json:"to_running_ns"`
	ToAgent   time.Duration `json:"to_agent_ns,omitempty"`
	Committed bool          `json:"committed,omitempty"`
	// FailbackSince is when a failback to Previous began: its cycles
	// write this VM's state into production's disks, so an undo would hand
	// production disks that hold neither its own last state nor this VM's.
	FailbackSince time.Time `json:"failback_since,omitzero"`
	// CommitBy is when an undecided real failover commits itself (zero:
	// never; it waits for a decision).
	CommitBy time.Time `json:"commit_by,omitzero"`
	// Libvirt and Domain name the libvirtd and the domain the VM runs as,
	// when it runs under libvirt.
	Libvirt string `json:"libvirt,omitempty"`
	Domain  string `json:"domain,omitempty"`
	// Finalizing is a failback finalize's progress, once production's disks
	// took the VM's last state and started the generations that continue
	// this site's chain from Fold: a repeated finalize goes on from there.
	Finalizing *Finalizing `json:"finalizing,omitempty"`
	// ImageDirs hold the point's images QEMU's user was let reach.
	ImageDirs []string `json:"image_dirs,omitempty"`
	// Reverse is set once the VM, failed over for good, is protected from
	// here back to its old production site (`lifeboat protect VM --reverse`).
	Reverse *Reverse `json:"reverse,omitempty"`

	disks []lifeboat.DefinitionDisk
}

// Reverse is a run's protection in reverse (Run.Reverse).
type Reverse struct {
	Peer     string        `json:"peer"`     // the old production site, which keeps the VM's points now
	Point    uint64        `json:"point"`    // its first point there: the disks it had, adopted
	Interval time.Duration `json:"interval"` // how often a cycle runs
	Since    time.Time     `json:"since"`
}

// Finalizing is what a failback finalize did at production (Run.Finalizing).
type Finalizing struct {
	Last        uint64            `json:"last"` // the failback point production's disks hold
	Fold        uint64            `json:"fold"` // the same state, a point of this site's chain
	Generations map[string]string `json:"generations"`
}

// Record saves r's record (after a change of Finalizing).
func (m *Manager) Record(r *Run) error { return m.save(r) }

func (r *Run) pidFile() string    { return filepath.Join(r.Dir, "qemu.pid") }
func (r *Run) recordFile() string { return filepath.Join(r.Dir, "run.json") }

// place gives run r (its ID set) its directory and the files QEMU makes there.
func (m *Manager) place(r *Run) {
	r.Dir = filepath.Join(m.Dir, r.ID)
	r.QMP, r.Agent, r.Console = filepath.Join(r.Dir, "qmp.sock"), filepath.Join(r.Dir, "qga.sock"), filepath.Join(r.Dir, "console.log")
}

// Kind names the run for messages: "failover" or "test failover".
func (r *Run) Kind() string {
	if r.Test {
		return "test failover"
	}
	return "failover"
}

func (m *Manager) log() *slog.Logger {
	if m.Log != nil {
		return m.Log
	}
	return slog.Default()
}

// Start starts vm from a point. For a real failover (not opts.Test) the
// recovery site takes the VM's ownership just before the guest's first
// instruction: a VM that cannot be started leaves ownership where it was.
// It returns once QEMU runs the guest; WaitAgent waits for its agent.
func (m *Manager) Start(ctx context.Context, vm string, opts Options) (_ *Run, err error) {
	begin := time.Now()
	pt, err := m.point(vm, opts.Point, opts.Before)
	if err != nil {
		return nil, err
	}
	if pt.Definition == nil {
		return nil, fmt.Errorf("vm %q point %d carries no VM definition, so lifeboat cannot tell how to start it: "+
			"points carry one when the protected site reads it from the VM's qemu-system or libvirt, or from `definition:` in the VM's config there", vm, pt.ID)
	}
	d := *pt.Definition // the catalog's stays as the point carries it
	def := &d
	if o, ok := m.Overrides[vm]; ok {
		def.CPUs = cmp.Or(o.CPUs, def.CPUs)
		def.MemoryMiB = cmp.Or(o.MemoryMiB, def.MemoryMiB)
	}
	if !opts.Test && !opts.Force && !opts.Planned {
		if err := m.checkContact(vm); err != nil {
			return nil, err
		}
	}
	if !opts.Test {
		m.mu.Lock()
		if m.starting[vm] {
			m.mu.Unlock()
			return nil, fmt.Errorf("vm %q: another failover of it is starting here now: wait for it (`lifeboat failover --list`)", vm)
		}
		if m.starting == nil {
			m.starting = map[string]bool{}
		}
		m.starting[vm] = true
		m.mu.Unlock()
		defer func() {
			m.mu.Lock()
			delete(m.starting, vm)
			m.mu.Unlock()
		}()
		runs, err := m.Runs(vm)
		if err != nil {
			return nil, err
		}
		for _, r := range runs {
			if !r.Test {
				return nil, fmt.Errorf("vm %q already runs here from point %d (failover %s since %s): stop it first with `lifeboat failover %s --undo`",
					vm, r.Point, r.ID, r.Started.Format(time.RFC3339), vm)
			}
		}
	}
	files := []string{def.Kernel, def.Initrd}
	if fw := biosOf(def); filepath.IsAbs(fw) {
		files = append(files, fw) // else a name QEMU finds in its data directory
	}
	for _, name := range files {
		if name == "" {
			continue
		}
		if _, err := os.Stat(name); err != nil {
			return nil, fmt.Errorf("vm %q boots from %s, which is not here: %w (copy it from the protected host, or fix `definition:` in the VM's config)", vm, name, err)
		}
	}
	r := &Run{VM: vm, Point: pt.ID, Instant: pt.Instant, Test: opts.Test, Plan: opts.Plan, Started: begin.UTC(), Overlays: map[string]string{},
		CPUs: max(def.CPUs, 1), MemoryMiB: cmp.Or(def.MemoryMiB, 1024)}
	kind := "failover"
	if opts.Test {
		kind = "test"
	}
	r.ID = fmt.Sprintf("%s-%d-%s-%s", vm, pt.ID, kind, nonce())
	m.place(r)
	if len(r.QMP) > 100 {
		return nil, fmt.Errorf("vm %q: the run's sockets would be under %s, too long a path for a unix socket: give the recovery site a shorter state_dir", vm, r.Dir)
	}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("vm %q: %w", vm, err)
	}
	log := m.log().With("vm", vm, "point", pt.ID, "run", r.ID)
	pinned := false
	defer func() {
		if err == nil {
			return
		}
		m.kill(r)
		if r.Owner != nil && r.Previous != nil && r.Previous.Site != "" {
			// It took the VM over but did not start: hand it back.
			if _, herr := m.Store.Handover(vm, r.Previous.Site); herr != nil {
				log.Error("handing back a VM whose failover did not start", "site", r.Previous.Site, "err", herr)
			}
		}
		if pinned {
			if perr := m.Store.RemovePin(vm, r.ID); perr != nil {
				log.Error("removing the pin of a run that did not start", "err", perr)
			}
		}
		os.RemoveAll(r.Dir)
	}()
	if err := m.Store.AddPin(ctx, vm, r.ID, recovery.Pin{Point: pt.ID, Reason: r.Kind(), Since: r.Started}); err != nil {
		return nil, err
	}
	pinned = true
	if err := m.Store.CheckImages(vm, pt.ID); err != nil {
		if !opts.AcceptDamage {
			return nil, fmt.Errorf("%w (to start it all the same, reading the damage: --accept-damage)", err)
		}
		log.Warn("starting from a point with a damaged image, as asked (--accept-damage): the guest reads the damage (zeros where a file was cut)", "err", err)
	}
	r.disks = disksOf(pt, def)
	for _, d := range r.disks {
		base, err := m.Store.ImagePath(vm, pt.ID, d.Name)
		if err != nil {
			return nil, err
		}
		ov := filepath.Join(r.Dir, "disk-"+strconv.Itoa(len(r.Overlays))+".qcow2")
		if err := qemu.CreateImage(ctx, ov, "qcow2", 0, base, "qcow2"); err != nil {
			return nil, fmt.Errorf("vm %q disk %q: overlay above point %d: %w", vm, d.Name, pt.ID, err)
		}
		if err := os.Chmod(ov, 0o600); err != nil { // what the recovered VM writes is its own
			return nil, fmt.Errorf("vm %q disk %q: %w", vm, d.Name, err)
		}
		r.Overlays[d.Name] = ov
	}
	for _, n := range def.NICs {
		r.Networks = append(r.Networks, fmt.Sprintf("%s %s: %s", nicModel(n.Model), n.MAC, networkOf(n, r.Test, m.Networks)))
	}
	if m.Libvirt != "" && def.DomainXML != "" {
		var dirs []string
		for _, d := range r.disks {
			img, err := m.Store.ImagePath(vm, pt.ID, d.Name)
			if err != nil {
				return nil, err
			}
			dirs = append(dirs, filepath.Dir(img))
		}
		if err := m.startDomain(ctx, r, pt, def, dirs); err != nil {
			return nil, err
		}
	} else {
		if err := m.nameGenerations(r, pt); err != nil {
			return nil, err
		}
		if err := m.startQEMU(ctx, r, def); err != nil {
			return nil, err
		}
	}
	if !opts.Test {
		now, before, err := m.Store.TakeOver(vm, m.Site, pt.ID)
		if err != nil {
			return nil, err
		}
		r.Owner, r.Previous = &now, &before
		if m.CommitAfter > 0 {
			r.CommitBy = r.Started.Add(m.CommitAfter)
		}
		log.Warn("vm failed over: this recovery site owns it now; its protected site is refused", "epoch", now.Epoch, "previous_owner", before.Site)
	}
	if err := m.save(r); err != nil {
		return nil, err
	}
	if !r.CommitBy.IsZero() {
		m.mu.Lock()
		m.commitClock()[r.ID] = commitClock{seen: begin, left: m.CommitAfter}
		m.mu.Unlock()
	}
	if err := m.resume(ctx, r); err != nil {
		return nil, fmt.Errorf("vm %q: starting the guest's CPUs: %w", vm, err)
	}
	r.ToRunning = time.Since(begin)
	if err := m.save(r); err != nil {
		return nil, err
	}
	log.Info("vm started from its point", "kind", r.Kind(), "to_running", r.ToRunning, "point_age", time.Since(pt.Instant).Round(time.Second))
	return r, nil
}

// startQEMU starts r's VM, paused, under qemu-system, a dirty bitmap on
// each overlay.
func (m *Manager) startQEMU(ctx context.Context, r *Run, def *lifeboat.Definition) error {
	vm := r.VM
	args, err := qemuArgs(vm, def, r, m.Networks)
	if err != nil {
		return err
	}
	bin := m.QEMU
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // the VM outlives lifeboat
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vm %q: starting %s from point %d: %w: %s", vm, bin, r.Point, err, strings.TrimSpace(string(out)))
	}
	if r.PID, err = readPID(r.pidFile()); err != nil {
		return fmt.Errorf("vm %q: %w", vm, err)
	}
	mon, err := qemu.Dial(ctx, r.QMP)
	if err != nil {
		return fmt.Errorf("vm %q: the started VM's QMP: %w", vm, err)
	}
	defer mon.Close()
	for i := range r.disks {
		names := []string{r.generation(r.disks[i].Name)}
		if h, ok := r.Home[r.disks[i].Name]; ok {
			names = append(names, h)
		}
		for _, name := range names {
			if err := mon.AddBitmap(ctx, "lb-d"+strconv.Itoa(i), name, true, false); err != nil {
				return fmt.Errorf("vm %q disk %q: change tracking on the overlay: %w", vm, r.disks[i].Name, err)
			}
		}
	}
	return nil
}

// nameGenerations names the generation each overlay gets (Run.Generations).
func (m *Manager) nameGenerations(r *Run, pt lifeboat.Point) error {
	owner, ok, err := m.Store.Owner(r.VM)
	if err != nil {
		return fmt.Errorf("vm %q: its owner: %w", r.VM, err)
	}
	if !ok || owner.Site == "" || owner.Site == m.Site {
		return nil
	}
	r.Generations = map[string]string{}
	if !r.Test {
		r.Home = map[string]string{}
	}
	for _, d := range pt.Disks {
		if d.Lineage != "" {
			r.Generations[d.Name] = lifeboat.NewGeneration(owner.Site, d.Lineage, pt.ID)
			if !r.Test {
				r.Home[d.Name] = lifeboat.NewGeneration(m.Site, d.Lineage, pt.ID)
			}
		}
	}
	return nil
}

// generation is the bitmap the overlay of disk carries.
func (r *Run) generation(disk string) string {
	if g, ok := r.Generations[disk]; ok {
		return g
	}
	return Bitmap
}

// resume runs the paused guest's CPUs.
func (m *Manager) resume(ctx context.Context, r *Run) error {
	if r.Domain != "" {
		return resumeDomain(ctx, r)
	}
	mon, err := qemu.Dial(ctx, r.QMP)
	if err != nil {
		return err
	}
	defer mon.Close()
	return mon.Execute(ctx, "cont", nil, nil)
}

// WaitAgent waits, within ctx, until the run's guest agent answers, and
// records how long it took from the command.
func (m *Manager) WaitAgent(ctx context.Context, r *Run) error {
	if r.Domain != "" {
		if err := waitDomainAgent(ctx, r); err != nil {
			return fmt.Errorf("vm %q (%s of point %d, libvirt domain %q): the guest agent did not answer within the wait: %w (its console: %s)", r.VM, r.Kind(), r.Point, r.Domain, err, r.Console)
		}
		return m.answered(r)
	}
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		a, err := qga.Dial(actx, r.Agent)
		if err == nil {
			err = a.Ping(actx)
			a.Close()
		}
		cancel()
		if err == nil {
			return m.answered(r)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vm %q (%s of point %d): the guest agent did not answer within the wait: %w (its console: %s)", r.VM, r.Kind(), r.Point, context.Cause(ctx), r.Console)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// answered records that r's guest agent answered now.
func (m *Manager) answered(r *Run) error {
	r.ToAgent = time.Since(r.Started)
	if r.Test {
		// The point boots: `points` says when it was last proven so.
		mark := lifeboat.TestMark{At: time.Now(), Run: r.ID, ToRunning: r.ToRunning, ToAgent: r.ToAgent}
		if err := m.Store.MarkTested(r.VM, r.Point, mark); err != nil {
			m.log().Warn("could not mark the point tested", "vm", r.VM, "point", r.Point, "err", err)
		}
	}
	return m.save(r)
}

// Stop ends a run: QEMU quits (killed if it does not), its overlays are
// deleted, the pin goes. Ending a real failover is an undo: the VM is
// handed back to the owner it had, under a new epoch, and its protected
// site replicates it again from its latest point, incrementally.
func (m *Manager) Stop(ctx context.Context, r *Run) error {
	log := m.log().With("vm", r.VM, "point", r.Point, "run", r.ID)
	m.mu.Lock()
	if m.ending[r.ID] {
		m.mu.Unlock()
		return fmt.Errorf("vm %q: run %s is being ended already (`lifeboat failover --list`)", r.VM, r.ID)
	}
	if m.ending == nil {
		m.ending = map[string]bool{}
	}
	m.ending[r.ID] = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.ending, r.ID)
		m.mu.Unlock()
	}()
	// The record as it is now: a commit (Commit) may have kept the
	// failover since the caller read it, and none can from here on. A
	// record gone is a run ended already: what is left of it goes.
	if err := m.reload(r); err != nil && !errors.Is(err, errRunEnded) {
		return err
	}
	if r.Committed && !r.Test {
		return fmt.Errorf("vm %q: the failover from point %d was committed: the VM runs here for good, and an undo would throw away what it wrote since; shut it down in the guest if it must stop, and fail it back to bring it home", r.VM, r.Point)
	}
	if !r.Test && !r.FailbackSince.IsZero() {
		return fmt.Errorf("vm %q: a failback to %q began at %s: its cycles write this VM's state into production's disks over production's own writes after the last point it sent (and a cycle cut short leaves them part old, part new), so an undo would hand production disks that hold neither its state nor this VM's. Bring the VM home with `lifeboat failback %s --finalize`: production's disks then equal this VM's. To give up what the VM wrote here instead, production's disks would first have to be restored from a copy of their own, which lifeboat does not keep",
			r.VM, r.Previous.Site, r.FailbackSince.UTC().Format(time.RFC3339), r.VM)
	}
	if err := m.quit(ctx, r); err != nil {
		return err
	}
	if !r.Test && r.Previous != nil && r.Previous.Site != "" {
		o, err := m.Store.Handover(r.VM, r.Previous.Site)
		if err != nil {
			return err
		}
		log.Warn("failover undone: the vm is handed back", "site", o.Site, "epoch", o.Epoch)
	}
	if err := m.Store.RemovePin(r.VM, r.ID); err != nil {
		return err
	}
	if err := os.RemoveAll(r.Dir); err != nil {
		return fmt.Errorf("vm %q: removing run %s: %w", r.VM, r.ID, err)
	}
	log.Info("run ended", "kind", r.Kind())
	return nil
}

// Finish ends a real failover whose VM went home: a failback's finalize
// sent its last state to site, its production site, and folded it into this
// site's chain of points. QEMU here quits (the guest is shut down by then),
// the VM is handed to site under a new epoch, the run's pin and directory go.
func (m *Manager) Finish(ctx context.Context, r *Run, site string) error {
	if r.Test {
		return fmt.Errorf("vm %q: run %s is a test: it has no home to go to (end it with --test --stop)", r.VM, r.ID)
	}
	if err := m.quit(ctx, r); err != nil {
		return err
	}
	o, ok, err := m.Store.Owner(r.VM)
	if err != nil {
		return err
	}
	if !ok || o.Site != site || o.FailedOver { // else handed over by an attempt that stopped after it
		if o, err = m.Store.Handover(r.VM, site); err != nil {
			return err
		}
	}
	if err := m.Store.RemovePin(r.VM, r.ID); err != nil {
		return err
	}
	if err := os.RemoveAll(r.Dir); err != nil {
		return fmt.Errorf("vm %q: removing run %s: %w", r.VM, r.ID, err)
	}
	m.log().Warn("failback finished: the vm is home", "vm", r.VM, "site", o.Site, "epoch", o.Epoch, "run", r.ID)
	return nil
}

// Commit keeps a real failover: an undo is no longer offered.
func (m *Manager) Commit(r *Run) error {
	if r.Test {
		return fmt.Errorf("vm %q: run %s is a test, which is never kept: end it with --test --stop", r.VM, r.ID)
	}
	// Under m.mu, so that a Stop either began before (the commit is
	// refused) or reads the record after it (and refuses the undo).
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ending[r.ID] {
		return fmt.Errorf("vm %q: its failover from point %d (run %s) is being undone: there is nothing left to commit; once the undo has ended, `lifeboat failover %s` starts it here again", r.VM, r.Point, r.ID, r.VM)
	}
	if err := m.reload(r); err != nil {
		return err
	}
	r.Committed = true
	return m.save(r)
}

// errRunEnded is wrapped by reload's error for a run whose record is gone.
var errRunEnded = errors.New("the run has ended")

// reload reads r's record again into r: another command may have changed
// it (a commit), or ended the run, since the caller read it.
func (m *Manager) reload(r *Run) error {
	b, err := os.ReadFile(r.recordFile())
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vm %q: run %s has ended (`lifeboat failover --list` lists the runs): %w", r.VM, r.ID, errRunEnded)
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, r); err != nil {
		return fmt.Errorf("run %s: its record is corrupt: %w", r.ID, err)
	}
	return nil
}

// commitClock is how long an undecided failover had left before it commits
// itself when this process first saw it, and when that was, with the
// monotonic clock's reading: the wall clock can step (an NTP step after a
// recovery host's boot, `date -s`), and a step forward committed every
// undecided failover at once, after which it can no longer be undone.
type commitClock struct {
	seen time.Time
	left time.Duration
}

// commitClock is m.commits, made; m.mu is held.
func (m *Manager) commitClock() map[string]commitClock {
	if m.commits == nil {
		m.commits = map[string]commitClock{}
	}
	return m.commits
}

// CommitDue commits every real failover that is still undecided and whose
// CommitBy has passed, and returns them. now is the wall clock's time: a
// run this process did not start (the site restarted since) has what its
// recorded CommitBy leaves at now; from then on, and for a run it
// started, time is measured by the monotonic clock, which no step moves.
func (m *Manager) CommitDue(now time.Time) ([]*Run, error) {
	runs, err := m.Runs("")
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	clocks := m.commitClock()
	due := map[string]bool{}
	for _, r := range runs {
		if r.Test || r.Committed || r.CommitBy.IsZero() {
			continue
		}
		c, ok := clocks[r.ID]
		if !ok {
			c = commitClock{seen: time.Now(), left: r.CommitBy.Sub(now)}
			clocks[r.ID] = c
		}
		due[r.ID] = time.Since(c.seen) >= c.left
	}
	for id := range clocks {
		if _, ok := due[id]; !ok {
			delete(clocks, id) // decided, or gone
		}
	}
	m.mu.Unlock()
	var out []*Run
	var errs []error
	for _, r := range runs {
		if !due[r.ID] {
			continue
		}
		if err := m.Commit(r); err != nil {
			errs = append(errs, fmt.Errorf("vm %q: committing failover %s: %w", r.VM, r.ID, err))
			continue
		}
		m.log().Warn("failover committed by the commit policy: nobody decided within commit_after", "vm", r.VM, "point", r.Point, "run", r.ID, "started", r.Started)
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// Runs lists vm's runs (every VM's for ""), oldest first.
func (m *Manager) Runs(vm string) ([]*Run, error) {
	ents, err := os.ReadDir(m.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*Run
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(m.Dir, e.Name(), "run.json"))
		if errors.Is(err, os.ErrNotExist) {
			continue // a run that never started
		}
		if err != nil {
			return nil, err
		}
		var r Run
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("run %s: its record is corrupt: %w", e.Name(), err)
		}
		if vm == "" || r.VM == vm {
			out = append(out, &r)
		}
	}
	return out, nil
}

// ReleaseCrashedStarts ends the starts that a stop of lifeboat cut short.
// Start pins the VM before it makes the overlays and starts QEMU, and
// records the run (run.json) only once QEMU is there, paused before the
// guest's first instruction: a lifeboat killed in between leaves a pin that
// no run names, which nothing else removes, so retention would wait for
// good. Such a start's QEMU, if it is still there before the guest's first
// instruction, is killed (as Start does on a failure), its directory deleted
// and its pin removed. A QEMU of it whose guest has run, or a libvirt domain
// of it that still exists, reads the point's chain: its pin stays, and the
// error says what to do. The daemon calls it as it starts, before any Start.
func (m *Manager) ReleaseCrashedStarts(ctx context.Context) error {
	vms, err := m.Store.VMs()
	if err != nil {
		return err
	}
	var errs []error
	for _, vm := range vms {
		pins, err := m.Store.Pins(vm)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for id, pin := range pins {
			r := &Run{ID: id, VM: vm, Point: pin.Point, Test: pin.Reason == (&Run{Test: true}).Kind()}
			m.place(r)
			if _, err := os.Stat(r.recordFile()); !errors.Is(err, os.ErrNotExist) {
				if err != nil {
					errs = append(errs, fmt.Errorf("vm %q: run %s: %w", vm, id, err))
				}
				continue // a run that started (or a record lifeboat cannot read)
			}
			if err := m.endCrashedStart(ctx, r); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := m.Store.RemovePin(vm, id); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := os.RemoveAll(r.Dir); err != nil {
				errs = append(errs, fmt.Errorf("vm %q: removing the directory of run %s: %w", vm, id, err))
			}
			what := "a failover start"
			if strings.HasPrefix(pin.Reason, "recovery plan ") {
				what = "a " + pin.Reason + "'s run" // its points chosen up front (planPoints)
			}
			m.log().Warn("released the pin of "+what+" that lifeboat did not finish (it stopped meanwhile); retention goes on",
				"vm", vm, "point", pin.Point, "pin", id, "since", pin.Since)
		}
	}
	return errors.Join(errs...)
}

// endCrashedStart stops what the cut-short start of r left running, if the
// guest never ran, and fails if something of it still reads the chain.
func (m *Manager) endCrashedStart(ctx context.Context, r *Run) error {
	what := fmt.Sprintf("vm %q: the %s %s from point %d, which lifeboat did not finish starting,", r.VM, r.Kind(), r.ID, r.Point)
	if doc, err := os.ReadFile(filepath.Join(r.Dir, "domain.xml")); err == nil {
		name, err := virt.DomainName(string(doc))
		if err != nil {
			return fmt.Errorf("%s left %s: %w", what, filepath.Join(r.Dir, "domain.xml"), err)
		}
		uri := cmp.Or(m.Libvirt, virt.DefaultURI)
		c, err := virt.Dial(ctx, uri)
		if err != nil {
			return fmt.Errorf("%s may have left libvirt domain %q, and libvirt at %s cannot be asked: %w; its pin stays, so retention waits", what, name, uri, err)
		}
		defer c.Close()
		if exists, err := c.Exists(ctx, name); err != nil || exists {
			return errors.Join(fmt.Errorf("%s left libvirt domain %q at %s, which may read the point's chain: its pin stays, so retention waits. "+
				"Remove the domain (`virsh -c %s destroy %s; virsh -c %s undefine %s`) and restart lifeboat to release it", what, name, uri, uri, name, uri, name), err)
		}
		return nil
	}
	pid, err := readPID(r.pidFile())
	if err != nil {
		return nil // no QEMU started
	}
	r.PID = pid
	if !r.Alive() || !r.ownsProcess() {
		return nil // gone, or the pid is another process's now
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var status struct {
		Status string `json:"status"`
	}
	mon, err := qemu.Dial(qctx, r.QMP)
	if err == nil {
		err = mon.Execute(qctx, "query-status", nil, &status)
		mon.Close()
	}
	if err != nil || status.Status != "prelaunch" {
		state := cmp.Or(status.Status, fmt.Sprintf("unknown (%v)", err))
		return fmt.Errorf("%s left QEMU pid %d, in state %s: its guest may have run, and it reads the point's chain, so its pin stays and retention waits. "+
			"If nothing should run from it, stop it (`kill %d`) and restart lifeboat to release the pin", what, pid, state, pid)
	}
	m.kill(r) // paused before the guest's first instruction: nothing of it is lost
	if r.Alive() {
		return fmt.Errorf("%s left QEMU pid %d, which does not die: its pin stays, so retention waits", what, pid)
	}
	return nil
}

// ownsProcess reports whether r.PID is the QEMU r's start ran: its command
// line names the run's pid file (a pid is reused once its process is gone).
func (r *Run) ownsProcess() bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", r.PID))
	return err == nil && strings.Contains(string(b), r.pidFile())
}

// Alive reports whether the run's QEMU still runs.
func (r *Run) Alive() bool {
	if r.PID <= 0 || syscall.Kill(r.PID, 0) != nil {
		return false
	}
	// A zombie (its parent, init in a container, has not reaped it) is gone.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.PID))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
		return false
	}
	return true
}

func (m *Manager) point(vm string, id uint64, before time.Time) (lifeboat.Point, error) {
	if id != 0 {
		return m.Store.Point(vm, id)
	}
	if !before.IsZero() {
		pts, err := m.Store.Points(vm)
		if err != nil {
			return lifeboat.Point{}, err
		}
		// The newest by id, the order points were taken in, as a plan
		// chooses: instants come from the protected site's wall clock,
		// which can step back, so a newer point may carry an older instant.
		var best *lifeboat.Point
		for i := range pts {
			if !pts[i].Instant.After(before) {
				best = &pts[i] // oldest first
			}
		}
		if best == nil {
			oldest := "it has none"
			if len(pts) > 0 {
				oldest = "its oldest is point " + strconv.FormatUint(pts[0].ID, 10) + " of " + instantText(pts[0].Instant)
			}
			return lifeboat.Point{}, fmt.Errorf("vm %q has no point taken at or before %s here (%s; `lifeboat points %s` lists them)", vm, instantText(before), oldest, vm)
		}
		return *best, nil
	}
	pt, ok, err := m.Store.Latest(vm)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if !ok {
		return lifeboat.Point{}, fmt.Errorf("vm %q has no point at this recovery site (`lifeboat points` lists what it has)", vm)
	}
	return pt, nil
}

// disksOf is how each of the point's disks is attached: as the definition
// says, in its order; a disk it does not name comes last, on virtio.
func disksOf(pt lifeboat.Point, def *lifeboat.Definition) []lifeboat.DefinitionDisk {
	var out []lifeboat.DefinitionDisk
	has := map[string]bool{}
	for _, pd := range pt.Disks {
		has[pd.Name] = true
	}
	seen := map[string]bool{}
	for _, d := range def.Disks {
		if has[d.Name] && !seen[d.Name] {
			out = append(out, d)
			seen[d.Name] = true
		}
	}
	for _, pd := range pt.Disks {
		if !seen[pd.Name] {
			out = append(out, lifeboat.DefinitionDisk{Name: pd.Name})
		}
	}
	return out
}

func (m *Manager) save(r *Run) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(r.recordFile(), b, 0o600)
}

// quit stops the run's QEMU: quit over QMP, then SIGKILL if it is still
// there after a bound.
func (m *Manager) quit(ctx context.Context, r *Run) error {
	if r.Domain != "" {
		qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := removeDomain(qctx, r); err != nil {
			return fmt.Errorf("vm %q: removing libvirt domain %q of run %s: %w", r.VM, r.Domain, r.ID, err)
		}
		return nil
	}
	if !r.Alive() {
		return nil
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if mon, err := qemu.Dial(qctx, r.QMP); err == nil {
		mon.Quit(qctx)
		mon.Close()
	}
	for r.Alive() {
		select {
		case <-qctx.Done():
			m.kill(r)
			return nil
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

func (m *Manager) kill(r *Run) {
	if r.Domain != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := removeDomain(ctx, r); err != nil {
			m.log().Error("removing the libvirt domain of a run", "vm", r.VM, "domain", r.Domain, "err", err)
		}
		return
	}
	if r.PID <= 0 {
		if pid, err := readPID(r.pidFile()); err == nil {
			r.PID = pid
		}
	}
	if r.PID > 0 {
		syscall.Kill(r.PID, syscall.SIGKILL)
		for i := 0; i < 100 && r.Alive(); i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("QEMU's pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("QEMU's pid file %s holds %q", path, b)
	}
	return pid, nil
}

func nonce() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

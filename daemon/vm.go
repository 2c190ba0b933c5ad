package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// peerReadyTimeout bounds how long a cycle waits for its recovery site to answer.
const peerReadyTimeout = 20 * time.Second

// vm is one protected VM: its schedule, its cycles (never two at once) and what
// status shows of it.
type vm struct {
	d   *Daemon
	cfg VMConfig
	p   *protect.Protector

	cycleMu       sync.Mutex    // one cycle at a time
	group         string        // the consistency group it belongs to, if any
	groupInterval time.Duration // its group's interval, if any

	mu       sync.Mutex
	state    string
	last     *lifeboat.Point
	lastErr  string
	errAt    time.Time
	progress *protect.Progress
	watchers map[chan protect.Progress]struct{}
	homing   bool // a failback has ended here and the VM is being brought back (home.go)

	reverse string // the failover run it is, when protected in reverse from here (reverse.go)

	quiesceMu sync.Mutex
	quiesce   protect.Quiescer // made once (v.quiescer), nil until then or under crash consistency

	unprotected *Unprotected // set by `lifeboat unprotect` (unprotect.go), guarded by mu
}

func newVM(d *Daemon, c VMConfig) *vm {
	v := &vm{d: d, cfg: c, state: "idle", watchers: map[chan protect.Progress]struct{}{}}
	v.p = &protect.Protector{
		VM: protect.VM{
			Name: c.Name, QMPSocket: c.QMP, NBDSocket: c.NBDSocket, Disks: c.Disks,
			WorkDir:    filepath.Join(d.cfg.StateDir, "protect", c.Name),
			StateDir:   d.cfg.StateDir,
			Definition: c.definition(),
		},
		Log:      d.log,
		Progress: v.onProgress,
	}
	if c.Libvirt != nil {
		v.p.VM.Libvirt = &protect.LibvirtDomain{URI: c.Libvirt.URI, Domain: c.Libvirt.Domain}
	}
	v.loadUnprotected()
	return v
}

func (v *vm) onProgress(p protect.Progress) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.progress = &p
	for ch := range v.watchers {
		select {
		case ch <- p:
		default: // a slow watcher misses a step, never blocks a cycle
		}
	}
}

// watch returns a channel of the VM's progress reports, and the function
// that ends it (closing the channel).
func (v *vm) watch() (chan protect.Progress, func()) {
	ch := make(chan protect.Progress, 16)
	v.mu.Lock()
	v.watchers[ch] = struct{}{}
	v.mu.Unlock()
	return ch, func() {
		// Closed under mu, where onProgress sends: a reader ranging over
		// ch ends (a group sync's, one per member; before, they waited
		// for good).
		v.mu.Lock()
		delete(v.watchers, ch)
		close(ch)
		v.mu.Unlock()
	}
}

// sync runs one cycle now; whole makes it send every disk whole, and the
// cycles after it until one commits (protect.Protector.Whole). An
// unprotected VM is protected again when resume is set (a user's `lifeboat
// sync`), and otherwise refused.
func (v *vm) sync(ctx context.Context, whole, resume bool) (lifeboat.Point, error) {
	v.cycleMu.Lock()
	defer v.cycleMu.Unlock()
	if v.isUnprotected() {
		if !resume {
			return lifeboat.Point{}, errUnprotected
		}
		if err := v.resume(); err != nil {
			return lifeboat.Point{}, err
		}
	}
	if whole {
		v.p.Whole = true
	}
	if v.reversedHere() {
		v.mu.Lock()
		defer v.mu.Unlock()
		return lifeboat.Point{}, errors.New(v.lastErr)
	}
	v.setState("syncing", nil)
	pt, err := v.cycle(ctx)
	v.d.metrics.cycle(v.cfg.Name, pt, err)
	v.mu.Lock()
	v.progress = nil
	v.mu.Unlock()
	if err != nil {
		if recovery.IsFailedOver(err) {
			v.mu.Lock()
			was := v.state
			v.mu.Unlock()
			v.setState(stateFailedOver, err)
			if was != stateFailedOver {
				v.d.log.Warn("vm was failed over at its recovery site: replication stops until it is handed back (checked every "+failedOverRecheck.String()+")", "vm", v.cfg.Name, "err", err)
			}
			return pt, err
		}
		v.setState("error", err)
		v.d.log.Error("cycle failed", "vm", v.cfg.Name, "err", err)
		return pt, err
	}
	v.mu.Lock()
	v.last = &pt
	v.mu.Unlock()
	v.setState("protected", nil)
	if fb := v.d.failback; fb != nil {
		// A VM that came home from a failback is home once it replicates.
		if err := fb.MarkResumed(v.cfg.Name); err != nil {
			v.d.log.Error("recording that the VM replicates again after its failback", "vm", v.cfg.Name, "err", err)
		}
	}
	return pt, nil
}

// migrate is a planned migration: the VM shut down here, its last point
// sent, the recovery site running it. The VM is failed over from then on.
func (v *vm) migrate(ctx context.Context, timeout time.Duration) (protect.Migration, error) {
	if v.group != "" {
		// Gone from here, it would fail every cycle of its group: the other
		// members would never be replicated again.
		return protect.Migration{}, fmt.Errorf("vm %q is a member of consistency group %q, whose VMs are replicated together: migrated alone, it would fail every cycle of the group, and its other members would not be replicated any more. Take it out of the group's `vms:` in %s and restart the site, then migrate it; or fail the group over together at the recovery site (`lifeboat plan run`)",
			v.cfg.Name, v.group, v.d.cfg.Path())
	}
	v.cycleMu.Lock()
	defer v.cycleMu.Unlock()
	if v.isUnprotected() {
		// Its last point would be a hash resync of every disk, with the guest down.
		return protect.Migration{}, fmt.Errorf("vm %q is unprotected (`lifeboat unprotect`): run `lifeboat sync %s` to protect it again (a hash resync while it runs), then migrate it", v.cfg.Name, v.cfg.Name)
	}
	if err := v.ready(ctx); err != nil {
		return protect.Migration{}, err
	}
	v.setState("migrating", nil)
	mig, err := v.p.Migrate(ctx, protect.MigrateOptions{ShutdownTimeout: timeout, Agent: v.cfg.Agent})
	if err != nil {
		v.setState("error", err)
		v.d.log.Error("planned migration failed", "vm", v.cfg.Name, "err", err)
		return mig, err
	}
	v.mu.Lock()
	v.last = &mig.Point
	v.mu.Unlock()
	// The message reads as the recovery site's refusals will: status says it.
	v.setState(stateFailedOver, fmt.Errorf("vm %q was failed over to recovery site %q by a planned migration at %s (point %d, epoch %d): it runs there now",
		v.cfg.Name, v.cfg.Peer, time.Now().UTC().Format(time.RFC3339), mig.Point.ID, mig.Run.Epoch))
	return mig, nil
}

func (v *vm) cycle(ctx context.Context) (lifeboat.Point, error) {
	if err := v.ready(ctx); err != nil {
		return lifeboat.Point{}, err
	}
	return v.p.Cycle(ctx)
}

// ready gives the protector its recovery site connection and quiescer.
func (v *vm) ready(ctx context.Context) error {
	if err := os.MkdirAll(v.p.VM.WorkDir, 0o750); err != nil {
		return fmt.Errorf("vm %q: work dir: %w", v.cfg.Name, err)
	}
	peer, err := v.d.peer(ctx, v.cfg.Peer)
	if err != nil {
		return fmt.Errorf("vm %q: %w", v.cfg.Name, err)
	}
	rctx, cancel := context.WithTimeout(ctx, peerReadyTimeout)
	defer cancel()
	if err := peer.Ready(rctx); err != nil {
		return fmt.Errorf("vm %q: %w", v.cfg.Name, err)
	}
	q, err := v.quiescer()
	if err != nil {
		return fmt.Errorf("vm %q: %w", v.cfg.Name, err)
	}
	v.p.Target = peer
	v.p.Quiescer = q
	return nil
}

func (v *vm) setState(s string, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.state = s
	if err != nil {
		v.lastErr = err.Error()
		v.errAt = time.Now().UTC()
	} else if s == "protected" {
		v.lastErr = ""
	}
}

// schedule runs a cycle every interval, and learns the latest point at start so
// that status shows the RPO before the first cycle.
func (v *vm) schedule(ctx context.Context) {
	if peer, err := v.d.peer(ctx, v.cfg.Peer); err == nil {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if pt, ok, err := peer.Latest(lctx, v.cfg.Name); err == nil && ok {
			v.mu.Lock()
			if v.last == nil {
				v.last = &pt
				if v.state == "idle" {
					v.state = "protected"
				}
			}
			v.mu.Unlock()
		}
		cancel()
	}
	// Errors are in status and the log; the next tick retries. A VM failed
	// over at its recovery site is only checked now and then: it runs there.
	runEvery(ctx, time.Duration(v.cfg.Interval), retryAfter, func(ctx context.Context) error {
		v.mu.Lock()
		failedOver, since, homing := v.state == stateFailedOver, v.errAt, v.homing
		v.mu.Unlock()
		if homing {
			return errHoming // its homecoming runs its first cycle
		}
		if v.reversedHere() {
			return errReversedHere
		}
		if v.isUnprotected() {
			return errUnprotected
		}
		if failedOver && (refusedLately(since, time.Now()) || v.stillFailedOver(ctx)) {
			return errFailedOverHere
		}
		_, err := v.sync(ctx, false, false)
		if errors.Is(err, errUnprotected) {
			return nil // unprotected while it waited for the lock
		}
		return err
	})
}

// stillFailedOver asks the recovery site, without touching the VM here,
// whether it still runs the VM (a planned migration shut it down here).
func (v *vm) stillFailedOver(ctx context.Context) bool {
	peer, err := v.d.peer(ctx, v.cfg.Peer)
	if err != nil {
		return true // cannot tell: leave the VM alone
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, _, err = peer.Latest(lctx, v.cfg.Name)
	if recovery.IsFailedOver(err) {
		v.setState(stateFailedOver, err)
		return true
	}
	return err != nil // unreachable: ask again later
}

// errFailedOverHere is the schedule's answer for a VM that runs at its
// recovery site: no cycle, wait as after a failure.
var errFailedOverHere = errors.New("failed over: runs at its recovery site")

// reversedHere reports whether this site has taken the VM's points in
// reverse (failback.Store.Reverse): the VM runs at its old recovery site
// for good, its disks here are the base of its points, so this site
// protects it no more; status says so.
func (v *vm) reversedHere() bool {
	fb := v.d.failback
	if fb == nil {
		return false
	}
	r, ok, err := fb.ReversedOf(v.cfg.Name)
	if err != nil || !ok || !r.Adopted {
		return false
	}
	v.mu.Lock()
	was := v.state
	v.mu.Unlock()
	if was != stateReversed {
		v.setState(stateReversed, fmt.Errorf("vm %q runs at site %q for good and is protected from there to this site since %s (point %d): this site keeps its restore points (`lifeboat points %s`) and protects it no more; remove it from `vms:`",
			v.cfg.Name, r.Owner, r.Since.Format(time.RFC3339), r.Point, v.cfg.Name))
	}
	return true
}

// errReversedHere is the schedule's answer for a VM this site keeps the
// points of, in reverse: no cycle.
var errReversedHere = errors.New("protected in reverse from its old recovery site")

// stateReversed is a protected VM's state at its old production site once
// the site keeps its points in reverse.
const stateReversed = "reversed"

// errHoming is the schedule's answer for a VM coming home from a failback
// (home.go): its homecoming runs the first cycle once the VM runs.
var errHoming = errors.New("coming home from a failback")

// stateFailedOver is a protected VM's state once its recovery site has
// failed it over: the site refuses its points until it is handed back.
const stateFailedOver = "failed-over"

// failedOverRecheck is how often a failed-over VM's schedule asks again
// (one light call): replication resumes this soon after an undo.
const failedOverRecheck = 30 * time.Second

// refusedLately reports whether a refusal recorded at since, by the wall
// clock, came less than failedOverRecheck before now. One recorded after
// now did not: the clock stepped back since (an NTP step, `date -s`), and
// before, a step back of an hour kept replication stopped for that hour
// after the failover's undo.
func refusedLately(since, now time.Time) bool {
	ago := now.Sub(since)
	return ago >= 0 && ago < failedOverRecheck
}

// retryAfter is the least wait after a failed cycle before the next.
const retryAfter = time.Second

// runEvery runs a cycle now and then every interval until ctx ends: each
// starts an interval after the one before started, or as soon as that one
// ends if it took longer (never two at once), so that a short interval
// holds the RPO near one cycle's time; after a failed cycle the next waits
// at least retry. Interval 0 means never. Each cycle is bounded.
func runEvery(ctx context.Context, every, retry time.Duration, cycle func(context.Context) error) {
	if every <= 0 {
		return
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, max(every*20, 6*time.Hour))
		err := cycle(cctx)
		cancel()
		wait := every - time.Since(start)
		if err != nil {
			wait = max(wait, retry)
		}
		t.Reset(max(wait, 0))
	}
}

// stateFailedOverHere is a replica's state while a failover of it runs, or
// is recorded, at this recovery site.
const stateFailedOverHere = "failed-over-here"

// VMStatus is what `lifeboat status` shows of one VM.
type VMStatus struct {
	VM   string `json:"vm"`
	Role string `json:"role"` // "protected" (this site protects it) or "replica" (this site holds its points)
	// State, one word for scripts: a protected VM's idle (never synced),
	// syncing, protected, error, failed-over, reversed, failing-back,
	// unprotected (`lifeboat unprotect`: no cycles); a
	// replica's replica or failed-over-here (a failover of it runs, or is
	// recorded, at this site). Detail says it in words where there is more
	// to say.
	State  string `json:"state"`
	Detail string `json:"detail,omitempty"`
	Peer   string `json:"peer,omitempty"`
	// Owner is, for a replica, the protected site that owns the VM here, and
	// Epoch the number of its ownership (raised by every handover).
	Owner     string          `json:"owner,omitempty"`
	Epoch     uint64          `json:"epoch,omitempty"`
	Group     string          `json:"group,omitempty"`
	Interval  string          `json:"interval,omitempty"`
	LastPoint *lifeboat.Point `json:"last_point,omitempty"`
	RPO       float64         `json:"rpo_seconds,omitempty"` // age of the last point
	RPOTarget float64         `json:"rpo_target_seconds,omitempty"`
	// Behind is set when the RPO exceeds its target (or no point exists yet under a target).
	Behind    bool              `json:"behind,omitempty"`
	Points    int               `json:"points,omitempty"`
	LastError string            `json:"last_error,omitempty"`
	ErrorAt   *time.Time        `json:"error_at,omitempty"`
	Progress  *protect.Progress `json:"progress,omitempty"`
	// Runs are, at a recovery site, the VM's runs from its points: its
	// failover and its tests.
	Runs []RunStatus `json:"runs,omitempty"`
	// Failback is, at the production site, the failback its disks are taking.
	Failback *failback.Status `json:"failback,omitempty"`
	// FailingBack is, at the recovery site, its failback to production.
	FailingBack *FailingBack `json:"failing_back,omitempty"`
	// ReverseRun is, for a VM protected in reverse from here, the failover
	// run it is (`lifeboat protect VM --reverse`).
	ReverseRun string `json:"reverse_run,omitempty"`
}

// RunStatus is one run of a VM from a point, as status shows it.
type RunStatus struct {
	ID        string    `json:"id"`
	Kind      string    `json:"kind"` // "failover" or "test failover"
	Point     uint64    `json:"point"`
	Started   time.Time `json:"started"`
	Running   bool      `json:"running"` // its QEMU is there
	Committed bool      `json:"committed,omitempty"`
}

func (v *vm) status(now time.Time) VMStatus {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := VMStatus{VM: v.cfg.Name, Role: "protected", State: v.state, Peer: v.cfg.Peer, Group: v.group, LastError: v.lastErr, Progress: v.progress,
		ReverseRun: v.reverse}
	if v.cfg.Interval > 0 {
		s.Interval = time.Duration(v.cfg.Interval).String()
	} else if v.groupInterval > 0 {
		s.Interval = v.groupInterval.String() // the group's, which syncs it
	}
	if v.last != nil {
		p := *v.last
		s.LastPoint = &p
		s.RPO = p.Age(now).Seconds()
	}
	if t := time.Duration(v.cfg.RPOTarget); t > 0 && v.unprotected == nil {
		s.RPOTarget = t.Seconds()
		s.Behind = v.last == nil || s.RPO > s.RPOTarget
	}
	if v.unprotected != nil {
		s.State, s.Detail = stateUnprotected, v.unprotected.detail(v.cfg.Name)
	}
	if !v.errAt.IsZero() && v.lastErr != "" {
		t := v.errAt
		s.ErrorAt = &t
	}
	return s
}

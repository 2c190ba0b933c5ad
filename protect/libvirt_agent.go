package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// LibvirtQuiescer freezes a libvirt domain's guest through libvirt's own
// guest-agent calls (virDomainFSFreeze, virDomainFSThaw): libvirt owns the
// agent's socket. The guest's fsfreeze hooks (qemu-ga's -F) make a point
// application consistent where they quiesce the applications.
//
// The guest is never left frozen: a freeze that lands after the bound (a
// slow hook) is thawed the moment it lands, and every thaw is retried until
// libvirt confirms it, also while the domain is paused (libvirt refuses
// agent calls then, and the guest resumes frozen); as on the QMP path, a
// freeze marker and a thaw guard cover a lifeboat that dies meanwhile. Each
// freeze uses a connection of its own, so a libvirt call that hangs past its
// bound never takes the cycle's with it.
type LibvirtQuiescer struct {
	VM     string
	Domain LibvirtDomain
	Level  lifeboat.Consistency // Filesystem or Application
	// Limit bounds how long the guest stays frozen (DefaultFreezeLimit).
	Limit time.Duration
	// Strict fails the cycle when freezing fails, instead of a crash-consistent point.
	Strict bool
	// MarkerDir holds a marker while the guest is frozen, so that a site that
	// died meanwhile thaws it at its next start (ThawLeftovers).
	MarkerDir string
	// Guard is the command that starts a thaw guard (e.g. lifeboat thaw-guard):
	// a process that thaws the guest through libvirtd if this one dies while
	// it is frozen.
	Guard []string
	Log   *slog.Logger

	mu      sync.Mutex
	thawing *thawRun // the latest thaw loop (after a late freeze, if any)
}

// freezeCallBound bounds one libvirt freeze or thaw call (libvirt's own agent
// timeout is shorter): past it the call's connection is closed.
const freezeCallBound = 2 * time.Minute

func (q *LibvirtQuiescer) log() *slog.Logger {
	l := q.Log
	if l == nil {
		l = slog.Default()
	}
	return l.With("vm", q.VM, "domain", q.Domain.Domain)
}

func (q *LibvirtQuiescer) guest() FrozenGuest { return FrozenGuest{Libvirt: &q.Domain} }

func (q *LibvirtQuiescer) marker() string { return markerPath(q.MarkerDir, q.VM) }

func (q *LibvirtQuiescer) removeMarker() {
	if q.MarkerDir != "" {
		os.Remove(q.marker())
	}
}

// uri is the domain's libvirt URI, "" spelled out.
func (d LibvirtDomain) uri() string { return cmpStr(d.URI, virt.DefaultURI) }

func (q *LibvirtQuiescer) limit() time.Duration {
	if q.Limit > 0 {
		return q.Limit
	}
	return DefaultFreezeLimit
}

// libvirtCall runs one call on a fresh connection, bounded by ctx and
// freezeCallBound.
func libvirtCall(ctx context.Context, dom LibvirtDomain, f func(ctx context.Context, d *virt.Domain) (int, error)) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, freezeCallBound)
	defer cancel()
	c, err := virt.Dial(ctx, dom.URI)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	d, err := c.Domain(ctx, dom.Domain)
	if err != nil {
		return 0, err
	}
	return f(ctx, d)
}

func (q *LibvirtQuiescer) Freeze(ctx context.Context) (*Frozen, error) {
	q.mu.Lock()
	busy := q.thawing.running()
	q.mu.Unlock()
	if busy {
		// A new freeze would queue behind the last one in libvirt, and its
		// thaw could land in the middle of this instant.
		return q.fallBack(errors.New("the guest's previous freeze is not confirmed thawed yet; lifeboat keeps thawing it in the background"))
	}
	type result struct {
		n   int
		err error
	}
	// The marker and the guard go first: from the freeze call on, the
	// guest may be frozen, whatever becomes of this process. A marker
	// already there is a freeze of lifeboat's not confirmed thawed.
	leftover := writeMarker(q.MarkerDir, q.VM, q.guest())
	guard := startGuard(q.Guard, q.guest(), q.marker(), q.log())
	start := time.Now()
	landed := make(chan result, 1)
	go func() {
		n, err := libvirtCall(context.Background(), q.Domain, func(ctx context.Context, d *virt.Domain) (int, error) { return d.FSFreeze(ctx) })
		landed <- result{n, err}
	}()
	bound := time.NewTimer(q.limit())
	defer bound.Stop()
	select {
	case r := <-landed:
		if r.err != nil && virt.AgentRefused(r.err) && !leftover {
			// The agent answered no, and qemu-ga thaws what it froze before
			// it answers an error: nothing is frozen on lifeboat's behalf.
			// When the guest is frozen already (the agent then refuses every
			// freeze), another agent client froze it (virsh domfsfreeze, a
			// backup tool), and that freeze is its to end.
			q.removeMarker()
			guard.dismiss()
			return q.fallBack(fmt.Errorf("libvirt could not freeze the guest's file systems: %w (nothing frozen by lifeboat; a freeze another agent client holds is left to it)", r.err))
		}
		if r.err != nil && virt.IsNotRunning(r.err) && !leftover {
			// libvirt refused the call before it reached the agent: the
			// domain is paused (or stopped), and nothing was frozen. Before,
			// this was taken for a failed freeze: a thaw loop ran until the
			// domain resumed, logging that the guest was left frozen, and
			// every freeze meanwhile fell back.
			q.removeMarker()
			guard.dismiss()
			return q.fallBack(fmt.Errorf("the domain is not running (paused or stopped), so its guest cannot be frozen: the point is as consistent as the guest was when it stopped (%w)", r.err))
		}
		if r.err != nil {
			// A failed freeze may have frozen some file systems.
			q.background("after a failed freeze", nil, guard)
			return q.fallBack(fmt.Errorf("libvirt could not freeze the guest's file systems: %w", r.err))
		}
		f := q.frozen(r.n, guard)
		if r.n == 0 && q.Strict {
			f.Thaw(ctx)
			return q.fallBack(errors.New(f.Note))
		}
		return f, nil
	case <-bound.C:
	case <-ctx.Done():
	}
	// The freeze has not landed in time: no quiesced instant this cycle. When
	// it lands, the guest is thawed at once.
	q.background("after a late freeze", func() {
		if r := <-landed; r.err == nil {
			q.log().Warn("a freeze landed after its bound: thawing the guest now", "late_by", time.Since(start)-q.limit())
		}
	}, guard)
	return q.fallBack(fmt.Errorf("libvirt's freeze (virDomainFSFreeze, the guest agent's guest-fsfreeze-freeze) did not finish within %v", q.limit()))
}

// background runs the thaw loop in the background, after wait (if any)
// returns; until it ends, the next Freeze falls back at once. Once the guest
// is confirmed thawed, its marker goes and its guard is dismissed; if it is
// not, both stay, so that it is thawed later.
func (q *LibvirtQuiescer) background(why string, wait func(), guard *guardProcess) *thawRun {
	r := newThawRun()
	q.mu.Lock()
	q.thawing = r
	q.mu.Unlock()
	go func() {
		defer close(r.done)
		defer close(r.thawed) // no post-thaw hooks on this path
		if wait != nil {
			wait()
		}
		ctx, cancel := context.WithTimeout(context.Background(), thawBound)
		defer cancel()
		if r.err = thawLibvirt(ctx, q.Domain, why, q.log()); r.err == nil {
			q.removeMarker()
			guard.dismiss()
		}
	}()
	return r
}

// thawLeftover thaws g, left frozen by a site that died, in the background
// when it is this quiescer's domain: its freezes fall back meanwhile.
func (q *LibvirtQuiescer) thawLeftover(g FrozenGuest, dir string) *thawRun {
	if g.Libvirt == nil || g.Libvirt.uri() != q.Domain.uri() || g.Libvirt.Domain != q.Domain.Domain || dir != q.MarkerDir {
		return nil
	}
	return q.background("its site stopped while it was frozen", nil, nil)
}

// frozen is a landed freeze: Thaw thaws, and so does a timer at the bound.
// As on the QMP path, Thaw waits for the thaw loop up to the bound; what is
// left (a paused domain) goes on in the background.
func (q *LibvirtQuiescer) frozen(n int, guard *guardProcess) *Frozen {
	var (
		mu      sync.Mutex
		run     *thawRun // set once, by Thaw or by the timer
		expired bool
	)
	limit := q.limit()
	timer := time.AfterFunc(limit, func() {
		mu.Lock()
		defer mu.Unlock()
		if run != nil {
			return
		}
		expired = true
		q.log().Warn("the guest was frozen past its bound: thawing it now", "limit", limit)
		run = q.background("the freeze bound expired", nil, guard)
	})
	f := &Frozen{Level: q.Level, Since: time.Now(), Limit: q.limit(), Thaw: func(ctx context.Context) (bool, error) {
		timer.Stop()
		mu.Lock()
		if run == nil {
			run = q.background("after the instant", nil, guard)
		}
		r, held := run, !expired
		mu.Unlock()
		return held, r.wait(ctx, limit, q.VM)
	}}
	if n == 0 {
		f.Level, f.Note = lifeboat.Crash, frozeNothing(q.Level)
		q.log().Warn("the freeze froze no file system: this point is crash consistent", "note", f.Note)
	}
	return f
}

// thawLibvirt thaws dom's guest until libvirt confirms it or ctx ends (the
// quiescer's thaw loop gives it thawBound, as on the QMP path; a thaw guard
// its own bound): a thaw refused because the freeze still holds libvirt's job
// lock, because libvirtd was restarting, or because the domain is paused is
// tried again. libvirt answers an agent call on a paused domain "domain is
// not running", and its guest resumes as frozen as it stopped; only a domain
// that is off, or gone, has nothing frozen.
func thawLibvirt(ctx context.Context, dom LibvirtDomain, why string, log *slog.Logger) error {
	start := time.Now()
	thawCmd := fmt.Sprintf("virsh -c %s domfsthaw %s", dom.uri(), dom.Domain)
	warned := false
	for attempt := 1; ; attempt++ {
		var paused, off bool
		_, err := libvirtCall(ctx, dom, func(ctx context.Context, d *virt.Domain) (int, error) {
			n, err := d.FSThaw(ctx)
			if virt.IsNotRunning(err) {
				p, serr := d.Paused(ctx)
				if serr != nil {
					return n, fmt.Errorf("%w; and its state: %w", err, serr)
				}
				paused, off = p, !p
				if off {
					// Only an active domain can be paused: check it is not.
					active, serr := d.Active(ctx)
					if serr != nil {
						return n, fmt.Errorf("%w; and its state: %w", err, serr)
					}
					off = !active
				}
			}
			return n, err
		})
		switch {
		case err == nil:
			if warned {
				log.Warn("guest confirmed thawed", "why", why, "attempts", attempt, "took", time.Since(start).Round(time.Millisecond))
			}
			return nil
		case off:
			return nil // nothing is frozen in a domain that does not run
		case virt.IsNoDomain(err):
			log.Warn("nothing to thaw: the domain is gone", "why", why, "err", err)
			return nil
		case paused && !warned:
			warned = true
			log.Error("the domain was paused while its guest was frozen: libvirt refuses to thaw it until it resumes, and it resumes frozen; lifeboat keeps thawing it in the background. If it stays frozen, run `"+thawCmd+"`",
				"why", why, "err", err)
		}
		select {
		case <-ctx.Done():
			log.Error("could not thaw the guest: thaw it with `"+thawCmd+"`", "why", why, "attempts", attempt, "err", err)
			return fmt.Errorf("guest of libvirt domain %q not confirmed thawed after %v and %d attempts (last: %w): thaw it with `%s`", dom.Domain, time.Since(start).Round(time.Second), attempt, err, thawCmd)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (q *LibvirtQuiescer) fallBack(err error) (*Frozen, error) {
	if q.Strict {
		return nil, fmt.Errorf("quiesce: %w (on_quiesce_failure: fail)", err)
	}
	q.log().Warn("quiescing failed: this point is crash consistent", "err", err)
	return &Frozen{Level: lifeboat.Crash, Note: "quiesce failed: " + err.Error(), Limit: q.limit()}, nil
}

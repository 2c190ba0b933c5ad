package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
// agent calls then, and the guest resumes frozen). Each freeze uses a connection of its own, so a
// libvirt call that hangs past its bound never takes the cycle's with it.
type LibvirtQuiescer struct {
	VM     string
	Domain LibvirtDomain
	Level  lifeboat.Consistency // Filesystem or Application
	// Limit bounds how long the guest stays frozen (DefaultFreezeLimit).
	Limit time.Duration
	// Strict fails the cycle when freezing fails, instead of a crash-consistent point.
	Strict bool
	Log    *slog.Logger

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

func (q *LibvirtQuiescer) limit() time.Duration {
	if q.Limit > 0 {
		return q.Limit
	}
	return DefaultFreezeLimit
}

// call runs one call on a fresh connection, bounded by freezeCallBound.
func (q *LibvirtQuiescer) call(f func(ctx context.Context, d *virt.Domain) (int, error)) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), freezeCallBound)
	defer cancel()
	c, err := virt.Dial(ctx, q.Domain.URI)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	d, err := c.Domain(ctx, q.Domain.Domain)
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
	start := time.Now()
	landed := make(chan result, 1)
	go func() {
		n, err := q.call(func(ctx context.Context, d *virt.Domain) (int, error) { return d.FSFreeze(ctx) })
		landed <- result{n, err}
	}()
	bound := time.NewTimer(q.limit())
	defer bound.Stop()
	select {
	case r := <-landed:
		if r.err != nil {
			// A failed freeze may have frozen some file systems.
			q.background("after a failed freeze", nil)
			return q.fallBack(fmt.Errorf("libvirt could not freeze the guest's file systems: %w", r.err))
		}
		f := q.frozen(r.n)
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
	})
	return q.fallBack(fmt.Errorf("libvirt's freeze (virDomainFSFreeze, the guest agent's guest-fsfreeze-freeze) did not finish within %v", q.limit()))
}

// background runs the thaw loop in the background, after wait (if any)
// returns; until it ends, the next Freeze falls back at once.
func (q *LibvirtQuiescer) background(why string, wait func()) *thawRun {
	r := &thawRun{done: make(chan struct{})}
	q.mu.Lock()
	q.thawing = r
	q.mu.Unlock()
	go func() {
		defer close(r.done)
		if wait != nil {
			wait()
		}
		r.err = q.ensureThawed(why)
	}()
	return r
}

// frozen is a landed freeze: Thaw thaws, and so does a timer at the bound.
// As on the QMP path, Thaw waits for the thaw loop up to the bound; what is
// left (a paused domain) goes on in the background.
func (q *LibvirtQuiescer) frozen(n int) *Frozen {
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
		run = q.background("the freeze bound expired", nil)
	})
	f := &Frozen{Level: q.Level, Since: time.Now(), Thaw: func(ctx context.Context) (bool, error) {
		timer.Stop()
		mu.Lock()
		if run == nil {
			run = q.background("after the instant", nil)
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

// ensureThawed thaws until libvirt confirms it, for up to thawBound (the
// QMP path's thaw loop's): a thaw refused because the freeze still holds
// libvirt's job lock, because libvirtd was restarting, or because the
// domain is paused is tried again. libvirt answers an agent call on a paused
// domain "domain is not running", and its guest resumes as frozen as it
// stopped; only a domain that is off has nothing frozen.
func (q *LibvirtQuiescer) ensureThawed(why string) error {
	start := time.Now()
	deadline := start.Add(thawBound)
	thawCmd := fmt.Sprintf("virsh -c %s domfsthaw %s", cmpStr(q.Domain.URI, virt.DefaultURI), q.Domain.Domain)
	warned := false
	for attempt := 1; ; attempt++ {
		var paused, off bool
		_, err := q.call(func(ctx context.Context, d *virt.Domain) (int, error) {
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
				q.log().Warn("guest confirmed thawed", "why", why, "attempts", attempt, "took", time.Since(start).Round(time.Millisecond))
			}
			return nil
		case off:
			return nil // nothing is frozen in a domain that does not run
		case paused && !warned:
			warned = true
			q.log().Error("the domain was paused while its guest was frozen: libvirt refuses to thaw it until it resumes, and it resumes frozen; lifeboat keeps thawing it in the background. If it stays frozen, run `"+thawCmd+"`",
				"why", why, "bound", thawBound, "err", err)
		}
		if time.Now().After(deadline) {
			q.log().Error("could not thaw the guest: thaw it with `"+thawCmd+"`", "why", why, "attempts", attempt, "err", err)
			return fmt.Errorf("guest of libvirt domain %q not confirmed thawed after %v and %d attempts (last: %w): thaw it with `%s`", q.Domain.Domain, thawBound, attempt, err, thawCmd)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (q *LibvirtQuiescer) fallBack(err error) (*Frozen, error) {
	if q.Strict {
		return nil, fmt.Errorf("quiesce: %w (on_quiesce_failure: fail)", err)
	}
	q.log().Warn("quiescing failed: this point is crash consistent", "err", err)
	return &Frozen{Level: lifeboat.Crash, Note: "quiesce failed: " + err.Error()}, nil
}

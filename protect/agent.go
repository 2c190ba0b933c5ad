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
	"github.com/lifeboat-dr/lifeboat/internal/hostcmd"
	"github.com/lifeboat-dr/lifeboat/qga"
)

// DefaultFreezeLimit bounds how long a guest stays frozen, as VSS does.
const DefaultFreezeLimit = 10 * time.Second

// AgentQuiescer freezes a guest's file systems through its QEMU guest agent, with
// host-side hooks around the freeze for application consistency.
type AgentQuiescer struct {
	VM     string
	Socket string // the agent's unix socket (host side of its virtio-serial port)
	// Level is Filesystem, or Application (host hooks run, and the guest's
	// fsfreeze-hook scripts run inside guest-fsfreeze-freeze).
	Level lifeboat.Consistency
	// Limit bounds the freeze: past it the guest is thawed whatever the cycle is doing.
	Limit time.Duration
	// Strict fails the cycle when quiescing fails, instead of falling back to a
	// crash-consistent point (the default, recorded in the point and logged).
	Strict bool
	// PreFreeze and PostThaw are host commands (run with sh -c) around the
	// freeze, each bounded by HookTimeout; PostThaw runs on every path once
	// PreFreeze has run.
	PreFreeze, PostThaw []string
	HookTimeout         time.Duration
	// MarkerDir holds a marker while a guest is frozen, so that a site that
	// died meanwhile thaws it at its next start (ThawLeftovers).
	MarkerDir string
	// Guard is the command that starts a thaw guard (e.g. lifeboat thaw-guard):
	// a process that thaws the guest if this one dies while it is frozen.
	Guard []string
	Log   *slog.Logger

	mu      sync.Mutex
	thawing *thawRun // the latest background thaw
}

func (q *AgentQuiescer) limit() time.Duration {
	if q.Limit > 0 {
		return q.Limit
	}
	return DefaultFreezeLimit
}

func (q *AgentQuiescer) log() *slog.Logger {
	if q.Log == nil {
		return slog.Default().With("vm", q.VM)
	}
	return q.Log.With("vm", q.VM)
}

func (q *AgentQuiescer) marker() string { return markerPath(q.MarkerDir, q.VM) }

func (q *AgentQuiescer) guest() FrozenGuest { return FrozenGuest{Socket: q.Socket} }

// Freeze quiesces the guest: host pre-freeze hooks, then guest-fsfreeze-freeze,
// all within the freeze limit. The returned Thaw thaws, and so does a timer at
// the limit if Thaw has not come by then.
func (q *AgentQuiescer) Freeze(ctx context.Context) (*Frozen, error) {
	limit := q.limit()
	fctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	q.mu.Lock()
	last := q.thawing
	q.mu.Unlock()
	if last.running() && last.isThawed() {
		// Thawed; only the last freeze's post-thaw hooks still run (each
		// bounded by HookTimeout): this freeze's pre-freeze hooks wait for
		// them, up to the freeze limit, rather than run beside them.
		select {
		case <-last.done:
		case <-fctx.Done():
		}
	}
	if last.running() {
		if last.isThawed() {
			return q.fallBack(fmt.Errorf("the post-thaw hooks of the guest's previous freeze still run after the freeze limit %v (each is bounded by hook_timeout %v)", limit, q.hookTimeout()))
		}
		// Its agent is still busy with the last freeze (or does not answer):
		// a new freeze would only queue behind it, and its thaw could land
		// in the middle of this instant.
		return q.fallBack(errors.New("the guest's previous freeze is not confirmed thawed yet; lifeboat keeps thawing it in the background"))
	}
	app := q.Level == lifeboat.Application
	postThaw := func() {}
	if app {
		if err := q.runHooks(fctx, "pre-freeze", q.PreFreeze); err != nil {
			q.runHooks(context.WithoutCancel(ctx), "post-thaw", q.PostThaw)
			return q.fallBack(err)
		}
		postThaw = func() { q.runHooks(context.WithoutCancel(ctx), "post-thaw", q.PostThaw) }
	}
	// A marker already there is a freeze of lifeboat's not confirmed thawed
	// (a site that died, or a thaw loop that gave up): the agent refuses a
	// new freeze while that one holds, and lifeboat must thaw it.
	leftover := writeMarker(q.MarkerDir, q.VM, q.guest())
	guard := startGuard(q.Guard, q.guest(), q.marker(), q.log())
	a, err := qga.Dial(fctx, q.Socket)
	if err != nil {
		if !leftover {
			q.removeMarker()
		}
		guard.dismiss()
		postThaw()
		return q.fallBack(fmt.Errorf("guest agent %s: %w", q.Socket, err))
	}
	since := time.Now()
	n, err := a.Freeze(fctx)
	var refused *qga.Error
	if errors.As(err, &refused) && !leftover {
		// The agent answered no: qemu-ga thaws what it froze before it
		// answers an error, so nothing is frozen on lifeboat's behalf. When
		// the guest is frozen already (the agent then refuses every freeze),
		// another agent client froze it, and that freeze is its to end.
		a.Close()
		q.removeMarker()
		guard.dismiss()
		postThaw()
		return q.fallBack(fmt.Errorf("guest-fsfreeze-freeze: %w (nothing frozen by lifeboat; a freeze another agent client holds is left to it)", err))
	}
	if err != nil {
		// The freeze may still happen (an agent busy in a slow fsfreeze hook
		// freezes when the hook ends, answering late), or have happened half:
		// the thaw loop starts now and runs until the guest is confirmed
		// thawed, while this cycle goes on crash consistent.
		q.thawInBackground(a, guard, postThaw)
		return q.fallBack(fmt.Errorf("guest-fsfreeze-freeze: %w", err))
	}
	var (
		mu      sync.Mutex
		run     *thawRun // set once, by Thaw or by the timer
		expired bool
	)
	timer := time.AfterFunc(limit-time.Since(since), func() {
		mu.Lock()
		defer mu.Unlock()
		if run != nil {
			return
		}
		expired = true
		q.log().Warn("freeze bound reached: thawing the guest now", "limit", limit)
		run = q.thawInBackground(a, guard, postThaw)
	})
	level := lifeboat.Filesystem
	if app {
		level = lifeboat.Application
	}
	f := &Frozen{Level: level, Since: since, Limit: limit, Thaw: func(ctx context.Context) (bool, error) {
		timer.Stop()
		mu.Lock()
		if run == nil {
			run = q.thawInBackground(a, guard, postThaw)
		}
		r, held := run, !expired
		mu.Unlock()
		return held, r.wait(ctx, limit, q.VM)
	}}
	if n == 0 {
		// The agent is in its frozen state all the same (its hooks ran, and
		// only guest-fsfreeze-thaw ends that state): thawed as any freeze is.
		return q.frozeNothing(ctx, f)
	}
	return f, nil
}

// frozeNothing downgrades a freeze that froze no file system to crash, or,
// under a strict policy, thaws at once and fails the cycle.
func (q *AgentQuiescer) frozeNothing(ctx context.Context, f *Frozen) (*Frozen, error) {
	note := frozeNothing(q.Level)
	if q.Strict {
		if _, err := f.Thaw(context.WithoutCancel(ctx)); err != nil {
			q.log().Error("thaw after a freeze of no file system", "err", err)
		}
		return q.fallBack(errors.New(note))
	}
	q.log().Warn("the freeze froze no file system: this point is crash consistent", "note", note)
	f.Level, f.Note = lifeboat.Crash, note
	return f, nil
}

// thawRun is one run of the thaw loop in the background, then of the
// post-thaw hooks.
type thawRun struct {
	thawed chan struct{} // closed when the thaw loop ends; err is then set
	err    error
	done   chan struct{} // closed once the post-thaw hooks ran too
}

// wait waits for the thaw's outcome, up to limit: the thaw itself takes
// milliseconds; what is left after limit goes on in the background, and the
// next freeze waits for it. The post-thaw hooks are not waited for: their
// time is not the guest's freeze (the next freeze waits for them).
func (r *thawRun) wait(ctx context.Context, limit time.Duration, vm string) error {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-r.thawed:
		return r.err
	case <-ctx.Done():
	case <-t.C:
	}
	return fmt.Errorf("guest %s not confirmed thawed within %v; lifeboat keeps trying in the background", vm, limit)
}

func newThawRun() *thawRun {
	return &thawRun{thawed: make(chan struct{}), done: make(chan struct{})}
}

// isThawed says whether the run's thaw loop ended (confirmed or given up).
func (r *thawRun) isThawed() bool {
	select {
	case <-r.thawed:
		return true
	default:
		return false
	}
}

func (r *thawRun) running() bool {
	if r == nil {
		return false
	}
	select {
	case <-r.done:
		return false
	default:
		return true
	}
}

// thawInBackground runs the thaw loop on a (which it takes over) until the guest
// is confirmed thawed or thawBound passes, then dismisses the guard and runs
// the post-thaw hooks. Until it ends, this quiescer's next Freeze falls back.
func (q *AgentQuiescer) thawInBackground(a *qga.Agent, guard *guardProcess, postThaw func()) *thawRun {
	r := newThawRun()
	q.mu.Lock()
	q.thawing = r
	q.mu.Unlock()
	go func() {
		defer close(r.done)
		ctx, cancel := context.WithTimeout(context.Background(), thawBound)
		defer cancel()
		if r.err = q.thaw(ctx, a); r.err == nil {
			guard.dismiss()
		}
		close(r.thawed)
		postThaw()
	}()
	return r
}

// thaw runs the one thaw loop (qga.EnsureThawed) and removes the freeze marker
// once the guest is confirmed thawed. a may be nil.
func (q *AgentQuiescer) thaw(ctx context.Context, a *qga.Agent) error {
	if err := q.guest().thaw(ctx, a, "", q.log()); err != nil {
		q.log().Error("could not confirm the guest is thawed; its guard and marker stay so that it is thawed later", "err", err)
		return fmt.Errorf("vm %q: %w", q.VM, err)
	}
	q.removeMarker()
	return nil
}

// thawLeftover thaws g, left frozen by a site that died, in the background
// when it is this quiescer's guest: its freezes fall back meanwhile.
func (q *AgentQuiescer) thawLeftover(g FrozenGuest, dir string) *thawRun {
	if g.Libvirt != nil || g.Socket != q.Socket || dir != q.MarkerDir {
		return nil
	}
	return q.thawInBackground(nil, nil, func() {})
}

func (q *AgentQuiescer) removeMarker() {
	if q.MarkerDir != "" {
		os.Remove(q.marker())
	}
}

// fallBack applies the policy when quiescing failed.
func (q *AgentQuiescer) fallBack(err error) (*Frozen, error) {
	if q.Strict {
		return nil, fmt.Errorf("quiescing failed and the policy forbids a crash-consistent point: %w", err)
	}
	note := "quiescing failed, crash consistent: " + err.Error()
	q.log().Warn("quiescing failed: this point is crash consistent", "err", err)
	return &Frozen{Level: lifeboat.Crash, Note: note, Limit: q.limit()}, nil
}

// thawBound is how long lifeboat keeps trying to thaw a guest whose agent does
// not answer: an agent busy in a slow freeze answers when the freeze ends.
const thawBound = 10 * time.Minute

func (q *AgentQuiescer) hookTimeout() time.Duration {
	if q.HookTimeout > 0 {
		return q.HookTimeout
	}
	return DefaultHookTimeout
}

// DefaultHookTimeout bounds each host hook when the config gives no
// hook_timeout.
const DefaultHookTimeout = 30 * time.Second

// runHooks runs the host hooks of one step (pre-freeze or post-thaw) in
// order, each bounded (hostcmd.Run: at its bound the hook's whole process
// group is killed, and a child left holding its output does not hold the
// cycle). What a hook prints is logged: at Info when it succeeds, in the
// error when it fails. A pre-freeze hook that fails stops the others.
func (q *AgentQuiescer) runHooks(ctx context.Context, what string, cmds []string) error {
	timeout := q.hookTimeout()
	var errs []error
	for _, c := range cmds {
		env := append(os.Environ(), "LIFEBOAT_VM="+q.VM, "LIFEBOAT_HOOK="+what)
		res, err := hostcmd.Run(ctx, timeout, env, "sh", "-c", c)
		if te := (*hostcmd.TimeoutError)(nil); errors.As(err, &te) {
			bound := fmt.Sprintf("hook_timeout %v", timeout)
			if te.Caller {
				bound = fmt.Sprintf("the freeze limit %v, which pre-freeze hooks and the freeze share", q.limit())
			}
			err = fmt.Errorf("%w (%s)", err, bound)
		}
		if err != nil {
			err = fmt.Errorf("vm %q: %s hook %q: %w: %s", q.VM, what, c, err, res.Output)
			q.log().Error("hook failed", "err", err)
			errs = append(errs, err)
			if what == "pre-freeze" {
				break
			}
			continue
		}
		attrs := []any{"hook", what, "command", c, "output", string(res.Output)}
		if res.Lingering {
			q.log().Warn("hook ended but left a process holding its output: lifeboat stopped reading it and left that process running", attrs...)
			continue
		}
		q.log().Info("hook ran", attrs...)
	}
	return errors.Join(errs...)
}

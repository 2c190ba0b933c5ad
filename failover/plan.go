package failover

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"

	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/hostcmd"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// Plan is a recovery plan: steps run in order, the VMs of a step started
// together, each step waiting for its VMs before the next begins.
type Plan struct {
	Name  string
	Steps []Step
	// Hooks run for each VM once it is up (after its step's wait), with the
	// VM's name, point, run, MACs and networks in the environment
	// (LIFEBOAT_VM, LIFEBOAT_POINT, LIFEBOAT_RUN, LIFEBOAT_TEST,
	// LIFEBOAT_MACS, LIFEBOAT_NETWORKS, LIFEBOAT_AGENT): re-IP, DNS.
	Hooks       []string
	HookTimeout time.Duration // per hook (DefaultHookTimeout)
}

// Step is one step of a plan.
type Step struct {
	VMs []string
	// WaitAgent: the step ends when every VM's guest agent answers, within
	// Timeout. Otherwise it ends after Delay.
	WaitAgent bool
	Delay     time.Duration
	Timeout   time.Duration // DefaultStepTimeout
}

// Defaults of a plan's bounds.
const (
	DefaultStepTimeout = 5 * time.Minute
	DefaultHookTimeout = 2 * time.Minute
)

// PlanVM is one VM's line of a plan run's summary.
type PlanVM struct {
	VM    string `json:"vm"`
	Step  int    `json:"step"` // from 1
	Run   string `json:"run,omitempty"`
	Point uint64 `json:"point,omitempty"`
	// PointAge is how old the point was at the start: the RPO achieved.
	PointAge  time.Duration `json:"point_age_ns,omitempty"`
	Started   time.Time     `json:"started"`
	Running   time.Time     `json:"running,omitempty"` // QEMU running
	ToRunning time.Duration `json:"to_running_ns,omitempty"`
	Agent     time.Time     `json:"agent,omitempty"` // its agent answering (zero: not waited for, or never)
	ToAgent   time.Duration `json:"to_agent_ns,omitempty"`
	Error     string        `json:"error,omitempty"`
	// Already is set for a VM of a real plan that was failed over here
	// before the plan ran (by hand, or by an earlier run of a plan that
	// stopped): it counts as started and is not started again (Run is its
	// run, Point its point); its hooks and agent wait are not run.
	Already bool `json:"already,omitempty"`
}

// PlanEvent is a plan run's progress.
type PlanEvent struct {
	At   time.Time `json:"at"`
	Step int       `json:"step"`
	VM   string    `json:"vm,omitempty"`
	What string    `json:"what"`
}

// PlanOptions says how a plan runs.
type PlanOptions struct {
	Test  bool // every VM as a test failover
	Force bool // see Options.Force
	// Before: each VM from its latest point taken at or before it (zero:
	// its latest).
	Before time.Time
	// Apart starts each VM of a consistency group from its own point when
	// the group's VMs hold no group point in common (a member refused for
	// long, retention merged their last one away): not consistent with one
	// another, which the plan then says. Without it such a plan starts
	// nothing.
	Apart bool
}

// RunPlan runs plan: each VM's point is chosen before any starts (its
// latest, or its latest at or before opts.Before; one group instant for the
// VMs of a consistency group, planPoints), then each step's VMs are started
// at once, the step waits (for every agent, or a delay), then each VM's
// hooks run; a step with a VM that failed ends the plan, and the VMs
// already started keep running (`StopPlan` ends a test's). progress gets
// each event as it happens.
func (m *Manager) RunPlan(ctx context.Context, p Plan, opts PlanOptions, progress func(PlanEvent)) (_ []PlanVM, err error) {
	test := opts.Test
	ctx, cancel := context.WithCancelCause(ctx)
	pr := &planRun{test: test, since: time.Now().UTC(), cancel: cancel, done: make(chan struct{})}
	m.mu.Lock()
	if r, ok := m.plans[p.Name]; ok {
		m.mu.Unlock()
		cancel(nil)
		return nil, fmt.Errorf("plan %q is running here now (a %s since %s): wait for it to end; `lifeboat failover --list` lists what it started", p.Name, r.kind(), r.since.Format(time.RFC3339))
	}
	if m.plans == nil {
		m.plans = map[string]*planRun{}
	}
	m.plans[p.Name] = pr
	m.mu.Unlock()
	defer func() {
		if err != nil && context.Cause(ctx) == errPlanStopped {
			err = fmt.Errorf("%w: %w", errPlanStopped, err)
		}
		cancel(nil)
		m.mu.Lock()
		delete(m.plans, p.Name)
		m.mu.Unlock()
		close(pr.done)
	}()
	var (
		mu  sync.Mutex
		out []PlanVM
	)
	say := func(step int, vm, what string, args ...any) {
		if progress != nil {
			mu.Lock()
			progress(PlanEvent{At: time.Now().UTC(), Step: step, VM: vm, What: fmt.Sprintf(what, args...)})
			mu.Unlock()
		}
	}
	// Every VM's point is chosen, and pinned, before the first starts: a VM
	// with none must not leave the VMs of earlier steps failed over, and
	// retention must not merge a later step's point meanwhile.
	points, release, err := m.planPoints(ctx, p, opts.Before, opts.Apart, func(what string) { say(0, "", "%s", what) })
	if err != nil {
		return nil, err
	}
	if !test && !opts.Force {
		// The split-brain guard for every VM before the first starts: a
		// refusal at a later step would leave the earlier ones failed over.
		if err := m.planContacts(p); err != nil {
			release()
			return nil, err
		}
	}
	defer release()
	for i, st := range p.Steps {
		n := i + 1
		say(n, "", "step %d of %d: starting %s", n, len(p.Steps), strings.Join(st.VMs, ", "))
		rows := make([]PlanVM, len(st.VMs))
		runs := make([]*Run, len(st.VMs))
		var wg sync.WaitGroup
		for j, vm := range st.VMs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				row := PlanVM{VM: vm, Step: n, Started: time.Now().UTC()}
				if !test {
					// A VM failed over here already is up: the plan goes on.
					if r, err := m.failedOverRun(vm); err != nil {
						row.Error = err.Error()
						say(n, vm, "failed to start: %v", err)
						rows[j] = row
						return
					} else if r != nil {
						row.Run, row.Point, row.PointAge, row.Already = r.ID, r.Point, r.Started.Sub(r.Instant), true
						row.Started = r.Started
						other := ""
						if r.Point != points[vm] {
							other = fmt.Sprintf(", not the plan's point %d", points[vm])
						}
						say(n, vm, "already failed over here (run %s from point %d%s, since %s): counted as started, not started again; the plan's hooks and agent wait are not run for it",
							r.ID, r.Point, other, r.Started.Format(time.RFC3339))
						rows[j] = row
						return
					}
				}
				r, err := m.Start(ctx, vm, Options{Point: points[vm], Test: test, Plan: p.Name, Force: opts.Force})
				if err != nil {
					row.Error = err.Error()
					say(n, vm, "failed to start: %v", err)
				} else {
					runs[j] = r
					row.Run, row.Point, row.PointAge = r.ID, r.Point, r.Started.Sub(r.Instant)
					row.ToRunning, row.Running = r.ToRunning, r.Started.Add(r.ToRunning)
					say(n, vm, "QEMU running from point %d (%v old) after %v", r.Point, row.PointAge.Round(time.Second), r.ToRunning.Round(time.Millisecond))
				}
				rows[j] = row
			}()
		}
		wg.Wait()
		timeout := st.Timeout
		if timeout <= 0 {
			timeout = DefaultStepTimeout
		}
		if st.WaitAgent {
			say(n, "", "waiting for the guest agents (up to %v)", timeout)
			wctx, cancel := context.WithTimeout(ctx, timeout)
			for j, r := range runs {
				if r == nil {
					continue
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := m.WaitAgent(wctx, r); err != nil {
						rows[j].Error = err.Error()
						say(n, r.VM, "agent not answering: %v", err)
						return
					}
					rows[j].ToAgent, rows[j].Agent = r.ToAgent, r.Started.Add(r.ToAgent)
					say(n, r.VM, "agent answering after %v", r.ToAgent.Round(time.Millisecond))
				}()
			}
			wg.Wait()
			cancel()
		} else if st.Delay > 0 {
			say(n, "", "waiting %v", st.Delay)
			select {
			case <-ctx.Done():
				return append(out, rows...), ctx.Err()
			case <-time.After(st.Delay):
			}
		}
		for j, r := range runs {
			if r == nil || rows[j].Error != "" {
				continue
			}
			if err := m.runHooks(ctx, p, r); err != nil {
				rows[j].Error = err.Error()
				say(n, r.VM, "%v", err)
			}
		}
		out = append(out, rows...)
		var failed []string
		for _, row := range rows {
			if row.Error != "" {
				failed = append(failed, row.VM)
			}
		}
		if len(failed) > 0 {
			return out, fmt.Errorf("plan %q: step %d failed for %s; later steps not run (the VMs started keep running)", p.Name, n, strings.Join(failed, ", "))
		}
		say(n, "", "step %d done", n)
	}
	return out, nil
}

// planPoints chooses the point each VM of p starts from: its latest, or its
// latest taken at or before before. VMs of p whose points come from one
// consistency group take the newest group point they all hold, so that they
// start from one instant (a member's own cycles, or a group cycle that
// committed some members' points only, leave them different latests). The
// points are pinned until release. A VM with no such point is an error that
// names every one, and nothing is pinned.
func (m *Manager) planPoints(ctx context.Context, p Plan, before time.Time, apart bool, say func(string)) (_ map[string]uint64, release func(), err error) {
	held := map[string][]lifeboat.Point{} // each VM's candidates, oldest first
	groups := map[string][]string{}       // group name: the VMs of p holding its points
	var vms, missing []string
	for _, st := range p.Steps {
		for _, vm := range st.VMs {
			pts, err := m.Store.Points(vm)
			if err != nil {
				return nil, nil, err
			}
			if !before.IsZero() {
				pts = slices.DeleteFunc(pts, func(pt lifeboat.Point) bool { return pt.Instant.After(before) })
			}
			if len(pts) == 0 {
				if _, err := m.point(vm, 0, before); err != nil {
					missing = append(missing, err.Error())
				}
				continue
			}
			vms, held[vm] = append(vms, vm), pts
			seen := map[string]bool{}
			for _, pt := range pts {
				if g := lifeboat.GroupName(pt.Group); g != "" && !seen[g] {
					seen[g] = true
					groups[g] = append(groups[g], vm)
				}
			}
		}
	}
	if len(missing) > 0 {
		return nil, nil, fmt.Errorf("plan %q: nothing started: %s", p.Name, strings.Join(missing, "; "))
	}
	out := map[string]uint64{}
	for _, vm := range vms {
		out[vm] = held[vm][len(held[vm])-1].ID
	}
	for _, g := range slices.Sorted(maps.Keys(groups)) {
		members := groups[g]
		if len(members) < 2 {
			continue
		}
		// The newest group point of the first member that every other holds.
		var tag string
		pts := held[members[0]]
		for i := len(pts) - 1; i >= 0 && tag == ""; i-- {
			if lifeboat.GroupName(pts[i].Group) != g {
				continue
			}
			tag = pts[i].Group
			for _, vm := range members[1:] {
				if !slices.ContainsFunc(held[vm], func(pt lifeboat.Point) bool { return pt.Group == tag }) {
					tag = ""
					break
				}
			}
		}
		if tag == "" && apart {
			say(fmt.Sprintf("%s hold no point of consistency group %q in common%s: each starts from its own point (--apart), NOT consistent with one another",
				strings.Join(members, ", "), g, beforeText(before)))
			continue
		}
		if tag == "" {
			return nil, nil, fmt.Errorf("plan %q: nothing started: vms %s hold points of consistency group %q but none of one group point all of them hold%s (`lifeboat points VM` lists them; `lifeboat sync %s` at the protected site takes one; `lifeboat plan run %s --apart` starts each from its own point, not consistent with one another)",
				p.Name, strings.Join(members, ", "), g, beforeText(before), g, p.Name)
		}
		for _, vm := range members {
			i := slices.IndexFunc(held[vm], func(pt lifeboat.Point) bool { return pt.Group == tag })
			out[vm] = held[vm][i].ID
		}
		say(fmt.Sprintf("%s start from consistency group %q's point %s, the newest all of them hold", strings.Join(members, ", "), g, tag))
	}
	id := "plan-" + p.Name + "-" + nonce()
	var pinned []string
	release = func() {
		for _, vm := range pinned {
			if err := m.Store.RemovePin(vm, id); err != nil {
				m.log().Error("removing a plan's pin", "plan", p.Name, "vm", vm, "err", err)
			}
		}
	}
	for _, vm := range vms {
		if err := m.Store.AddPin(ctx, vm, id, recovery.Pin{Point: out[vm], Reason: "recovery plan " + p.Name, Since: time.Now().UTC()}); err != nil {
			release()
			return nil, nil, fmt.Errorf("plan %q: nothing started: vm %q point %d: %w", p.Name, vm, out[vm], err)
		}
		pinned = append(pinned, vm)
	}
	return out, release, nil
}

func beforeText(before time.Time) string {
	if before.IsZero() {
		return ""
	}
	return " at or before " + instantText(before)
}

// instantText writes a point's instant, or a time compared with one, as
// exactly as `lifeboat points` lists instants: two in one second must not
// read alike in "no point at or before T; its oldest is point N of T".
func instantText(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func (m *Manager) runHooks(ctx context.Context, p Plan, r *Run) error {
	timeout := p.HookTimeout
	if timeout <= 0 {
		timeout = DefaultHookTimeout
	}
	var macs, nets []string
	for _, n := range r.Networks {
		nets = append(nets, n)
		if f := strings.Fields(n); len(f) > 1 {
			macs = append(macs, strings.TrimSuffix(f[1], ":"))
		}
	}
	for _, h := range p.Hooks {
		env := append(os.Environ(), "LIFEBOAT_VM="+r.VM, "LIFEBOAT_POINT="+strconv.FormatUint(r.Point, 10), "LIFEBOAT_RUN="+r.ID,
			"LIFEBOAT_TEST="+map[bool]string{true: "1", false: "0"}[r.Test], "LIFEBOAT_MACS="+strings.Join(macs, " "),
			"LIFEBOAT_NETWORKS="+strings.Join(nets, "; "), "LIFEBOAT_AGENT="+r.Agent, "LIFEBOAT_PLAN="+p.Name)
		// Bounded as freeze hooks are (hostcmd.Run): the hook's process
		// group is killed at its bound, and a child it leaves holding its
		// output does not hold the plan.
		res, err := hostcmd.Run(ctx, timeout, env, h)
		if err != nil {
			return fmt.Errorf("hook %s for vm %q: %v: %s", h, r.VM, err, res.Output)
		}
		m.log().Info("plan hook ran", "plan", p.Name, "vm", r.VM, "hook", h, "output", string(res.Output), "left_running", res.Lingering)
	}
	return nil
}

// planRun is a plan running now (Manager.plans).
type planRun struct {
	test   bool
	since  time.Time
	cancel context.CancelCauseFunc
	done   chan struct{} // closed once RunPlan returned
}

func (r *planRun) kind() string {
	if r.test {
		return "drill"
	}
	return "real failover"
}

var errPlanStopped = errors.New("the drill was stopped (`lifeboat plan stop`)")

// StopPlan ends every test run the plan started, and says how many. A drill
// of it under way is ended first, so that no later step starts a VM after
// the stop; a real run of it under way is not, and refuses the stop.
func (m *Manager) StopPlan(ctx context.Context, plan string) (int, error) {
	m.mu.Lock()
	pr := m.plans[plan]
	m.mu.Unlock()
	if pr != nil {
		if !pr.test {
			return 0, fmt.Errorf("plan %q is failing its VMs over for real now (since %s), not a drill: `plan stop` ends drills only; once it ends, `lifeboat failover VM --undo` gives up each VM it started", plan, pr.since.Format(time.RFC3339))
		}
		pr.cancel(errPlanStopped)
		select {
		case <-pr.done:
		case <-ctx.Done():
			return 0, fmt.Errorf("plan %q: waiting for its drill to stop: %w", plan, ctx.Err())
		}
	}
	runs, err := m.Runs("")
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, r := range runs {
		if r.Plan != plan || !r.Test {
			continue
		}
		if err := m.Stop(ctx, r); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// failedOverRun is vm's real (not test) run here, or nil when it has none.
// planContacts is the split-brain guard (checkContact) of each VM of a
// real plan that is not failed over here yet.
func (m *Manager) planContacts(p Plan) error {
	var (
		first error
		more  []string
	)
	for _, st := range p.Steps {
		for _, vm := range st.VMs {
			if r, err := m.failedOverRun(vm); err != nil {
				return fmt.Errorf("plan %q: nothing started: %w", p.Name, err)
			} else if r != nil {
				continue
			}
			if err := m.checkContact(vm); err == nil {
				continue
			} else if first == nil {
				first = err
			} else {
				more = append(more, "; "+err.Error())
			}
		}
	}
	if first != nil {
		return fmt.Errorf("plan %q: nothing started: %w%s (`lifeboat plan run %s --force` starts them all when their production sites are known lost or fenced)",
			p.Name, first, strings.Join(more, ""), p.Name)
	}
	return nil
}

func (m *Manager) failedOverRun(vm string) (*Run, error) {
	runs, err := m.Runs(vm)
	if err != nil {
		return nil, err
	}
	for _, r := range runs {
		if !r.Test {
			return r, nil
		}
	}
	return nil, nil
}

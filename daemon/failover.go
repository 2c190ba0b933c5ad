package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
)

// FailoverRequest starts a VM at this recovery site from one of its points.
type FailoverRequest struct {
	Point uint64 `json:"point,omitempty"` // 0: the latest
	// Before, with no Point: the latest point taken at or before it.
	Before time.Time `json:"before,omitzero"`
	Test   bool      `json:"test,omitempty"`
	// Force fails over although the production site was in contact a
	// moment ago (it is known lost, or fenced).
	Force bool `json:"force,omitempty"`
	// AcceptDamage starts the VM even from a point with an image cut short
	// or a block a verify found damaged (failover.Options.AcceptDamage).
	AcceptDamage bool `json:"accept_damage,omitempty"`
	// AgentWait bounds the wait for the guest agent after QEMU runs (0: do
	// not wait).
	AgentWait time.Duration `json:"agent_wait_ns,omitempty"`
}

// RunAction ends or keeps a run.
type RunAction struct {
	Action string `json:"action"` // "stop" (a test's end, or a failover's undo) or "commit"
}

func (a *apiServer) recoveryOnly(w http.ResponseWriter, what, vm string) bool {
	if a.d.runs == nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("site %q is not a recovery site (no `listen:` in %s): run `lifeboat %s` at the recovery site that holds vm %q", a.d.cfg.Site, a.d.cfg.Path(), what, vm))
		return false
	}
	return true
}

func (a *apiServer) failover(w http.ResponseWriter, r *http.Request) {
	vm := r.PathValue("vm")
	if !a.recoveryOnly(w, "failover", vm) {
		return
	}
	var req FailoverRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("failover request: %w", err))
		return
	}
	// The VM outlives this request: its start is not cancelled with it.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 2*time.Minute)
	defer cancel()
	run, err := a.d.runs.Start(ctx, vm, failover.Options{Point: req.Point, Before: req.Before, Test: req.Test, Force: req.Force, AcceptDamage: req.AcceptDamage})
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	if req.AgentWait > 0 {
		actx, acancel := context.WithTimeout(r.Context(), req.AgentWait)
		err := a.d.runs.WaitAgent(actx, run)
		acancel()
		if err != nil {
			a.d.log.Warn("started VM's agent did not answer", "vm", vm, "run", run.ID, "err", err)
		}
	}
	writeJSON(w, http.StatusOK, run)
}

func (a *apiServer) runs(w http.ResponseWriter, r *http.Request) {
	if a.d.runs == nil {
		writeJSON(w, http.StatusOK, []*failover.Run{})
		return
	}
	runs, err := a.d.runs.Runs(r.URL.Query().Get("vm"))
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	if runs == nil {
		runs = []*failover.Run{}
	}
	writeJSON(w, http.StatusOK, runs)
}

func (a *apiServer) runAction(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !a.recoveryOnly(w, "failover", id) {
		return
	}
	var req RunAction
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("run request: %w", err))
		return
	}
	run, status, err := a.d.run(id)
	if err != nil {
		writeErr(w, status, err)
		return
	}
	switch req.Action {
	case "stop":
		if !run.Test {
			// An undo and a failback of the VM exclude each other: the
			// undo is refused once a failback began (Manager.Stop), which
			// the run's record, read again now, says.
			release, herr := a.d.holdUndo(run.VM)
			if herr != nil {
				writeErr(w, http.StatusConflict, herr)
				return
			}
			defer release()
			if run, status, err = a.d.run(id); err != nil {
				writeErr(w, status, err)
				return
			}
		}
		err = a.d.runs.Stop(context.WithoutCancel(r.Context()), run)
	case "commit":
		err = a.d.runs.Commit(run)
	default:
		err = fmt.Errorf("unknown action %q: use stop or commit", req.Action)
	}
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, run)
}

// Failover starts vm at the recovery site from a point (a test when req.Test).
func (c *Client) Failover(ctx context.Context, vm string, req FailoverRequest) (*failover.Run, error) {
	var run failover.Run
	if err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/failover", req, &run); err != nil {
		return nil, err
	}
	return &run, nil
}

// Runs lists the VMs started from their points at this recovery site (vm's
// only, unless vm is "").
func (c *Client) Runs(ctx context.Context, vm string) ([]*failover.Run, error) {
	var runs []*failover.Run
	err := c.getJSON(ctx, http.MethodGet, "/v1/runs?vm="+url.QueryEscape(vm), nil, &runs)
	return runs, err
}

// RunAction stops or commits a run.
func (c *Client) RunAction(ctx context.Context, id, action string) (*failover.Run, error) {
	var run failover.Run
	if err := c.getJSON(ctx, http.MethodPost, "/v1/runs/"+url.PathEscape(id), RunAction{Action: action}, &run); err != nil {
		return nil, err
	}
	return &run, nil
}

// MigrateRequest is a planned migration of a protected VM to its recovery site.
type MigrateRequest struct {
	ShutdownTimeout time.Duration `json:"shutdown_timeout_ns,omitempty"`
}

// MigrateReply is what the migration did.
type MigrateReply struct {
	Point     uint64        `json:"point"`
	ShutDown  bool          `json:"shut_down"` // the guest powered off (else its CPUs were stopped)
	Note      string        `json:"note"`
	Run       string        `json:"run"`
	Epoch     uint64        `json:"epoch"`
	ToRunning time.Duration `json:"to_running_ns"` // at the recovery site, from its request
	Took      time.Duration `json:"took_ns"`
	Peer      string        `json:"peer"`
}

func (a *apiServer) migrate(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if g, ok := a.d.groups[name]; ok {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("%q is a consistency group (members %v): a planned migration moves one VM, and a group's members are replicated together; fail the group over together at the recovery site (`lifeboat plan run`)", name, g.cfg.VMs))
		return
	}
	v, ok := a.d.vmOf(name)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q is not protected by site %q (see `vms:` in %s): run `lifeboat failover %s --planned` at the site that protects it", name, a.d.cfg.Site, a.d.cfg.Path(), name))
		return
	}
	var req MigrateRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("migrate request: %w", err))
		return
	}
	mig, err := v.migrate(context.WithoutCancel(r.Context()), req.ShutdownTimeout)
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, MigrateReply{Point: mig.Point.ID, ShutDown: mig.ShutDown, Note: mig.Point.Note, Run: mig.Run.Run,
		Epoch: mig.Run.Epoch, ToRunning: mig.Run.ToRunning, Took: mig.Took, Peer: v.cfg.Peer})
}

// Migrate moves a protected VM to its recovery site with no loss (run at
// the protected site).
func (c *Client) Migrate(ctx context.Context, vm string, req MigrateRequest) (MigrateReply, error) {
	var out MigrateReply
	err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/migrate", req, &out)
	return out, err
}

// PlanRequest runs a recovery plan (a test of it when Test).
type PlanRequest struct {
	Test  bool `json:"test,omitempty"`
	Force bool `json:"force,omitempty"` // see FailoverRequest.Force
	// Before: each VM from its latest point taken at or before it.
	Before time.Time `json:"before,omitzero"`
	Apart  bool      `json:"apart,omitempty"` // see failover.PlanOptions.Apart
}

func (a *apiServer) plan(w http.ResponseWriter, r *http.Request) (PlanConfig, bool) {
	name := r.PathValue("name")
	if !a.recoveryOnly(w, "plan", name) {
		return PlanConfig{}, false
	}
	p, ok := a.d.cfg.Plan(name)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no recovery plan %q under `plans:` in %s", name, a.d.cfg.Path()))
	}
	return p, ok
}

func (a *apiServer) planRun(w http.ResponseWriter, r *http.Request) {
	p, ok := a.plan(w, r)
	if !ok {
		return
	}
	var req PlanRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("plan request: %w", err))
		return
	}
	st := newStream(w)
	rows, err := a.d.runs.RunPlan(context.WithoutCancel(r.Context()), p.plan(), failover.PlanOptions{Test: req.Test, Force: req.Force, Before: req.Before, Apart: req.Apart}, func(e failover.PlanEvent) {
		st.send(Event{Progress: e})
	})
	out := Event{Plan: rows}
	if out.Plan == nil {
		out.Plan = []failover.PlanVM{}
	}
	if err != nil {
		out.Error = err.Error()
	}
	st.send(out)
}

func (a *apiServer) planStop(w http.ResponseWriter, r *http.Request) {
	p, ok := a.plan(w, r)
	if !ok {
		return
	}
	n, err := a.d.runs.StopPlan(context.WithoutCancel(r.Context()), p.Name)
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"stopped": n})
}

// RunPlan runs a recovery plan at the recovery site, handing each progress
// event to progress; the summary comes with the plan's error, if any.
func (c *Client) RunPlan(ctx context.Context, name string, req PlanRequest, progress func(failover.PlanEvent)) ([]failover.PlanVM, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/plans/"+url.PathEscape(name)+"/run", req)
	if err != nil {
		return nil, err
	}
	e, err := events(resp, func(raw json.RawMessage) {
		var pe failover.PlanEvent
		if progress != nil && json.Unmarshal(raw, &pe) == nil {
			progress(pe)
		}
	})
	if err != nil {
		// The site's daemon went away mid-plan (a restart, a crash): what
		// it started keeps running, and a run of the plan again counts it.
		next := fmt.Sprintf("`lifeboat plan run %s` again counts the VMs failed over already and starts the others", name)
		if req.Test {
			next = fmt.Sprintf("`lifeboat plan stop %s` ends the drill's test runs", name)
		}
		return nil, fmt.Errorf("plan %q: %w; the VMs it started before that keep running: `lifeboat failover --list` lists them; %s", name, err, next)
	}
	if e.Error != "" {
		return e.Plan, errors.New(e.Error)
	}
	return e.Plan, nil
}

// StopPlan ends the test runs a plan started, and says how many.
func (c *Client) StopPlan(ctx context.Context, name string) (int, error) {
	var out map[string]int
	err := c.getJSON(ctx, http.MethodPost, "/v1/plans/"+url.PathEscape(name)+"/stop", struct{}{}, &out)
	return out["stopped"], err
}

// run is this site's run id, or an error and its HTTP status.
func (d *Daemon) run(id string) (*failover.Run, int, error) {
	runs, err := d.runs.Runs("")
	if err != nil {
		return nil, http.StatusInternalServerError, err
	}
	for _, x := range runs {
		if x.ID == id {
			return x, http.StatusOK, nil
		}
	}
	return nil, http.StatusNotFound, fmt.Errorf("no run %q at site %q (`lifeboat failover --list` lists them)", id, d.cfg.Site)
}

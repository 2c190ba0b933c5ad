package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// failbackVM is what a failback asked of this (production) site needs to
// know of one of its VMs.
func (d *Daemon) failbackVM(ctx context.Context, name string) (failback.VMInfo, bool) {
	v, ok := d.vms[name]
	if !ok {
		return failback.VMInfo{}, false
	}
	info := failback.VMInfo{Peer: v.cfg.Peer, WorkDir: v.p.VM.WorkDir}
	if v.cfg.Libvirt != nil {
		info.Why = "it is a libvirt domain: failing back into its disks through libvirt is not built yet"
		return info, true
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if m, err := qemu.Dial(cctx, v.cfg.QMP); err == nil {
		m.Close()
		info.Running = true
	}
	return info, true
}

// failback runs one failback cycle of vm, which runs here after a failover,
// to its production site.
func (a *apiServer) failback(w http.ResponseWriter, r *http.Request) {
	vm := r.PathValue("vm")
	if !a.recoveryOnly(w, "failback", vm) {
		return
	}
	runs, err := a.d.runs.Runs(vm)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	run := lastRealRun(runs)
	if run == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q does not run at site %q after a failover: there is nothing to fail back (`lifeboat failover --list`)", vm, a.d.cfg.Site))
		return
	}
	home, err := failback.Home(run)
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	ctx := r.Context()
	c, err := a.d.peer(ctx, home)
	if err != nil {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q fails back to site %q: %w (add it to `peers:` in %s with the address it listens on)", vm, home, err, a.d.cfg.Path()))
		return
	}
	// From here the answer is a stream: progress, then the point or the error.
	st := newStream(w)
	progress := make(chan protect.Progress, 16)
	b := &failback.Back{Run: run, Store: a.d.store, Site: a.d.cfg.Site, Client: c, StateDir: a.d.cfg.StateDir, Log: a.d.log,
		Progress: func(p protect.Progress) {
			select {
			case progress <- p:
			default: // the client reads slowly: a later report says as much
			}
		}}
	if r.URL.Query().Get("finalize") == "" {
		streamCycle(st, progress, func() (lifeboat.Point, error) { return b.Cycle(ctx) })
		return
	}
	var opts failback.FinalizeOptions
	if s := r.URL.Query().Get("shutdown_timeout"); s != "" {
		if opts.ShutdownTimeout, err = time.ParseDuration(s); err != nil {
			st.send(Event{Error: fmt.Sprintf("shutdown_timeout %q: %v", s, err)})
			return
		}
	}
	var fin failback.Finalized
	streamCycle(st, progress, func() (lifeboat.Point, error) {
		var err error
		fin, err = b.Finalize(ctx, a.d.runs, opts)
		return fin.Fold, err
	}, func(e *Event) { e.Finalized = &fin })
}

// Failback runs one failback cycle of vm to its production site, reporting
// progress, and returns the point the production disks hold after it.
func (c *Client) Failback(ctx context.Context, vm string, progress func(protect.Progress)) (lifeboat.Point, error) {
	e, err := c.cycle(ctx, "/v1/vms/"+url.PathEscape(vm)+"/failback", progress)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if e.Error != "" {
		return lifeboat.Point{}, errors.New(e.Error)
	}
	if e.Point == nil {
		return lifeboat.Point{}, errors.New("the site answered without a point")
	}
	return *e.Point, nil
}

// Finalize brings vm home (see failback.Back.Finalize), reporting the
// progress of its last cycles; shutdownTimeout 0 is the default.
func (c *Client) Finalize(ctx context.Context, vm string, shutdownTimeout time.Duration, progress func(protect.Progress)) (failback.Finalized, error) {
	path := "/v1/vms/" + url.PathEscape(vm) + "/failback?finalize=1"
	if shutdownTimeout > 0 {
		path += "&shutdown_timeout=" + url.QueryEscape(shutdownTimeout.String())
	}
	e, err := c.cycle(ctx, path, progress)
	if err != nil {
		return failback.Finalized{}, err
	}
	if e.Error != "" {
		return failback.Finalized{}, errors.New(e.Error)
	}
	if e.Finalized == nil {
		return failback.Finalized{}, errors.New("the site answered without the finalize's result")
	}
	return *e.Finalized, nil
}

// lastRealRun is the newest run of a real (not test) failover, or nil.
func lastRealRun(runs []*failover.Run) *failover.Run {
	var last *failover.Run
	for _, r := range runs {
		if !r.Test && (last == nil || r.Started.After(last.Started)) {
			last = r
		}
	}
	return last
}

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
	"github.com/lifeboat-dr/lifeboat/wire"
)

// failbackVM is what a failback asked of this (production) site needs to
// know of one of its VMs.
func (d *Daemon) failbackVM(ctx context.Context, name string) (failback.VMInfo, bool) {
	v, ok := d.vmOf(name)
	if !ok {
		return failback.VMInfo{}, false
	}
	info := failback.VMInfo{Peer: v.cfg.Peer, WorkDir: v.p.VM.WorkDir, Libvirt: v.cfg.Libvirt != nil}
	if v.cfg.Libvirt != nil {
		on, err := v.domainActive(ctx)
		if err != nil {
			info.Why = fmt.Sprintf("libvirt cannot say whether domain %q runs: %v", v.cfg.Libvirt.Domain, err)
		}
		info.Running = on
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
	finalize := r.URL.Query().Get("finalize") != ""
	var opts failback.FinalizeOptions
	if finalize {
		// Before startBack marks the failback under way: a refusal after
		// it left the mark for good.
		var err error
		if opts, err = finalizeOptions(r); err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("vm %q: finalize: %w", vm, err))
			return
		}
	}
	bc, ok := a.startBack(w, r, vm, "fail back", finalize, nil)
	if !ok {
		return
	}
	ctx, home, c, track, b, progress := r.Context(), bc.home, bc.c, bc.track, bc.back, bc.progress
	// From here the answer is a stream: progress, then the point or the error.
	st := newStream(w)
	if !finalize {
		streamCycle(st, progress, func() (lifeboat.Point, error) {
			pt, err := b.Cycle(ctx)
			track.end(a.d, pt.ID, err)
			a.d.dropPeer(home, c, err)
			return pt, err
		})
		return
	}
	var fin failback.Finalized
	streamCycle(st, progress, func() (lifeboat.Point, error) {
		var err error
		fin, err = b.Finalize(ctx, a.d.runs, opts)
		track.end(a.d, fin.Last.ID, err)
		a.d.dropPeer(home, c, err)
		if err == nil {
			a.d.mu.Lock()
			delete(a.d.backs, vm) // home: the VM is not this site's to run any more
			a.d.mu.Unlock()
		}
		return fin.Fold, err
	}, func(e *Event) { e.Finalized = &fin })
}

// finalizeOptions reads a finalize's shutdown_timeout and wait (durations
// of 0 or more; 0 or absent: the defaults).
func finalizeOptions(r *http.Request) (failback.FinalizeOptions, error) {
	var opts failback.FinalizeOptions
	for name, dst := range map[string]*time.Duration{"shutdown_timeout": &opts.ShutdownTimeout, "wait": &opts.Wait} {
		s := r.URL.Query().Get(name)
		if s == "" {
			continue
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return opts, fmt.Errorf("%s %q: give a duration of 0 or more, e.g. 2m", name, s)
		}
		*dst = d
	}
	return opts, nil
}

// backCall is a failback (or a reversal) begun at the recovery site: the
// VM's failover run, its production site and a client of it, the status
// entry that tracks it, and the failback to run, reporting to progress.
type backCall struct {
	home     string
	c        *wire.Client
	track    *FailingBack
	back     *failback.Back
	progress chan protect.Progress
}

// startBack begins what (a failback, a reversal) of vm, which runs here
// after a failover: check, if not nil, refuses a run unfit for it. When it
// returns false it has answered w.
func (a *apiServer) startBack(w http.ResponseWriter, r *http.Request, vm, what string, finalize bool, check func(*failover.Run) error) (*backCall, bool) {
	if !a.recoveryOnly(w, what, vm) {
		return nil, false
	}
	runs, err := a.d.runs.Runs(vm)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return nil, false
	}
	run := lastRealRun(runs)
	if run == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q does not run at site %q after a failover: there is nothing to %s (`lifeboat failover --list`)", vm, a.d.cfg.Site, what))
		return nil, false
	}
	if check != nil {
		if err := check(run); err != nil {
			writeErr(w, http.StatusConflict, err)
			return nil, false
		}
	}
	home, err := failback.Home(run)
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return nil, false
	}
	c, err := a.d.peer(r.Context(), home)
	if err != nil {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q: to %s it, site %q: %w (add it to `peers:` in %s with the address it listens on)", vm, what, home, err, a.d.cfg.Path()))
		return nil, false
	}
	track, err := a.d.beginBack(vm, home, finalize)
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return nil, false
	}
	bc := &backCall{home: home, c: c, track: track, progress: make(chan protect.Progress, 16)}
	// Once production takes the failback, its disks may take this VM's
	// state: the run records it, and the failover cannot be undone any
	// more (failover.Manager.Stop).
	bc.back = &failback.Back{Run: run, Store: a.d.store, Site: a.d.cfg.Site, Client: c, StateDir: a.d.cfg.StateDir, Log: a.d.log, Began: a.d.runs.Record,
		Progress: func(p protect.Progress) {
			a.d.backProgress(vm, p)
			select {
			case bc.progress <- p:
			default: // the client reads slowly: a later report says as much
			}
		}}
	return bc, true
}

// FailingBack is, at the recovery site, a VM's failback to its production
// site: the cycle under way, if one is, and how the last one ended.
type FailingBack struct {
	To         string            `json:"to"`
	Running    bool              `json:"running"` // a failback cycle (or finalize) is under way
	Finalizing bool              `json:"finalizing,omitempty"`
	Started    time.Time         `json:"started,omitzero"`
	Progress   *protect.Progress `json:"progress,omitempty"`
	// Rate is the bytes of changed blocks handled per second since the
	// send began, ETA the seconds left at that rate.
	Rate      float64   `json:"rate_bytes_per_second,omitempty"`
	ETA       float64   `json:"eta_seconds,omitempty"`
	LastPoint uint64    `json:"last_point,omitempty"` // the failback point production's disks took last
	LastAt    time.Time `json:"last_at,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	sendStart time.Time
}

// beginBack records that a failback cycle of vm to home starts; one at a time.
func (d *Daemon) beginBack(vm, home string, finalize bool) (*FailingBack, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fb := d.backs[vm]
	if fb == nil {
		fb = &FailingBack{}
		d.backs[vm] = fb
	}
	if fb.Running {
		return nil, fmt.Errorf("vm %q: a failback to %s is under way since %s: wait for it (`lifeboat status`)", vm, fb.To, fb.Started.UTC().Format(time.RFC3339))
	}
	if d.undoing[vm] {
		return nil, fmt.Errorf("vm %q: its failover is being undone: there is nothing to fail back", vm)
	}
	fb.To, fb.Running, fb.Finalizing, fb.Started, fb.Progress, fb.Rate, fb.ETA, fb.sendStart = home, true, finalize, time.Now(), nil, 0, 0, time.Time{}
	return fb, nil
}

// holdUndo keeps a failback of vm from starting until release, and refuses
// while one is under way.
func (d *Daemon) holdUndo(vm string) (release func(), err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if fb := d.backs[vm]; fb != nil && fb.Running {
		return nil, fmt.Errorf("vm %q: a failback to %s is under way since %s: its failover cannot be undone (a failback that began writes into production's disks: finish it with `lifeboat failback %s --finalize`)", vm, fb.To, fb.Started.UTC().Format(time.RFC3339), vm)
	}
	if d.undoing[vm] {
		return nil, fmt.Errorf("vm %q: its failover is being undone already", vm)
	}
	d.undoing[vm] = true
	return func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		delete(d.undoing, vm)
	}, nil
}

// backProgress notes a failback cycle's progress report.
func (d *Daemon) backProgress(vm string, p protect.Progress) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fb := d.backs[vm]
	if fb == nil {
		return
	}
	now := time.Now()
	fb.Progress = &p
	if p.Phase == "send" && fb.sendStart.IsZero() {
		fb.sendStart = now
	}
	if el := now.Sub(fb.sendStart).Seconds(); !fb.sendStart.IsZero() && el > 0 && p.Done > 0 {
		fb.Rate = float64(p.Done) / el
		fb.ETA = float64(p.Total-p.Done) / fb.Rate
	}
}

// end records how a failback cycle ended.
func (fb *FailingBack) end(d *Daemon, point uint64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fb.Running, fb.Progress, fb.ETA = false, nil, 0
	if err != nil {
		fb.LastError = err.Error()
		return
	}
	fb.LastError, fb.LastPoint, fb.LastAt = "", point, time.Now()
}

// backStatus is vm's failback as status shows it, if it had one here.
func (d *Daemon) backStatus(vm string) *FailingBack {
	d.mu.Lock()
	defer d.mu.Unlock()
	fb, ok := d.backs[vm]
	if !ok {
		return nil
	}
	c := *fb
	return &c
}

// Failback runs one failback cycle of vm to its production site, reporting
// progress, and returns the point the production disks hold after it.
func (c *Client) Failback(ctx context.Context, vm string, progress func(protect.Progress)) (lifeboat.Point, error) {
	return pointOf(c.cycle(ctx, "/v1/vms/"+url.PathEscape(vm)+"/failback", progress))
}

// pointOf is the point a streamed answer ended with, or its error.
func pointOf(e Event, err error) (lifeboat.Point, error) {
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
// progress of its last cycles; opts' zero fields are the defaults (wait 0:
// it returns once the VM is handed over).
func (c *Client) Finalize(ctx context.Context, vm string, opts failback.FinalizeOptions, progress func(protect.Progress)) (failback.Finalized, error) {
	path := "/v1/vms/" + url.PathEscape(vm) + "/failback?finalize=1"
	if opts.ShutdownTimeout > 0 {
		path += "&shutdown_timeout=" + url.QueryEscape(opts.ShutdownTimeout.String())
	}
	if opts.Wait > 0 {
		path += "&wait=" + url.QueryEscape(opts.Wait.String())
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

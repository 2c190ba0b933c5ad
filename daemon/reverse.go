package daemon

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// Protection in reverse: a VM failed over here for good is protected from
// here back to its old production site, which keeps its restore points from
// the disks it had (failback.Store.Reverse): nothing is copied whole.

// defaultReverseInterval is how often a VM protected in reverse replicates
// when the command names no interval.
const defaultReverseInterval = 5 * time.Minute

// reverse protects vm, which runs here after a committed failover, back to
// its old production site: POST /v1/vms/{vm}/reverse?interval=D.
func (a *apiServer) reverse(w http.ResponseWriter, r *http.Request) {
	vm := r.PathValue("vm")
	if !a.recoveryOnly(w, "protect --reverse", vm) {
		return
	}
	interval := defaultReverseInterval
	if s := r.URL.Query().Get("interval"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < time.Second {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("interval %q: give a duration of a second or more, e.g. 5m", s))
			return
		}
		interval = d
	}
	if v, ok := a.d.vmOf(vm); ok && v.reverse == "" {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q is protected by this site's config (`vms:` in %s): protection in reverse is for a VM failed over here", vm, a.d.cfg.Path()))
		return
	}
	bc, ok := a.startBack(w, r, vm, "protect in reverse", false, func(run *failover.Run) error {
		if !run.Committed {
			return fmt.Errorf("vm %q: its failover (run %s) is not committed: commit it first (`lifeboat failover %s --commit`), since a VM protected in reverse stays here", vm, run.ID, vm)
		}
		return nil
	})
	if !ok {
		return
	}
	st := newStream(w)
	streamCycle(st, bc.progress, func() (lifeboat.Point, error) {
		pt, err := a.d.reverseRun(r.Context(), bc.back, interval)
		bc.track.end(a.d, pt.ID, err)
		a.d.dropPeer(bc.home, bc.c, err)
		return pt, err
	})
}

// reverseRun has run's old production site adopt its disks as the VM's
// first point there (after a failback cycle, when they do not hold one of
// this site's failback points yet), records the reversal in the run, and
// starts protecting the VM to that site. It returns the adopted point.
func (d *Daemon) reverseRun(ctx context.Context, b *failback.Back, interval time.Duration) (lifeboat.Point, error) {
	run, c := b.Run, b.Client
	adopted, err := c.Reverse(ctx, run.VM)
	if err != nil {
		// Production adopts disks that hold a failback point: send one.
		d.log.Info("protection in reverse: a failback cycle first, to make the production disks the VM's", "vm", run.VM, "peer", c.Peer(), "why", err)
		if _, cerr := b.Cycle(ctx); cerr != nil {
			return lifeboat.Point{}, cerr
		}
		if adopted, err = c.Reverse(ctx, run.VM); err != nil {
			return lifeboat.Point{}, err
		}
	}
	if run.Reverse == nil || run.Reverse.Point != adopted.ID {
		run.Reverse = &failover.Reverse{Peer: c.Peer(), Point: adopted.ID, Since: time.Now().UTC()}
	}
	run.Reverse.Interval = interval
	if err := d.runs.Record(run); err != nil {
		return lifeboat.Point{}, err
	}
	if err := d.protectReverse(run); err != nil {
		return lifeboat.Point{}, err
	}
	d.log.Info("vm protected in reverse", "vm", run.VM, "peer", run.Reverse.Peer, "point", adopted.ID, "interval", interval)
	return adopted, nil
}

// protectReverse protects run's VM to its old production site on its
// schedule, as a VM of the config is (status, sync, metrics): once after a
// reversal, and for every reversed run when the site starts.
func (d *Daemon) protectReverse(run *failover.Run) error {
	rv := run.Reverse
	d.vmsMu.Lock()
	if d.bgClosed {
		d.vmsMu.Unlock()
		return fmt.Errorf("vm %q: site %q is stopping: its protection in reverse starts with the site", run.VM, d.cfg.Site)
	}
	if v, ok := d.vms[run.VM]; ok {
		d.vmsMu.Unlock()
		if v.reverse != run.ID {
			return fmt.Errorf("vm %q is protected by this site already (`vms:` in %s): it cannot be protected in reverse too", run.VM, d.cfg.Path())
		}
		return nil // scheduled already; the new interval applies at the site's next start
	}
	c := VMConfig{Name: run.VM, QMP: run.QMP, Peer: rv.Peer, Interval: Duration(rv.Interval), RPOTarget: Duration(3 * rv.Interval),
		Consistency: string(lifeboat.Crash), OnQuiesceFailure: "crash"}
	switch {
	case run.Domain != "":
		// Its libvirt domain: reached through libvirtd, frozen through its agent.
		c.QMP, c.Libvirt, c.Consistency = "", &LibvirtConfig{URI: run.Libvirt, Domain: run.Domain}, string(lifeboat.Filesystem)
	case run.Agent != "":
		c.Consistency, c.Agent = string(lifeboat.Filesystem), run.Agent
	}
	v := newVM(d, c)
	// The failback cycles' directory: one NBD server socket lifeboat knows
	// as its own in the run's QEMU, whichever of them left it (under
	// libvirt: the hidden checkpoints its cycles continue from).
	v.p.VM.WorkDir = filepath.Join(run.Dir, "failback")
	v.reverse = run.ID
	d.vms[run.VM] = v
	d.vmsMu.Unlock()
	d.bg.Add(1)
	go func() { defer d.bg.Done(); v.schedule(d.ctx) }()
	return nil
}

// protectReversed starts the schedule of every VM this site protects in
// reverse (at the site's start).
func (d *Daemon) protectReversed() {
	runs, err := d.runs.Runs("")
	if err != nil {
		d.log.Error("reading the failover runs: VMs protected in reverse are not replicated until the next start", "err", err)
		return
	}
	for _, run := range runs {
		if run.Test || run.Reverse == nil {
			continue
		}
		if err := d.protectReverse(run); err != nil {
			d.log.Error("protection in reverse", "vm", run.VM, "err", err)
		}
	}
}

// Reverse protects vm, failed over to this site and committed, back to its
// old production site, reporting the failback cycle's progress if one
// runs first; it returns the VM's first point there.
func (c *Client) Reverse(ctx context.Context, vm string, interval time.Duration, progress func(protect.Progress)) (lifeboat.Point, error) {
	q := url.Values{}
	if interval > 0 {
		q.Set("interval", interval.String())
	}
	return pointOf(c.cycle(ctx, "/v1/vms/"+url.PathEscape(vm)+"/reverse?"+q.Encode(), progress))
}

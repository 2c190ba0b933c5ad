package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/hostcmd"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// A failback ends at this production site when the recovery site finishes
// it (the FinishFailback RPC): the VM's disks hold its last state, and the
// recovery site then hands the VM back and quits its QEMU there. From then
// on the VM is this site's to run again. homecoming takes it from there:
//
//  1. it waits until the recovery site has handed the VM over (its Latest
//     no longer answers "failed over"), so that the VM never runs at both
//     sites, not even paused there;
//  2. unless the VM runs already, it runs the config's `start:` command, or
//     says in the log that the VM is to be started here;
//  3. it waits until the VM's QMP answers (and, for a QEMU that says, its
//     guest has been started), and runs a cycle at once: replication
//     resumes from the recovery site's fold point, incrementally.
//
// The recovery site's finalize waits for that first point (its --wait).

// Bounds of a homecoming. The waits poll: the handover and the VM's start
// are another site's and another tool's doing.
const (
	homePoll         = 250 * time.Millisecond
	homeStartTimeout = 2 * time.Minute // the start: command's own run
	homeLogEvery     = time.Minute     // how often a wait says it still waits
	homeResumeTries  = 20              // cycles refused as "failed over" (the handover not seen yet)
)

// endFailback is the wire server's EndFailback: the failback store ends the
// failback, then the VM comes home in the background.
func (d *Daemon) endFailback(finish func(context.Context, string, string, uint64, lifeboat.Point) (map[string]string, error)) func(context.Context, string, string, uint64, lifeboat.Point) (map[string]string, error) {
	return func(ctx context.Context, site, vm string, held uint64, fold lifeboat.Point) (map[string]string, error) {
		gens, err := finish(ctx, site, vm, held, fold)
		if err != nil {
			return nil, err
		}
		if v, ok := d.vmOf(vm); ok {
			v.comeHome(d.ctx, fold.ID)
		}
		return gens, nil
	}
}

// comeHome starts the VM's homecoming, unless one is under way.
func (v *vm) comeHome(ctx context.Context, fold uint64) {
	v.mu.Lock()
	if v.homing {
		v.mu.Unlock()
		return
	}
	v.homing = true
	v.mu.Unlock()
	go func() {
		defer func() {
			v.mu.Lock()
			v.homing = false
			v.mu.Unlock()
		}()
		if err := v.homecoming(ctx, fold); err != nil && ctx.Err() == nil {
			v.d.log.Error("failback finished, but the VM did not resume here: "+err.Error(), "vm", v.cfg.Name)
		}
	}()
}

func (v *vm) homecoming(ctx context.Context, fold uint64) error {
	log := v.d.log.With("vm", v.cfg.Name, "fold", fold)
	v.setState(stateHoming, nil)
	if err := v.awaitHandover(ctx, log); err != nil {
		return err
	}
	if !v.runs(ctx) {
		if v.cfg.Libvirt != nil {
			if err := v.startDomain(ctx, log); err != nil {
				log.Error("failback finished: starting the libvirt domain failed; start it by hand (virsh start), lifeboat waits for it", "domain", v.cfg.Libvirt.Domain, "err", err)
			}
		} else if len(v.cfg.Start) > 0 {
			if err := v.start(ctx, log); err != nil {
				// The VM may still be started by hand: keep waiting for it.
				log.Error("failback finished: the config's start: command failed; start the VM here by hand, lifeboat waits for it", "err", err)
			}
		} else {
			log.Warn("failback finished: start the VM here (its config has no start: command); lifeboat resumes its replication as soon as its QMP answers", "qmp", v.cfg.QMP)
		}
		if err := poll(ctx, log, "waiting for the VM to run here", v.runs); err != nil {
			return err
		}
	}
	log.Warn("the VM runs here again: its replication resumes from the recovery site's fold point")
	v.setState("idle", nil)
	if v.group != "" {
		return nil // its group's schedule cycles it with the others
	}
	for i := 0; ; i++ {
		_, err := v.sync(ctx, false, true) // a VM failed back home is protected again
		if err == nil || !recovery.IsFailedOver(err) || i == homeResumeTries {
			return err
		}
		if err := sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

// stateHoming is a VM's state from the end of its failback until it runs here.
const stateHoming = "coming-home"

// awaitHandover waits until the VM's recovery site no longer says it runs
// there: the finalize has handed it over and quit the recovered QEMU.
func (v *vm) awaitHandover(ctx context.Context, log *slog.Logger) error {
	return poll(ctx, log, "waiting for the recovery site to hand the VM over", func(ctx context.Context) bool {
		peer, err := v.d.peer(ctx, v.cfg.Peer)
		if err != nil {
			return false
		}
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, _, err = peer.Latest(lctx, v.cfg.Name)
		v.d.dropPeer(v.cfg.Peer, peer, err)
		return err == nil
	})
}

// start runs the config's start: command, bounded, and says what it said.
func (v *vm) start(ctx context.Context, log *slog.Logger) error {
	sctx, cancel := context.WithTimeout(ctx, homeStartTimeout)
	defer cancel()
	cmd := exec.CommandContext(sctx, v.cfg.Start[0], v.cfg.Start[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A command that starts the VM in the background (`qemu-system-x86_64
	// ... &`) leaves it holding the output: read it no longer once the
	// command has ended. Unlike a hook's (hostcmd.Run), the command's process
	// group is not killed at the bound: it may hold the VM just started.
	cmd.WaitDelay = hostcmd.WaitDelay
	log.Warn("failback finished: starting the VM here", "command", strings.Join(v.cfg.Start, " "))
	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) {
		log.Info("the start: command ended and left a process (the VM?) holding its output; lifeboat no longer reads it", "output", string(bytes.TrimSpace(out.Bytes())))
		err = nil
	}
	if err != nil {
		if sctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("still running after %v", homeStartTimeout)
		}
		return fmt.Errorf("start: %s: %w: %s", strings.Join(v.cfg.Start, " "), err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}

// runs reports whether the VM's QMP answers and its guest has been started
// (a QEMU that waits for `cont` or an incoming migration has not; a storage
// daemon, which has no run state, runs when it answers).
func (v *vm) runs(ctx context.Context) bool {
	if v.cfg.Libvirt != nil {
		on, _ := v.domainActive(ctx)
		return on
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	m, err := qemu.Dial(cctx, v.cfg.QMP)
	if err != nil {
		return false
	}
	defer m.Close()
	var st struct {
		Status string `json:"status"`
	}
	err = m.Execute(cctx, "query-status", nil, &st)
	var qe *qemu.QMPError
	switch {
	case errors.As(err, &qe) && qe.Class == "CommandNotFound":
		return true
	case err != nil:
		return false
	}
	return st.Status != "prelaunch" && st.Status != "inmigrate"
}

// domainActive reports whether the VM's libvirt domain runs.
func (v *vm) domainActive(ctx context.Context) (on bool, err error) {
	err = v.withDomain(ctx, func(ctx context.Context, d *virt.Domain) (err error) {
		on, err = d.Active(ctx)
		return err
	})
	return on, err
}

// startDomain starts the VM's libvirt domain (virsh start).
func (v *vm) startDomain(ctx context.Context, log *slog.Logger) error {
	log.Warn("failback finished: starting the libvirt domain here", "domain", v.cfg.Libvirt.Domain)
	return v.withDomain(ctx, func(ctx context.Context, d *virt.Domain) error { return d.Start(ctx) })
}

// withDomain calls f with the VM's libvirt domain, bounded.
func (v *vm) withDomain(ctx context.Context, f func(context.Context, *virt.Domain) error) error {
	cctx, cancel := context.WithTimeout(ctx, homeStartTimeout)
	defer cancel()
	return virt.WithDomain(cctx, v.cfg.Libvirt.URI, v.cfg.Libvirt.Domain, func(d *virt.Domain) error { return f(cctx, d) })
}

// poll calls ok every homePoll until it says yes or ctx ends, saying now and
// then what it waits for.
func poll(ctx context.Context, log *slog.Logger, what string, ok func(context.Context) bool) error {
	begin, said := time.Now(), time.Now()
	for !ok(ctx) {
		if time.Since(said) >= homeLogEvery {
			log.Info(what, "for", time.Since(begin).Round(time.Second))
			said = time.Now()
		}
		if err := sleep(ctx, homePoll); err != nil {
			return err
		}
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

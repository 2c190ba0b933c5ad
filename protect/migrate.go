package protect

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// MigrateOptions says how a planned migration shuts the guest down.
type MigrateOptions struct {
	// ShutdownTimeout bounds the wait for the guest to power off
	// (DefaultShutdownTimeout); then its CPUs are stopped instead.
	ShutdownTimeout time.Duration
	// Agent is the guest agent's socket, if the VM has one: the guest is
	// asked to power off through it (guest-shutdown), which a guest without
	// an ACPI daemon obeys too; without it, QEMU presses the power button
	// (system_powerdown).
	Agent string
}

// DefaultShutdownTimeout bounds a planned migration's wait for the guest to
// power off before its CPUs are stopped instead.
const DefaultShutdownTimeout = 2 * time.Minute

// Migration is what a planned migration did.
type Migration struct {
	Point lifeboat.Point
	// ShutDown: the guest powered off; otherwise its CPUs were stopped when
	// it had not within the timeout.
	ShutDown bool
	Run      wire.FailoverResult
	Took     time.Duration
}

// Migrate moves the VM to its recovery site with no loss:
//  1. QEMU is told to pause rather than exit when the guest powers off
//     (set-action), so that its disks stay readable, and the guest is asked
//     to power off (system_powerdown);
//  2. if it has not within shutdownTimeout, its CPUs are stopped instead;
//  3. a last cycle sends the disks as they are then: every write the guest
//     acknowledged before Migrate is in that point;
//  4. the recovery site starts the VM from it and takes it over;
//  5. QEMU here quits.
//
// If a step fails, the VM is left as it is (paused, or shut down and paused),
// and the error says so and how to go back. It needs the VM's own
// qemu-system monitor as its qmp: (a storage daemon's cannot power it off).
func (p *Protector) Migrate(ctx context.Context, opts MigrateOptions) (Migration, error) {
	begin := time.Now()
	shutdownTimeout := opts.ShutdownTimeout
	if p.VM.Libvirt != nil {
		return p.migrateLibvirt(ctx, begin)
	}
	if shutdownTimeout <= 0 {
		shutdownTimeout = DefaultShutdownTimeout
	}
	log := p.log()
	sd, err := ShutDown(ctx, p.VM.Name, p.VM.QMPSocket, opts.Agent, shutdownTimeout, log)
	if err != nil {
		if errors.Is(err, errNotSystem) {
			err = fmt.Errorf("%w: give the VM's own monitor for a planned migration, or shut the VM down yourself, `lifeboat sync` it, and run `lifeboat failover` at the recovery site", err)
		}
		return Migration{}, err
	}
	mig := Migration{ShutDown: sd}
	back := "it is paused here: `cont` on its monitor resumes it"
	if mig.ShutDown {
		back = "it is shut down and paused here: `system_reset` then `cont` on its monitor boots it again"
	}

	if !p.mu.TryLock() {
		return mig, fmt.Errorf("%w; %s", p.busy(), back)
	}
	c := &cycle{p: p, log: log, quiet: true, quietLevel: lifeboat.Crash,
		note: "planned migration: the guest's CPUs were stopped (it did not power off in " + shutdownTimeout.String() + "); every write it acknowledged is in the point"}
	if mig.ShutDown {
		c.quietLevel, c.note = lifeboat.Filesystem, "planned migration: the guest powered off cleanly before the point"
	}
	pt, err := c.run(ctx)
	if !c.detached {
		p.mu.Unlock()
	}
	if err != nil {
		return mig, fmt.Errorf("vm %q: the migration's last cycle: %w; %s", p.VM.Name, err, back)
	}
	mig.Point = pt
	log.Warn("planned migration: last point committed, asking the recovery site to take the VM", "point", pt.ID)
	mig.Run, err = p.Target.Failover(ctx, p.VM.Name, pt.ID)
	if err != nil {
		return mig, fmt.Errorf("%w; %s", err, back)
	}
	if m, err := qemu.Dial(ctx, p.VM.QMPSocket); err == nil {
		if err := m.Quit(ctx); err != nil && !errors.Is(err, qemu.ErrClosed) {
			log.Warn("planned migration: QEMU here did not quit; the recovery site owns the VM, stop it by hand", "err", err)
		}
		m.Close()
	}
	mig.Took = time.Since(begin)
	log.Warn("planned migration done: the vm runs at its recovery site", "point", pt.ID, "run", mig.Run.Run, "epoch", mig.Run.Epoch, "took", mig.Took.Round(time.Millisecond))
	return mig, nil
}

// errNotSystem: the monitor is not a qemu-system's.
var errNotSystem = errors.New("not a qemu-system's monitor (a storage daemon's cannot power the VM off)")

// ShutDown powers a VM's guest off and leaves its QEMU paused, its disks
// still open and readable for a last cycle: QEMU is told to pause rather
// than exit when the guest powers off (set-action); the guest is asked to
// power off through its agent when it has one (guest-shutdown, which a
// guest without an ACPI daemon obeys too), else by the power button
// (system_powerdown); if it has not within timeout, its CPUs are stopped
// instead. shutDown says which. A paused guest is resumed first; one
// powered off already (QEMU kept) is left as it is. It needs the VM's own
// qemu-system monitor.
func ShutDown(ctx context.Context, vm, qmp, agent string, timeout time.Duration, log *slog.Logger) (shutDown bool, err error) {
	m, err := qemu.Dial(ctx, qmp)
	if err != nil {
		return false, fmt.Errorf("vm %q: %w", vm, err)
	}
	defer m.Close() // QMP serves one client per socket: closed before the cycle dials it
	var typ string
	if err := m.Execute(ctx, "qom-get", map[string]string{"path": "/machine", "property": "type"}, &typ); err != nil {
		return false, fmt.Errorf("vm %q: its qmp %s is %w", vm, qmp, errNotSystem)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return false, fmt.Errorf("vm %q: query-status: %w", vm, err)
	}
	switch st.Status {
	case "shutdown":
		return true, nil // powered off before (a repeated finalize), QEMU kept
	case "paused":
		// A paused guest cannot power off: it runs again for that.
		log.Warn("the guest is paused: resuming it so that it can power off", "vm", vm)
		if err := m.Execute(ctx, "cont", nil, nil); err != nil {
			return false, fmt.Errorf("vm %q: resuming the paused guest to power it off: %w", vm, err)
		}
	}
	if err := m.Execute(ctx, "set-action", map[string]string{"shutdown": "pause"}, nil); err != nil {
		return false, fmt.Errorf("vm %q: keeping QEMU up when the guest powers off: %w", vm, err)
	}
	sub := m.Subscribe("SHUTDOWN")
	defer sub.Close()
	log.Warn("powering the guest off", "vm", vm, "timeout", timeout, "through", map[bool]string{true: "its agent", false: "the power button"}[agent != ""])
	asked := false
	if agent != "" {
		if a, err := qga.Dial(ctx, agent); err == nil {
			err = a.Shutdown(ctx)
			a.Close()
			asked = err == nil
			if err != nil {
				log.Warn("the guest agent refused to power off: pressing the power button", "vm", vm, "err", err)
			}
		} else {
			log.Warn("no guest agent: pressing the power button", "vm", vm, "err", err)
		}
	}
	if !asked {
		if err := m.Execute(ctx, "system_powerdown", nil, nil); err != nil {
			return false, fmt.Errorf("vm %q: system_powerdown: %w", vm, err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	_, err = sub.Next(wctx)
	cancel()
	switch {
	case err == nil:
		shutDown = true
	case ctx.Err() != nil:
		return false, ctx.Err()
	default:
		log.Warn("the guest did not power off in time: stopping its CPUs", "vm", vm, "timeout", timeout)
	}
	// Paused either way: after a shutdown (set-action), or now.
	if err := m.Execute(ctx, "stop", nil, nil); err != nil {
		return shutDown, fmt.Errorf("vm %q: stopping its CPUs: %w", vm, err)
	}
	if err := waitPaused(ctx, m); err != nil {
		return shutDown, fmt.Errorf("vm %q: %w", vm, err)
	}
	return shutDown, nil
}

// waitPaused waits until QEMU says the guest's CPUs are stopped.
func waitPaused(ctx context.Context, m *qemu.Monitor) error {
	for i := 0; ; i++ {
		var st struct {
			Running bool   `json:"running"`
			Status  string `json:"status"`
		}
		if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
			return err
		}
		if !st.Running {
			return nil
		}
		if i == 100 {
			b, _ := json.Marshal(st)
			return fmt.Errorf("its CPUs still run after stop: %s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

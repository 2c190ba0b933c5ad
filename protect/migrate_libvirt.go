package protect

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// migrateLibvirt is Migrate for a libvirt domain. libvirt stops QEMU when
// its guest powers off, and a libvirt backup (the cycle's instant) needs a
// running domain, so the guest is not powered off: its file systems are
// frozen through libvirt's agent and its CPUs paused, the last cycle sends
// the disks as they are then (every write the guest acknowledged, file-
// system consistent when the freeze worked), the recovery site takes the
// VM, and the domain here is powered off with its autostart cleared (a
// libvirtd restart must not run it twice). It stays defined: its disks and
// checkpoints are where a failback comes home to. A failure before the
// recovery site was asked resumes the domain here.
func (p *Protector) migrateLibvirt(ctx context.Context, begin time.Time) (Migration, error) {
	lv, log := p.VM.Libvirt, p.log()
	conn, err := virt.Dial(ctx, lv.URI)
	if err != nil {
		return Migration{}, fmt.Errorf("vm %q: %w", p.VM.Name, err)
	}
	defer conn.Close()
	dom, err := conn.Domain(ctx, lv.Domain)
	if err != nil {
		return Migration{}, fmt.Errorf("vm %q: %w", p.VM.Name, err)
	}
	if active, err := dom.Active(ctx); err != nil || !active {
		return Migration{}, fmt.Errorf("vm %q: libvirt domain %q does not run (%v): start it, or, if it was shut down cleanly, `lifeboat failover %s` at the recovery site from its last point", p.VM.Name, lv.Domain, err, p.VM.Name)
	}
	frozen := freezeDomain(ctx, dom, "planned migration", log)
	// undo lets the domain run on here: before the recovery site was asked.
	undo := func(cause error) error {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		rerr := dom.Resume(uctx)
		if frozen {
			if _, err := dom.FSThaw(uctx); err != nil && rerr == nil {
				rerr = err
			}
		}
		if rerr != nil {
			return fmt.Errorf("vm %q: %w; and resuming libvirt domain %q failed: %v (`virsh resume %s` and `virsh domfsthaw %s` do it by hand)", p.VM.Name, cause, lv.Domain, rerr, lv.Domain, lv.Domain)
		}
		return fmt.Errorf("vm %q: %w; the planned migration is abandoned and the domain runs on here", p.VM.Name, cause)
	}
	if err := dom.Suspend(ctx); err != nil {
		return Migration{}, undo(fmt.Errorf("pausing libvirt domain %q: %w", lv.Domain, err))
	}
	if !p.mu.TryLock() {
		return Migration{}, undo(fmt.Errorf("a cycle is already running"))
	}
	c := &cycle{p: p, log: log, quiet: true, quietLevel: lifeboat.Crash,
		note: "planned migration: the guest's CPUs were paused (it could not be frozen); every write it acknowledged is in the point"}
	if frozen {
		c.quietLevel, c.note = lifeboat.Filesystem, "planned migration: the guest's file systems were frozen and its CPUs paused before the point"
	}
	pt, err := c.run(ctx)
	p.mu.Unlock()
	if err != nil {
		return Migration{}, undo(fmt.Errorf("the migration's last cycle: %w", err))
	}
	mig := Migration{Point: pt}
	log.Warn("planned migration: last point committed, asking the recovery site to take the VM", "point", pt.ID)
	mig.Run, err = p.Target.Failover(ctx, p.VM.Name, pt.ID)
	if err != nil {
		// The recovery site may have started it: do not run it here too.
		return mig, fmt.Errorf("%w; libvirt domain %q is paused here (frozen: %v): if the recovery site does not run the VM, `virsh resume %s` (and `virsh domfsthaw %s`) resume it", err, lv.Domain, frozen, lv.Domain, lv.Domain)
	}
	if err := dom.SetAutostart(ctx, false); err != nil {
		log.Warn("planned migration: could not clear the domain's autostart here; clear it by hand (`virsh autostart --disable`)", "domain", lv.Domain, "err", err)
	}
	if err := dom.PowerOff(ctx); err != nil {
		log.Warn("planned migration: the domain here did not power off; the recovery site owns the VM, stop it by hand (`virsh destroy`)", "domain", lv.Domain, "err", err)
	}
	mig.Took = time.Since(begin)
	log.Warn("planned migration done: the vm runs at its recovery site", "point", pt.ID, "run", mig.Run.Run, "epoch", mig.Run.Epoch, "took", mig.Took.Round(time.Millisecond))
	return mig, nil
}

// freezeDomain freezes the guest's file systems through libvirt's agent,
// bounded, and says whether it did; what says why is the log.
func freezeDomain(ctx context.Context, dom *virt.Domain, what string, log *slog.Logger) bool {
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	n, err := dom.FSFreeze(fctx)
	if err != nil {
		log.Warn(what+": the guest could not be frozen (no agent?): the point will be crash-consistent, with every acknowledged write", "domain", dom.Name, "err", err)
		return false
	}
	log.Warn(what+": the guest's file systems are frozen", "domain", dom.Name, "filesystems", n)
	return true
}

// PauseDomain stops a libvirt domain's guest for good without letting its
// QEMU go (libvirt would end QEMU at a power-off, and a cycle reads the
// disks through it): its file systems frozen through libvirt's agent where
// it answers, then its CPUs paused. It says whether the freeze held. A
// failback's finalize at a recovery site that runs the VM under libvirt
// stops it so, as a planned migration does.
func PauseDomain(ctx context.Context, vm string, lv LibvirtDomain, log *slog.Logger) (frozen bool, err error) {
	conn, err := virt.Dial(ctx, lv.URI)
	if err != nil {
		return false, fmt.Errorf("vm %q: %w", vm, err)
	}
	defer conn.Close()
	dom, err := conn.Domain(ctx, lv.Domain)
	if err != nil {
		return false, fmt.Errorf("vm %q: %w", vm, err)
	}
	if running, err := dom.Running(ctx); err != nil {
		return false, fmt.Errorf("vm %q: %w", vm, err)
	} else if !running {
		return false, nil // paused (or off) already: as an earlier attempt left it
	}
	frozen = freezeDomain(ctx, dom, "finalize", log)
	if err := dom.Suspend(ctx); err != nil {
		return frozen, fmt.Errorf("vm %q: pausing libvirt domain %q: %w", vm, lv.Domain, err)
	}
	return frozen, nil
}

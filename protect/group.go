package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// Group is a consistency group: VMs whose points share one instant (a web tier
// and its database). All members are frozen at once (group_freeze.go), one
// transaction runs per QEMU process (a libvirt domain's: its backup begun with
// the next checkpoint), all are thawed at once; then each member's point is
// sent and committed. Members may be reached by QMP or through libvirt, in
// any mix.
//
// Without quiescing, the members' transactions run back to back (milliseconds
// apart) but their guests keep writing in between: such a group point is only
// as shared as that.
type Group struct {
	Name    string
	Members []*Protector
}

// Cycle takes one group point. The points it returns carry the group's name
// and instant in Point.Group. A member whose transfer fails fails the cycle;
// members already committed keep their points (each is whole on its own), and
// the error names the member.
func (g *Group) Cycle(ctx context.Context) ([]lifeboat.Point, error) {
	if len(g.Members) == 0 {
		return nil, fmt.Errorf("group %q has no member", g.Name)
	}
	cycles := make([]*cycle, len(g.Members))
	for i, p := range g.Members {
		if !p.mu.TryLock() {
			return nil, fmt.Errorf("group %q: vm %q: a cycle is already running", g.Name, p.VM.Name)
		}
		defer func() {
			if c := cycles[i]; c == nil || !c.detached {
				p.mu.Unlock()
			}
		}()
	}
	defer func() {
		for _, c := range cycles {
			if c != nil && !c.detached {
				c.close(ctx)
			}
		}
	}()
	for i, p := range g.Members {
		c := &cycle{p: p, log: p.log().With("group", g.Name)}
		cycles[i] = c
		if err := c.prepareMember(ctx); err != nil {
			g.teardown(ctx, cycles[:i])
			return nil, fmt.Errorf("group %q: vm %q: %w", g.Name, p.VM.Name, err)
		}
	}

	// The shared instant: freeze all at once, one transaction per QEMU, thaw
	// all at once. The logs are taken now: a step left running in the
	// background (c.bounded) may change c.log.
	logs := make([]*slog.Logger, len(cycles))
	for i, c := range cycles {
		logs[i] = c.log
	}
	frozen, err := g.freezeAll(ctx, cycles, logs)
	bound := instantBound(frozen)
	snapped := 0
	if err == nil {
		for _, c := range cycles {
			if err = c.bounded(ctx, c.instantStep(), bound, c.instant); err != nil {
				err = fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err)
				break
			}
			snapped++
		}
	}
	thawAll(ctx, frozen, logs)
	if err != nil {
		// Snapshot undoes its own failure; the members snapshotted before it are
		// rolled back like any failed cycle, the others only lose their fleece.
		for _, c := range cycles[:snapped] {
			c.rollback(ctx)
		}
		g.teardown(ctx, cycles[snapped:])
		return nil, err
	}
	groupTag := g.Name + "@" + cycles[0].point.Instant.Format(time.RFC3339Nano)
	for i, c := range cycles {
		c.setLevel(frozen[i])
		if c.quiet {
			c.point.Consistency, c.point.Note = c.quietLevel, c.note
		}
		c.point.Group = groupTag
	}
	for i, c := range cycles {
		if err := c.bounded(ctx, c.publishStep(), bound, c.publish); err != nil {
			// Export undoes its own failure; every other member is rolled back.
			for j, c := range cycles {
				if j != i {
					c.rollback(ctx)
				}
			}
			return nil, fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err)
		}
	}
	var (
		points []lifeboat.Point
		errs   []error
	)
	for _, c := range cycles {
		pt, err := c.transfer(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err))
			continue
		}
		c.committed()
		points = append(points, pt)
	}
	return points, errors.Join(errs...)
}

// teardown undoes the members' preparations: their instant was not taken.
func (g *Group) teardown(ctx context.Context, cs []*cycle) {
	for _, c := range cs {
		if !c.detached {
			c.abandon(ctx)
		}
	}
}

// prepareMember readies a group member for the group's instant, all but the
// instant itself: on the QMP path its fleece; under libvirt its scratch files,
// no other tool's job running, and its base checkpoints shown to libvirt. A
// failure undoes what it began.
func (c *cycle) prepareMember(ctx context.Context) error {
	if c.p.VM.Libvirt != nil {
		if err := c.prepareLibvirt(ctx); err != nil {
			return err
		}
		c.report("snapshot", 0)
		err := c.prepareScratch(ctx)
		if err == nil {
			err = c.lv.waitIdle(ctx, c.log, cmp0(c.p.BusyWait, DefaultBusyWait))
		}
		if err == nil {
			err = c.showBases(ctx)
		}
		if err != nil {
			c.abandon(ctx)
		}
		return err
	}
	if err := c.prepare(ctx); err != nil {
		return err
	}
	c.report("snapshot", 0)
	if h := c.p.Hooks.BeforeFleece; h != nil {
		if err := h(ctx); err != nil {
			return err
		}
	}
	if err := c.prepareFleece(ctx); err != nil {
		c.fleece = nil
		return err
	}
	return nil
}

// instant takes a member's part of the group's instant: its fleece
// transaction, or under libvirt its backup begun with the next checkpoint.
// Another tool's libvirt job begun meanwhile fails it (the group's next
// cycle waits for that job first).
func (c *cycle) instant(ctx context.Context) error {
	if c.lv != nil {
		return c.beginLibvirt(ctx)
	}
	return c.snapshot(ctx)
}

func (c *cycle) instantStep() string {
	if c.lv != nil {
		return "libvirt backup begin (the group's instant)"
	}
	return "fleece transaction (the group's instant)"
}

// publish makes a member's instant readable once the guests are thawed: the
// fleece's NBD export, or the libvirt backup's exports described.
func (c *cycle) publish(ctx context.Context) error {
	if c.lv != nil {
		return c.describePoint(ctx)
	}
	return c.export(ctx)
}

func (c *cycle) publishStep() string {
	if c.lv != nil {
		return "libvirt backup's NBD export"
	}
	return "fleece export"
}

// abandon undoes a member prepared whose instant was not taken: its fleece
// goes, or under libvirt what the cycle began there (settle).
func (c *cycle) abandon(ctx context.Context) {
	if c.lv != nil {
		c.settleFailed(ctx)
		return
	}
	if c.fleece != nil {
		c.fleece.Teardown(context.WithoutCancel(ctx))
	}
}

// settleFailed ends what a libvirt cycle that will send no point began: its
// backup, its new checkpoint (whose bitmaps libvirt merges into the base's),
// the bases shown to libvirt.
func (c *cycle) settleFailed(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
	defer cancel()
	if err := c.lv.settle(cctx, c, false, false); err != nil {
		c.log.Error("ending the libvirt backup failed", "err", err)
	}
}

// instantBound is how long a member's step of the group's instant (its
// transaction, its export) may take: its members' smallest freeze limit.
// A transaction takes milliseconds; one that takes longer than a freeze is
// held is not the group's instant.
func instantBound(frozen []*freezeState) time.Duration {
	bound := DefaultFreezeLimit
	for _, f := range frozen {
		if f != nil && f.f != nil && f.f.Limit > 0 {
			bound = min(bound, f.f.Limit)
		}
	}
	return bound
}

// bounded runs step, one QMP step of a group member, waiting at most bound.
// A member whose QEMU does not answer in time (hung, stopped) fails the
// group's cycle now, rather than holding the others' cycle, and their
// fleece in their guests' write path, until it answers (before: until the
// cycle's context ended, hours in the daemon, and a late answer made a group
// point of instants seconds apart). The step goes on in the background, on a
// context of its own bounded by hungWait, and once it has returned the
// member's fleece is torn down and its generations turned back; the member
// stays locked until then (c.detached: the group leaves it alone), so none
// of its cycles starts meanwhile.
func (c *cycle) bounded(ctx context.Context, what string, bound time.Duration, step func(context.Context) error) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hungWait)
	log := c.log // the step may change c.log
	done := make(chan error, 1)
	go func() { done <- step(sctx) }()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case err := <-done:
		cancel()
		return err
	case <-t.C:
	}
	c.detached = true
	log.Error("the VM's QEMU did not answer in time: the group's cycle fails; lifeboat cleans up after it once it answers", "step", what, "bound", bound)
	go func() {
		defer cancel()
		err := <-done
		switch {
		case c.lv != nil:
			c.settleFailed(sctx) // whatever libvirt did, ended
		case err == nil:
			c.rollback(sctx) // the step landed late: undo the instant
		case c.fleece != nil:
			c.fleece.Teardown(sctx) // the step undid itself; what is left goes
		}
		c.close(sctx)
		c.p.mu.Unlock()
		c.log.Info("the VM's QEMU answered again: its part of the failed group cycle is cleaned up", "err", err)
	}()
	return fmt.Errorf("its QEMU did not answer the %s within %v (hung or stopped?): the group's cycle fails, and lifeboat tears down its fleece once it answers", what, bound)
}

// hungWait bounds how long lifeboat waits in the background for a group
// member's QEMU that did not answer in time, to clean up after it; past it,
// the member's next cycle clears what is left (RemoveStale).
const hungWait = 10 * time.Minute

// rollback undoes a cycle whose instant was taken but whose point will not be
// sent: fleece down, the new generation merged back into the old one.
func (c *cycle) rollback(ctx context.Context) {
	if c.lv != nil {
		c.settleFailed(ctx)
		return
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
	defer cancel()
	if err := c.fleece.Teardown(cctx); err != nil {
		c.log.Error("fleece teardown failed", "err", err)
	}
	for _, d := range c.disks {
		if err := rollback(cctx, c.mon, d.node, d.old, d.new); err != nil {
			c.bookkeepingFailed(cctx, d, err)
		}
	}
}

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
// and instant in Point.Group. A member that fails fails the cycle, naming
// it: the members not sent yet are rolled back rather than sent (a group
// point is all or nothing from there on), while members already committed
// keep their points (each is whole on its own, and the recovery site starts
// a group from an instant all its members hold).
//
// A member whose QEMU does not answer fails the cycle within a bound, at
// any step: while it connects and prepares, a QMP command unanswered for
// its StallLimit; in the instant, its members' smallest freeze limit; while
// its point is sent, the reads of its fleece unanswered for its
// StallLimit. Its own cleanup then waits in the background for its QEMU
// (see untilHung).
func (g *Group) Cycle(ctx context.Context) ([]lifeboat.Point, error) {
	if len(g.Members) == 0 {
		return nil, fmt.Errorf("group %q has no member", g.Name)
	}
	cycles := make([]*cycle, len(g.Members))
	for i, p := range g.Members {
		if !p.mu.TryLock() {
			return nil, fmt.Errorf("group %q: %w", g.Name, p.busy())
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
	for i, c := range cycles {
		pt, err := c.transfer(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err))
			for _, c := range cycles[i+1:] {
				c.rollback(ctx)
			}
			if len(cycles[i+1:]) > 0 {
				c.log.Info("the group's members not sent yet are rolled back: their points of this instant would not make a group point")
			}
			break
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
	return c.prepareAll(ctx)
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

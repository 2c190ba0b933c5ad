package protect

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// Group is a consistency group: VMs whose points share one instant (a web tier
// and its database). All members are frozen, one transaction runs per QEMU
// process, all are thawed; then each member's point is sent and committed.
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
	for _, p := range g.Members {
		if !p.mu.TryLock() {
			return nil, fmt.Errorf("group %q: vm %q: a cycle is already running", g.Name, p.VM.Name)
		}
		defer p.mu.Unlock()
	}
	cycles := make([]*cycle, len(g.Members))
	defer func() {
		for _, c := range cycles {
			if c != nil {
				c.close(ctx)
			}
		}
	}()
	for i, p := range g.Members {
		c := &cycle{p: p, log: p.log().With("group", g.Name)}
		cycles[i] = c
		if err := c.prepare(ctx); err != nil {
			g.teardown(ctx, cycles[:i])
			return nil, fmt.Errorf("group %q: vm %q: %w", g.Name, p.VM.Name, err)
		}
		c.report("snapshot", 0)
		if err := c.prepareFleece(ctx); err != nil {
			cycles[i].fleece = nil
			g.teardown(ctx, cycles[:i])
			return nil, fmt.Errorf("group %q: vm %q: %w", g.Name, p.VM.Name, err)
		}
	}

	// The shared instant: freeze all, one transaction per QEMU, thaw all.
	frozen := make([]*freezeState, len(cycles))
	thawAll := func() {
		for i, f := range frozen {
			if f != nil {
				f.thaw(ctx, cycles[i].log)
			}
		}
	}
	var err error
	for i, c := range cycles {
		if frozen[i], err = freeze(ctx, c.p.Quiescer); err != nil {
			err = fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err)
			break
		}
	}
	snapped := 0
	if err == nil {
		for _, c := range cycles {
			if err = c.snapshot(ctx); err != nil {
				err = fmt.Errorf("group %q: vm %q: %w", g.Name, c.p.VM.Name, err)
				break
			}
			snapped++
		}
	}
	thawAll()
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
		c.point.Group = groupTag
	}
	for i, c := range cycles {
		if err := c.export(ctx); err != nil {
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

func (g *Group) teardown(ctx context.Context, cs []*cycle) {
	for _, c := range cs {
		if c.fleece != nil {
			c.fleece.Teardown(context.WithoutCancel(ctx))
		}
	}
}

// rollback undoes a cycle whose instant was taken but whose point will not be
// sent: fleece down, the new generation merged back into the old one.
func (c *cycle) rollback(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
	defer cancel()
	if err := c.fleece.Teardown(cctx); err != nil {
		c.log.Error("fleece teardown failed", "err", err)
	}
	for _, d := range c.disks {
		if err := rollback(cctx, c.mon, d.node, d.old, d.new); err != nil {
			c.log.Error("generation bookkeeping failed; the next cycle repairs it", "disk", d.name, "err", err)
		}
	}
}

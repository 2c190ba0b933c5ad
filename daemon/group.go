package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// group runs a consistency group's cycles: its members' points share one instant.
type group struct {
	d       *Daemon
	cfg     GroupConfig
	members []*vm
}

func newGroup(d *Daemon, c GroupConfig) *group {
	g := &group{d: d, cfg: c}
	for _, name := range c.VMs {
		v, _ := d.vmOf(name)
		v.group, v.groupInterval = c.Name, time.Duration(c.Interval)
		g.members = append(g.members, v)
	}
	return g
}

// sync runs one group cycle now. A member unprotected before it joined the
// group (`lifeboat unprotect`) is protected again when resume is set (a
// user's `lifeboat sync GROUP`); otherwise the group waits for that.
func (g *group) sync(ctx context.Context, whole, resume bool) ([]lifeboat.Point, error) {
	// Members are locked in config order, as everywhere, so two syncs cannot deadlock.
	for _, v := range g.members {
		v.cycleMu.Lock()
		defer v.cycleMu.Unlock()
		if v.isUnprotected() {
			if !resume {
				return nil, fmt.Errorf("group %q: member vm %q is unprotected (`lifeboat unprotect`): `lifeboat sync %s` protects it again with the group", g.cfg.Name, v.cfg.Name, g.cfg.Name)
			}
			if err := v.resume(); err != nil {
				return nil, fmt.Errorf("group %q: %w", g.cfg.Name, err)
			}
		}
		if whole {
			v.p.Whole = true
		}
	}
	pg := &protect.Group{Name: g.cfg.Name}
	for _, v := range g.members {
		v.setState("syncing", nil)
		if err := v.ready(ctx); err != nil {
			err = fmt.Errorf("group %q: %w", g.cfg.Name, err)
			for _, v := range g.members {
				v.setState("error", err)
			}
			return nil, err
		}
		pg.Members = append(pg.Members, v.p)
	}
	pts, err := pg.Cycle(ctx)
	byVM := map[string]lifeboat.Point{}
	for _, pt := range pts {
		byVM[pt.VM] = pt
	}
	for _, v := range g.members {
		pt, ok := byVM[v.cfg.Name]
		if ok {
			v.d.metrics.cycle(v.cfg.Name, pt, nil)
		} else {
			v.d.metrics.cycle(v.cfg.Name, pt, err)
		}
		v.mu.Lock()
		v.progress = nil
		if pt, ok := byVM[v.cfg.Name]; ok {
			v.last = &pt
		}
		v.mu.Unlock()
		if _, ok := byVM[v.cfg.Name]; ok {
			v.setState("protected", nil)
		} else {
			v.setState("error", err)
		}
	}
	if err != nil {
		g.d.log.Error("group cycle failed", "group", g.cfg.Name, "err", err)
	}
	return pts, err
}

func (g *group) schedule(ctx context.Context) {
	runEvery(ctx, time.Duration(g.cfg.Interval), retryAfter, func(ctx context.Context) error {
		_, err := g.sync(ctx, false, false)
		return err
	})
}

package failback

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Site is a production site's side of failbacks: it takes one from the site
// a VM was failed over to (wire.Server.TakeFailback), and its Store serves
// the failback's points.
type Site struct {
	Store  *Store
	RunDir string // where each VM's disks' daemon keeps its runtime files (RunDir/<vm>)
	Log    *slog.Logger
	// VM is what this site knows of a VM it protects; false: none of that name.
	VM func(ctx context.Context, name string) (VMInfo, bool)
	// Recovery is this site's recovery store: where a VM protected in
	// reverse keeps its points (Reverse). nil: no reversal.
	Recovery *recovery.Store
}

// Reverse makes this site keep vm's restore points from now on, from site,
// which owns and runs it (Store.Reverse).
func (s *Site) Reverse(ctx context.Context, site, vm string) (lifeboat.Point, error) {
	if s.Recovery == nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: this site keeps no restore points (serve it with `listen:`)", vm)
	}
	return s.Store.Reverse(ctx, vm, site, s.Recovery)
}

// VMInfo is a protected VM as the production site knows it.
type VMInfo struct {
	Peer    string // the recovery site it replicates to
	WorkDir string // its protector's, which records its disk images
	Running bool   // its QEMU answers: it must be stopped for a failback
	Libvirt bool   // a libvirt domain: its generations are libvirt checkpoints
	Why     string // why it cannot take a failback, if it cannot
}

// Take readies vm's failback from site: the VM must be one this site
// protects, replicated to site, and stopped; its disks are those this site
// recorded at its last cycle. It returns the point the disks hold: holds, or
// a later failback point when this failback was under way already.
func (s *Site) Take(ctx context.Context, site, vm string, holds lifeboat.Point, own map[string]wire.Shared) (lifeboat.Point, error) {
	if held, ok, _ := s.Store.Latest(vm); ok {
		if err := s.Store.Authorize(vm, site); err != nil {
			return lifeboat.Point{}, err
		}
		if !s.Store.dropLost(ctx, vm) {
			return held, nil // prepared already: the failback goes on
		}
		// The daemon over the disks died: they are opened again below,
		// from the record, as after a restart of this site.
	}
	if h, ok, err := s.Store.readHome(vm); err != nil {
		return lifeboat.Point{}, err
	} else if ok && h.Owner == site && !h.Resumed && holds.ID >= h.Fold {
		// A new failover's, from the fold point or later: the VM was lost
		// again before it ran here. The finished failback is history, and
		// production's disks hold the fold's state.
		if err := s.Store.forgetHome(vm); err != nil {
			return lifeboat.Point{}, err
		}
		s.Store.log.Warn("a new failover fails back: the VM never ran here after its last failback, whose record goes", "vm", vm, "from", site, "fold", h.Fold, "point", holds.ID)
	} else if ok && h.Owner == site && !h.Resumed {
		// A late retry of the finished failback (its failover's point is
		// before the fold). Once the VM has replicated from here, or
		// failed over again, a failback is a new failover's.
		return lifeboat.Point{}, fmt.Errorf("vm %q: its failback from %q "+finishedPhrase+" (its disks took failback point %d, continued by point %d there): run its finalize again at %q, or start the VM here", vm, site, h.Held, h.Fold, site)
	}
	if r, ok, err := s.Store.ReversedOf(vm); err != nil {
		return lifeboat.Point{}, err
	} else if ok && r.Adopted {
		return lifeboat.Point{}, fmt.Errorf("vm %q is protected in reverse from %q since %s: this site keeps its restore points, its disks are no longer here to fail back into (fail it over here instead)", vm, r.Owner, r.Since.Format(time.RFC3339))
	}
	info, ok := s.VM(ctx, vm)
	if !ok {
		return lifeboat.Point{}, fmt.Errorf("vm %q is not protected by this site: a failback comes home to the site whose config names the VM", vm)
	}
	if info.Why != "" {
		return lifeboat.Point{}, fmt.Errorf("vm %q cannot fail back into this site: %s", vm, info.Why)
	}
	if info.Peer != site {
		return lifeboat.Point{}, fmt.Errorf("%w: vm %q is replicated from here to site %q, not to %q, which asks to fail it back", recovery.ErrNotOwner, vm, info.Peer, site)
	}
	if info.Running {
		return lifeboat.Point{}, fmt.Errorf("vm %q runs at this site (its QMP answers): stop it first. A failback writes into its disks, and the VM runs at %q now: running it here as well is split brain", vm, site)
	}
	images, err := protect.ReadImages(info.WorkDir)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: %w", vm, err)
	}
	byName := map[string]bool{}
	for _, im := range images {
		byName[im.Name] = true
	}
	for _, d := range holds.Disks {
		if !byName[d.Name] {
			return lifeboat.Point{}, fmt.Errorf("vm %q: point %d has disk %q, and this site recorded no image of it", vm, holds.ID, d.Name)
		}
	}
	prod, err := Open(ctx, filepath.Join(s.RunDir, vm), vm, images, s.Log)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if err := s.Store.Prepare(ctx, vm, site, prod, holds, own); err != nil {
		prod.Close(context.WithoutCancel(ctx))
		return lifeboat.Point{}, err
	}
	held, _, err := s.Store.Latest(vm)
	return held, err
}

// Routed is a production site's wire store: a VM whose failback it has taken
// goes to its failback Store, any other to Other (the site's recovery store,
// when it is one: nil refuses).
type Routed struct {
	Failback *Store
	Other    wire.Store
}

func (r Routed) route(vm string) (wire.Store, error) {
	if _, err := r.Failback.vm(vm); err == nil {
		return r.Failback, nil
	}
	if r.Other == nil {
		return nil, fmt.Errorf("%w: vm %q: this site keeps no restore points and takes no failback of it", recovery.ErrNotOwner, vm)
	}
	return r.Other, nil
}

func (r Routed) Authorize(vm, site string) error {
	st, err := r.route(vm)
	if err != nil {
		return err
	}
	return st.Authorize(vm, site)
}

func (r Routed) Latest(vm string) (lifeboat.Point, bool, error) {
	st, err := r.route(vm)
	if err != nil {
		return lifeboat.Point{}, false, err
	}
	return st.Latest(vm)
}

func (r Routed) Points(vm string) ([]lifeboat.Point, error) {
	st, err := r.route(vm)
	if err != nil {
		return nil, err
	}
	return st.Points(vm)
}

func (r Routed) EachBlock(vm, disk string, id uint64, fn func(b int64, h lifeboat.Hash) error) error {
	st, err := r.route(vm)
	if err != nil {
		return err
	}
	return st.EachBlock(vm, disk, id, fn)
}

func (r Routed) BeginPoint(ctx context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	st, err := r.route(p.VM)
	if err != nil {
		return nil, err
	}
	return st.BeginPoint(ctx, p)
}

// Changed is the failback store's: a chain of points never changes on its own.
func (r Routed) Changed(ctx context.Context, vm, disk string, fn func(off, length int64) error) error {
	return r.Failback.Changed(ctx, vm, disk, fn)
}

var _ wire.ChangeLister = Routed{}

package failback

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// A failback ends at the production site (Store.Finish) once its disks hold
// the recovered VM's last state, the failback point held, and the recovery
// site has folded that same state into its chain of points as point fold.
// The disks then start, for the recovery site, the generations that record
// the VM's writes from that point on, and the daemon over them stops (the
// bitmaps are saved in the images). When the VM runs here again, its next
// cycle continues the chain from fold, incrementally.

// homeRecord is what stays of a finished failback, in dir/<vm>.home.json:
// a repeated Finish of the same fold (the recovery site lost the answer)
// gets the same generations.
type homeRecord struct {
	Owner       string            `json:"owner"` // the site the VM came home from
	Held        uint64            `json:"held"`
	Fold        uint64            `json:"fold"`
	Generations map[string]string `json:"generations"`
	// Resumed: a cycle from here has been committed since (MarkResumed):
	// the VM is home and replicates. Until then a restarted site brings it
	// home again (HomePending), and a new failback from Owner is refused
	// (a late retry of the finished one); after it, a failback is a new
	// failover's.
	Resumed bool `json:"resumed,omitempty"`
}

func (s *Store) homePath(vm string) string { return filepath.Join(s.dir, vm+".home.json") }

// readHome reads vm's finished failback record, if there is one.
func (s *Store) readHome(vm string) (homeRecord, bool, error) {
	var h homeRecord
	ok, err := readRecord(s.homePath(vm), vm, "finished failback record", &h)
	return h, ok, err
}

// HomePending is, by VM, the fold point of each failback finished here
// whose VM has not replicated from here since: the VMs to bring home.
func (s *Store) HomePending() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]uint64{}
	for vm, fold := range s.pending {
		out[vm] = fold
	}
	return out
}

// forgetHome drops vm's finished failback record: a new failover of the
// VM superseded it.
func (s *Store) forgetHome(vm string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Remove(s.homePath(vm)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vm %q: finished failback record: %w", vm, err)
	}
	delete(s.pending, vm)
	return nil
}

// MarkResumed records that vm replicated from here after its failback
// finished (a cycle committed): it is home. Cheap when there is nothing
// to record (each cycle calls it).
func (s *Store) MarkResumed(vm string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pending[vm]; !ok {
		return nil
	}
	h, ok, err := s.readHome(vm)
	if err != nil || !ok {
		delete(s.pending, vm)
		return err
	}
	h.Resumed = true
	if err := writeRecord(s.homePath(vm), vm, "finished failback record", h); err != nil {
		return err
	}
	delete(s.pending, vm)
	return nil
}

// Finish ends vm's failback from site: its disks must hold point held (a
// repeated Finish of a failback finished with fold gets its generations,
// whatever held says). It
// starts on each disk of fold the generation of fold for site, stops the
// daemon over the disks and forgets the failback; it returns the
// generations by disk name, which the recovery site records on fold. name,
// if not nil, names a disk's generation (a libvirt domain's are its
// checkpoint's); else lifeboat.NewGeneration does.
func (s *Store) Finish(ctx context.Context, site, vm string, held uint64, fold lifeboat.Point, name func(lifeboat.PointDisk) string) (map[string]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok, err := s.readHome(vm); err != nil {
		return nil, err
	} else if ok {
		if h.Owner == site && h.Fold == fold.ID {
			if v, ok := s.vms[vm]; ok { // reopened after a crash before the record went
				v.prod.Close(context.WithoutCancel(ctx))
				delete(s.vms, vm)
			}
			// The failback's own record went with the first Finish, unless
			// the site died between the two writes.
			if err := os.Remove(s.path(vm)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
			return h.Generations, nil
		}
	}
	v, ok := s.vms[vm]
	if !ok {
		return nil, fmt.Errorf("%w: vm %q: no failback is prepared at this production site", recovery.ErrNotOwner, vm)
	}
	if v.rec.Owner != site {
		return nil, fmt.Errorf("%w: vm %q fails back to this site from site %q; site %q may not finish it", recovery.ErrNotOwner, vm, v.rec.Owner, site)
	}
	if v.rec.Holds.ID != held {
		return nil, fmt.Errorf("vm %q: production's disks hold failback point %d, not %d: run the last failback cycle again", vm, v.rec.Holds.ID, held)
	}
	// The generations continue the chain from fold, the state of point
	// held: disks written since its commit (a VM started here while
	// lifeboat let go of them) would come home with blocks the chain
	// never gets.
	for _, d := range v.rec.Holds.Disks {
		if why := v.prod.untouchedWhy(ctx, d.Name, v.rec.Since[d.Name]); why != "" {
			return nil, fmt.Errorf("vm %q disk %q "+notHeldPhrase+" %d any more (%s): run a failback cycle (`lifeboat failback %s` at site %q), then the finalize again", vm, d.Name, held, why, vm, site)
		}
	}
	gens := map[string]string{}
	for _, d := range fold.Disks {
		if _, ok := v.prod.disks[d.Name]; !ok {
			return nil, fmt.Errorf("vm %q: point %d has disk %q, which production does not", vm, fold.ID, d.Name)
		}
		if d.Lineage == "" {
			return nil, fmt.Errorf("vm %q disk %q: point %d names no lineage", vm, d.Name, fold.ID)
		}
		if name != nil {
			if g := name(d); g != "" {
				gens[d.Name] = g
			}
		} else if keeps, err := v.prod.keepsBitmaps(ctx, d.Name); err != nil {
			return nil, err
		} else if keeps {
			gens[d.Name] = lifeboat.NewGeneration(site, d.Lineage, fold.ID)
		}
		// A raw disk (or a qcow2 v2) keeps no bitmap once the daemon stops:
		// it gets no generation, and production's next cycle compares it by
		// hashes. Before, adding a persistent one failed every finalize of a
		// VM with such a disk.
	}
	if err := v.prod.startGenerations(ctx, gens); err != nil {
		return nil, err
	}
	v.prod.removeBitmaps(ctx, v.rec.Since)
	// The bitmaps are in the images once the daemon has stopped cleanly;
	// only then is the failback over.
	if err := v.prod.Close(ctx); err != nil {
		return nil, fmt.Errorf("vm %q: releasing the disks: %w", vm, err)
	}
	delete(s.vms, vm)
	if err := writeRecord(s.homePath(vm), vm, "finished failback record", homeRecord{Owner: site, Held: held, Fold: fold.ID, Generations: gens}); err != nil {
		return nil, err
	}
	s.pending[vm] = fold.ID
	if err := os.Remove(s.path(vm)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	s.log.Warn("failback finished: the disks hold the recovered VM's last state; start the VM here", "vm", vm, "from", site, "point", held, "fold", fold.ID)
	return gens, nil
}

// startGenerations adds a persistent, recording bitmap of each name (by disk).
func (p *Production) startGenerations(ctx context.Context, gens map[string]string) error {
	for name, gen := range gens {
		d := p.disks[name]
		if err := p.daemon.Monitor().AddBitmap(ctx, d.node, gen, true, false); err != nil {
			return fmt.Errorf("vm %q disk %q: starting generation %q: %w", p.VM, name, gen, err)
		}
	}
	return nil
}

// Finish ends vm's failback from site (Store.Finish). A libvirt domain's
// generations are one checkpoint of its qcow2 disks, kept among its hidden
// checkpoints, so that its next cycle, through libvirt, continues from it;
// its raw disks get none (they are compared by hashes at every cycle).
func (s *Site) Finish(ctx context.Context, site, vm string, held uint64, fold lifeboat.Point) (map[string]string, error) {
	info, ok := s.VM(ctx, vm)
	if !ok || !info.Libvirt {
		return s.Store.Finish(ctx, site, vm, held, fold, nil)
	}
	images, err := protect.ReadImages(info.WorkDir)
	if err != nil {
		return nil, fmt.Errorf("vm %q: %w", vm, err)
	}
	format := map[string]string{}
	for _, im := range images {
		format[im.Name] = im.Format
	}
	cp := protect.HomeCheckpoint(site, fold.ID)
	gens, err := s.Store.Finish(ctx, site, vm, held, fold, func(d lifeboat.PointDisk) string {
		if format[d.Name] != "qcow2" {
			return ""
		}
		return cp
	})
	if err != nil {
		return nil, err
	}
	lineages := map[string]string{}
	for _, d := range fold.Disks {
		if gens[d.Name] != "" {
			lineages[d.Name] = d.Lineage
			cp = gens[d.Name] // a repeated Finish answers the first one's
		}
	}
	if len(lineages) > 0 {
		if err := protect.KeepCheckpoint(info.WorkDir, cp, site, fold.ID, lineages); err != nil {
			return nil, fmt.Errorf("vm %q: %w", vm, err)
		}
	}
	return gens, nil
}

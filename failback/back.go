package failback

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Back is a failback at the site the VM runs at: cycles from the recovered
// VM of a failover run to the VM's production site, each sending what
// changed on either side since the last.
type Back struct {
	Run      *failover.Run
	Store    *recovery.Store // this site's: the points' block maps
	Site     string          // this site's name, as production named its generations
	Client   *wire.Client    // to the production site
	StateDir string
	Log      *slog.Logger
	Progress func(protect.Progress)
	// Began, if set, records the run (failover.Manager.Record) once
	// production first took its failback: its disks may take points from
	// then on, and the failover can no longer be undone.
	Began func(*failover.Run) error
}

// Home is the production site: the VM's owner before the failover.
func Home(run *failover.Run) (string, error) {
	if run.Test {
		return "", fmt.Errorf("run %s of vm %q is a test failover: it has nothing to fail back", run.ID, run.VM)
	}
	if run.Previous == nil || run.Previous.Site == "" {
		return "", fmt.Errorf("run %s of vm %q names no owner before the failover: there is no production site to fail back to", run.ID, run.VM)
	}
	return run.Previous.Site, nil
}

// Cycle runs one failback cycle and returns the point the production disks
// hold after it.
func (b *Back) Cycle(ctx context.Context) (lifeboat.Point, error) {
	run := b.Run
	vm := run.VM
	shared, latest, held, err := b.prepare(ctx)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if run.FailbackSince.IsZero() && b.Began != nil {
		run.FailbackSince = time.Now()
		if err := b.Began(run); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q: recording that its failback began: %w", vm, err)
		}
	}
	target := &Target{Client: b.Client, Shared: shared.ID, Log: b.Log, SharedMap: b.blockMap(vm, shared.ID)}
	if latest.ID != shared.ID {
		target.LatestMap = b.blockMap(vm, latest.ID)
	}
	workDir := filepath.Join(run.Dir, "failback")
	if err := os.MkdirAll(workDir, 0o750); err != nil {
		return lifeboat.Point{}, err
	}
	p := &protect.Protector{VM: b.recovered(workDir), Target: target, Log: b.Log, Progress: b.Progress}
	pt, err := p.Cycle(ctx)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("failback of vm %q to %s (its disks held point %d): %w", vm, b.Client.Peer(), held.ID, err)
	}
	return pt, nil
}

// recovered is the recovered VM as a cycle reads it, working in workDir:
// through its QMP socket, or through libvirt when it runs as a libvirt
// domain here (its generations are then checkpoints of lifeboat's, kept in
// workDir: failover.Manager starts them).
func (b *Back) recovered(workDir string) protect.VM {
	run := b.Run
	v := protect.VM{Name: run.VM, QMPSocket: run.QMP, WorkDir: workDir, StateDir: b.StateDir}
	if run.Domain != "" {
		v.QMPSocket, v.Libvirt = "", &protect.LibvirtDomain{URI: run.Libvirt, Domain: run.Domain}
	}
	return v
}

// prepare asks production to take (or go on with) the failback, and returns
// the failover's point (shared), this site's latest point before the
// failover, and the point production's disks hold.
func (b *Back) prepare(ctx context.Context) (shared, latest, held lifeboat.Point, err error) {
	run := b.Run
	vm := run.VM
	if shared, err = b.point(vm, run.Point); err != nil {
		return shared, latest, held, err
	}
	latest, err = b.latestBefore(vm, run)
	if err != nil {
		return shared, latest, held, err
	}
	holds := lifeboat.Point{VM: vm, ID: shared.ID, Instant: shared.Instant, Consistency: shared.Consistency}
	for _, d := range shared.Disks {
		gen := run.Generations[d.Name]
		if gen == "" {
			return shared, latest, held, fmt.Errorf("vm %q disk %q: the failover started no generation for the production site on it (its point names no lineage, or the VM had no owner), so a failback would have to compare whole disks: not built yet", vm, d.Name)
		}
		holds.Disks = append(holds.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Lineage: d.Lineage, Generation: gen})
	}
	own := map[string]wire.Shared{}
	for _, d := range latest.Disks {
		own[d.Name] = wire.Shared{Peer: b.Site, Lineage: d.Lineage, Point: latest.ID, Generation: d.Generation}
	}
	held, err = b.Client.PrepareFailback(ctx, vm, holds, own)
	return shared, latest, held, err
}

// latestBefore is this site's latest point of vm from before run started:
// the latest, unless a finalize of run folded a point after it.
func (b *Back) latestBefore(vm string, run *failover.Run) (lifeboat.Point, error) {
	pts, err := b.Store.Points(vm)
	if err != nil {
		return lifeboat.Point{}, err
	}
	for i := len(pts) - 1; i >= 0; i-- {
		if _, fold := b.folded(run, pts[i]); !fold {
			return pts[i], nil
		}
	}
	return lifeboat.Point{}, fmt.Errorf("vm %q: no point here from before its failover", vm)
}

func (b *Back) point(vm string, id uint64) (lifeboat.Point, error) {
	pts, err := b.Store.Points(vm)
	if err != nil {
		return lifeboat.Point{}, err
	}
	for _, p := range pts {
		if p.ID == id {
			return p, nil
		}
	}
	return lifeboat.Point{}, fmt.Errorf("vm %q: point %d, which the failover started from, is not here any more", vm, id)
}

func (b *Back) blockMap(vm string, id uint64) func(context.Context, string) (map[int64]lifeboat.Hash, error) {
	return func(_ context.Context, disk string) (map[int64]lifeboat.Hash, error) {
		return b.Store.BlockMap(vm, disk, id)
	}
}

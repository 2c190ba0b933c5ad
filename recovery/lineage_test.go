package recovery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// follow fills in the history of each disk as a protected site would: the
// lineage and generation of the latest point, or a new lineage and a whole
// send for a disk the VM's latest point lacks.
func follow(t *testing.T, s *Store, vm string, id uint64, disks []DiskSpec) []DiskSpec {
	t.Helper()
	latest, found, err := s.Latest(vm)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]DiskSpec, len(disks))
	for i, d := range disks {
		d.Generation = fmt.Sprintf("gen-%s-%d", d.Name, id)
		d.Lineage, d.Base, d.BaseGeneration = "lineage-"+d.Name, 0, ""
		d.Resync = true
		if found {
			for _, ld := range latest.Disks {
				if ld.Name == d.Name {
					d.Lineage, d.Base, d.BaseGeneration, d.Resync = ld.Lineage, latest.ID, ld.Generation, false
				}
			}
		}
		out[i] = d
	}
	return out
}

// A recovery site takes a delta only onto the point it was computed from: of
// the disk's lineage, from its latest point, out of the generation that point
// started; a disk new to the VM only whole. Each refusal names the disk and
// point and wraps ErrLineage; nothing is written.
func TestBeginRefusesDeltaOfAnotherHistory(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "web1", 1, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 0, 4)
	p.commit()
	good := func() []DiskSpec { return follow(t, s, "web1", 2, []DiskSpec{{Name: "vda", Size: 1 << 20}}) }
	tests := []struct {
		name   string
		change func(d *DiskSpec)
		want   string
	}{
		{"an older base point", func(d *DiskSpec) { d.Base = 0 }, "computed from point 0, but the latest point here is 1"},
		{"a later base point", func(d *DiskSpec) { d.Base = 7 }, "computed from point 7"},
		{"another generation", func(d *DiskSpec) { d.BaseGeneration = "gen-vda-0" }, `the dirty blocks come from generation "gen-vda-0", but point 1 started generation "gen-vda-1"`},
		{"another lineage", func(d *DiskSpec) { d.Lineage = "other" }, "lineage other is not the disk's lineage here (lineage-vda)"},
		{"no lineage", func(d *DiskSpec) { d.Lineage = "" }, "no lineage given"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ds := good()
			tc.change(&ds[0])
			_, err := s.Begin(testCtx(t), BeginSpec{VM: "web1", ID: 2, Disks: ds})
			if !errors.Is(err, ErrLineage) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `disk "vda" point 2`) {
				t.Fatalf("Begin: %v, want ErrLineage saying %q", err, tc.want)
			}
		})
	}
	// A resync from the latest point is fine whatever generation it read.
	ds := good()
	ds[0].Resync, ds[0].BaseGeneration = true, ""
	w, err := s.Begin(testCtx(t), BeginSpec{VM: "web1", ID: 2, Disks: ds})
	if err != nil {
		t.Fatalf("a resync from the latest point: %v", err)
	}
	w.Abort(testCtx(t))
	// A new disk must come whole.
	ds = append(good(), DiskSpec{Name: "vdb", Size: 1 << 20, Lineage: "lineage-vdb", Generation: "g"})
	if _, err := s.Begin(testCtx(t), BeginSpec{VM: "web1", ID: 2, Disks: ds}); !errors.Is(err, ErrLineage) || !strings.Contains(err.Error(), "new to this recovery site") {
		t.Fatalf("Begin with a new disk sent as a delta: %v", err)
	}
	if pts := pointIDs(t, s, "web1"); len(pts) != 1 {
		t.Fatalf("points after the refusals: %v", pts)
	}
}

// The first site to commit a point of a VM owns it; another site is refused
// with both names, until a handover raises the epoch. A site declared in the
// config owns a VM before its first point.
func TestOwnership(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	m := model{}
	p := beginAs(t, s, "prod", "web1", 1, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 0, 1)
	p.commit()
	if o, ok, err := s.Owner("web1"); err != nil || !ok || o.Site != "prod" || o.Epoch != 1 {
		t.Fatalf("owner after the first point: %+v %v %v", o, ok, err)
	}
	_, err := s.Begin(testCtx(t), BeginSpec{VM: "web1", ID: 2, Site: "branch", Disks: follow(t, s, "web1", 2, []DiskSpec{{Name: "vda", Size: 1 << 20}})})
	var noe *NotOwnerError
	if !errors.As(err, &noe) || noe.Owner.Site != "prod" || noe.Site != "branch" {
		t.Fatalf("Begin from another site: %v", err)
	}
	if err := s.Authorize("web1", "branch"); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("Authorize(branch): %v", err)
	}
	if err := s.Authorize("db9", "branch"); err != nil {
		t.Fatalf("an unknown VM is free to claim: %v", err)
	}
	if _, err := s.Handover("web1", "branch"); err != nil {
		t.Fatal(err)
	}
	p = beginAs(t, s, "branch", "web1", 2, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 1, 1)
	p.commit()
	if err := s.Authorize("web1", "prod"); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("the old owner after a handover: %v", err)
	}
	s.Close()
	// Declared owners.
	s = openStoreOpts(t, dir, Options{Keep: 100, Owners: map[string]string{"db1": "prod"}})
	if err := s.Authorize("db1", "branch"); !errors.As(err, &noe) || !noe.Declared {
		t.Fatalf("a site other than the declared owner: %v", err)
	}
	if o, _, _ := s.Owner("web1"); o.Site != "branch" || o.Epoch != 2 {
		t.Fatalf("the handover did not survive a reopen: %+v", o)
	}
}

// beginAs is begin for a point sent by site.
func beginAs(t *testing.T, s *Store, site, vm string, id uint64, m model, disks ...DiskSpec) *pointWriter {
	t.Helper()
	for _, d := range disks {
		m.resize(d.Name, d.Size)
	}
	w, err := s.Begin(testCtx(t), BeginSpec{VM: vm, ID: id, Site: site, Instant: time.Unix(int64(1000+id), 0).UTC(),
		Consistency: lifeboat.Filesystem, Disks: follow(t, s, vm, id, disks)})
	if err != nil {
		t.Fatalf("Begin point %d: %v", id, err)
	}
	t.Cleanup(func() { w.Abort(context.Background()) })
	return &pointWriter{t: t, w: w, m: m, rng: rand.New(rand.NewPCG(testenv.Seed(t), id))}
}

func openStoreOpts(t *testing.T, dir string, opts Options) *Store {
	t.Helper()
	opts.Logger = quietLogger()
	s, err := Open(testCtx(t), dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// A failback's finalize records the generation production started at a
// point: the next delta must come from it, no longer from the one the point
// was written with; the change survives a reopen, and bad input is refused.
func TestSetGenerations(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	m := model{}
	p := begin(t, s, "web1", 1, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 0, 1)
	p.commit()
	if err := s.SetGenerations("web1", 1, map[string]string{"vdz": "g"}); err == nil || !strings.Contains(err.Error(), `no disk "vdz"`) {
		t.Errorf("a disk the point lacks: %v", err)
	}
	if err := s.SetGenerations("web1", 7, map[string]string{"vda": "g"}); err == nil {
		t.Error("a point that does not exist: no error")
	}
	if err := s.SetGenerations("web1", 1, map[string]string{"vda": ""}); err == nil {
		t.Error("an empty generation: no error")
	}
	if err := s.SetGenerations("web1", 1, map[string]string{"vda": "prod-home"}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openStore(t, dir, 100)
	stale := follow(t, s, "web1", 2, []DiskSpec{{Name: "vda", Size: 1 << 20}})
	if stale[0].BaseGeneration != "prod-home" {
		t.Fatalf("after a reopen the latest point's generation is %q, want prod-home", stale[0].BaseGeneration)
	}
	stale[0].BaseGeneration = "gen-vda-1" // the one the point was written with
	if _, err := s.Begin(testCtx(t), BeginSpec{VM: "web1", ID: 2, Disks: stale}); !errors.Is(err, ErrLineage) {
		t.Fatalf("a delta from the point's old generation: %v, want ErrLineage", err)
	}
	p = begin(t, s, "web1", 2, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 1, 1)
	p.commit()
}

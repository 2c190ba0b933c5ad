package failback_test

import (
	"context"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// FinishFailback hands production's disks the generations that continue the
// recovery site's chain from the fold, a point holding the same state as the
// failback point the disks hold: so the disks must be that point. A
// finalize cut off before FinishFailback (production's site killed) is run
// again, and finishes without a new failback cycle; meanwhile production's
// site restarted and its VM was started by hand (or by an autostart), wrote
// and was stopped. Before, Finish started the generations on those disks:
// production's late writes were in neither the fold nor any generation, so
// the VM came home with blocks its chain never got. Now Finish refuses,
// saying to run a failback cycle first, and after it finishes with the
// disks equal to the recovered VM's.
func TestFinishRefusesDisksWrittenSinceTheFailbackPoint(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	stateDir := t.TempDir()
	fb, prod := r.prepare(t, stateDir, holds)
	workDir := testsite.ShortDir(t)
	protector := func(fb *failback.Store) *protect.Protector {
		return cycles(rec, workDir, r.failbackTarget(t, fb, holds))
	}
	last := r.failbackCycle(t, protector(fb), prod, guest, holds.ID)
	fold := lifeboat.Point{VM: "vm1", ID: last.ID + 1}
	for _, d := range last.Disks {
		fold.Disks = append(fold.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Lineage: d.Lineage})
	}

	// Production's site dies before FinishFailback; the VM runs there for a while.
	if err := fb.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.runByHand(t, false)

	// The finalize again: PrepareFailback, then FinishFailback of the same
	// last point and fold.
	again, prod2 := r.prepare(t, stateDir, holds)
	want, err := guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := again.Finish(ctx(t), "dr", "vm1", last.ID, fold, nil); err == nil {
		t.Errorf("production finished vm1's failback on disks written after failback point %d", last.ID)
		productionReads(t, r, want)
		return
	} else if !strings.Contains(err.Error(), "failback cycle") {
		t.Errorf("the refused finish does not say to run a failback cycle first: %v", err)
	}
	// A failback cycle overwrites production's late writes; then it finishes.
	last2 := r.failbackCycleResyncing(t, protector(again), prod2, guest, last.ID, map[string]bool{"vdb": true})
	if _, err := again.Finish(ctx(t), "dr", "vm1", last2.ID, fold, nil); err != nil {
		t.Fatal(err)
	}
	productionReads(t, r, want)
}

// productionReads checks that the production VM's disk images, its failback
// finished, read as the recovered VM's disks (want: sha256 by disk).
func productionReads(t *testing.T, r *replicated, want map[string]string) {
	t.Helper()
	r.vm.PowerOn(t)
	defer r.vm.PowerOff(t)
	g, err := workload.Open(ctx(t), r.vm.NBDSocket(), 1, disks...)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	got, err := g.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if got[d.Name] != want[d.Name] {
			t.Errorf("after the finish production's disk %s reads sha256 %s, the recovered VM's %s", d.Name, got[d.Name][:12], want[d.Name][:12])
		}
	}
}

// A VM with a raw disk comes home: FinishFailback starts the generation
// that continues the chain on its qcow2 disk only (a raw disk's bitmaps die
// with the daemon, so production's next cycle compares it by hashes).
// Before, it asked QEMU for a persistent bitmap on the raw disk too, which
// QEMU refuses, and every finalize of such a VM failed there.
func TestFinishWithARawDisk(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	fb, prod := r.prepare(t, t.TempDir(), holds)
	p := cycles(rec, testsite.ShortDir(t), r.failbackTarget(t, fb, holds))
	last := r.failbackCycle(t, p, prod, guest, holds.ID)
	fold := lifeboat.Point{VM: "vm1", ID: last.ID + 1}
	for _, d := range last.Disks {
		fold.Disks = append(fold.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Lineage: d.Lineage})
	}
	want, err := guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	gens, err := fb.Finish(ctx(t), "dr", "vm1", last.ID, fold, nil)
	if err != nil {
		t.Fatalf("finishing the failback of a VM with a raw disk: %v", err)
	}
	if gens["vda"] == "" || gens["vdb"] != "" {
		t.Errorf("generations %v: want one on qcow2 vda and none on raw vdb", gens)
	}
	productionReads(t, r, want)
	r.vm.PowerOn(t)
	defer r.vm.PowerOff(t)
	n, err := r.vm.Monitor().Node(ctx(t), "vda")
	if err != nil {
		t.Fatal(err)
	}
	if b, ok := n.Bitmap(gens["vda"]); !ok || b.Inconsistent || !b.Recording {
		t.Errorf("production's vda after the finish: generation %q %+v (there: %v), want it consistent and recording", gens["vda"], b, ok)
	}
}

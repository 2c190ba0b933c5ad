package failback_test

import (
	"context"
	"os/exec"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
)

// Production's qcow2 disk was shrunk while the VM ran at the recovery site
// (an admin's mistake): the failback cycle is refused (the disk is not the
// point's size), and the admin grows it back to its size, as the refusal
// says, while production's site has let go of the disks. A shrink clears
// the generations' bits past the new end and a grow adds clean ones, so the
// generation of the shared point now says nothing changed where the shrink
// cut data off. Production saw the size differ when it first took the
// failback and records it: its own change record is void from then on, and
// the next cycle compares the disk by hashes, leaving it byte-exact. Before,
// it trusted the generation, and production kept zeros where the shared
// point and the recovered VM had data.
func TestFailbackIntoAShrunkProductionDisk(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	const cut = 16 << 20
	point, err := r.site.Store.BlockMap("vm1", "vda", r.latest.ID)
	if err != nil {
		t.Fatal(err)
	}
	past := 0
	for b, h := range point {
		if b*lifeboat.BlockSize >= cut && !h.IsZero() {
			past++
		}
	}
	if past == 0 {
		t.Fatalf("point %d holds no data past %d bytes of vda: the shrink would cut nothing", r.latest.ID, cut)
	}
	resize := func(size string) {
		t.Helper()
		out, err := exec.Command("qemu-img", "resize", "-f", "qcow2", "--shrink", r.vm.ImagePath("vda"), size).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img resize %s: %v\n%s", size, err, out)
		}
	}
	resize("16M")

	stateDir := t.TempDir()
	fb, _ := r.prepare(t, stateDir, holds)
	workDir := testsite.ShortDir(t)
	if _, err := cycles(rec, workDir, r.failbackTarget(t, fb, holds)).Cycle(ctx(t)); err == nil {
		t.Fatal("a failback cycle wrote into production's shrunk disk")
	} else {
		t.Logf("refused, as it should be: %v", err)
	}
	// Production's site restarts (letting go of the disks); the admin grows
	// the disk back; the failback goes on.
	if err := fb.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	resize("32M")
	again, prod2 := r.prepare(t, stateDir, holds)
	pt := r.failbackCycle(t, cycles(rec, workDir, r.failbackTarget(t, again, holds)), prod2, guest, holds.ID)

	// The same after a failback point: the generation started at its
	// commit lies as well, so the disk is resynchronised.
	if err := again.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	resize("16M")
	third, _ := r.prepare(t, stateDir, holds)
	if _, err := cycles(rec, workDir, r.failbackTarget(t, third, holds)).Cycle(ctx(t)); err == nil {
		t.Fatal("a failback cycle wrote into production's shrunk disk")
	}
	if err := third.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	resize("32M")
	fourth, prod4 := r.prepare(t, stateDir, holds)
	if _, err := guest.Mixed(ctx(t), 3); err != nil {
		t.Fatal(err)
	}
	r.failbackCycleResyncing(t, cycles(rec, workDir, r.failbackTarget(t, fourth, holds)), prod4, guest, pt.ID, map[string]bool{"vda": true, "vdb": true})
}

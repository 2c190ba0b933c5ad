package recovery

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Forget deletes a VM's points, images and records, and leaves the other
// VMs' alone; it refuses while a run pins a point and for a VM failed over
// here; a VM forgotten can be replicated again from nothing, by any site.
func TestForget(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	writeSeries(t, s, "gone", 3)
	models := writeSeries(t, s, "stays", 2)

	if err := s.AddPin(testCtx(t), "gone", "gone-2-test-abc", Pin{Point: 2, Reason: "test failover", Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Forget(testCtx(t), "gone"); err == nil || !strings.Contains(err.Error(), "gone-2-test-abc") || !strings.Contains(err.Error(), "--test --stop") {
		t.Fatalf("forget of a pinned VM: %v; want a refusal naming the run and what to do", err)
	}
	if got := pointIDs(t, s, "gone"); len(got) != 3 {
		t.Fatalf("a refused forget changed the points: %v", got)
	}
	if err := s.RemovePin("gone", "gone-2-test-abc"); err != nil {
		t.Fatal(err)
	}
	f, err := s.Forget(testCtx(t), "gone")
	if err != nil {
		t.Fatalf("forget: %v", err)
	}
	if len(f.Points) != 3 || f.Bytes == 0 {
		t.Errorf("forget reported %+v, want 3 points and the bytes freed", f)
	}
	if pts, err := s.Points("gone"); err != nil || len(pts) != 0 {
		t.Errorf("after forget: points %v (%v)", pts, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vms", "gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after forget the VM's directory is still there: %v", err)
	}
	if _, ok, _ := s.Owner("gone"); ok {
		t.Error("after forget the VM still has an owner")
	}
	for i, m := range models {
		checkPoint(t, s, "stays", uint64(i+1), m)
	}
	if _, err := s.Forget(testCtx(t), "gone"); !errors.Is(err, ErrUnknownVM) {
		t.Errorf("second forget: %v, want ErrUnknownVM", err)
	}
	if _, err := s.Forget(testCtx(t), "../stays"); err == nil {
		t.Error("forget of a name with a path in it was accepted")
	}
	// Replicated again from nothing: the store takes it as a new VM.
	again := writeSeries(t, s, "gone", 2)
	checkPoint(t, s, "gone", 2, again[1])

	// Failed over here: its points are the disks it runs on.
	if _, _, err := s.TakeOver("stays", "dr", 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Forget(testCtx(t), "stays"); err == nil || !strings.Contains(err.Error(), "failed over here") {
		t.Fatalf("forget of a VM failed over here: %v; want a refusal", err)
	}
	// After a restart the store opens without the forgotten VM's records.
	s.Close()
	s = openStore(t, dir, 100)
	if vms, err := s.VMs(); err != nil || strings.Join(vms, ",") != "gone,stays" {
		t.Errorf("after a restart the store lists %v (%v)", vms, err)
	}
}

// A forget that comes while a point is written waits for it, and a merge
// into the latest point (keep 1) that comes meanwhile takes the chain and
// then waits for the same writer slot. Before, forget held the writer slot
// and then waited for the chain, the merge the other way round: once the
// point ended, each waited for the other until the forget's context ran
// out (and the VM's points with it).
func TestForgetBesideAMergeIntoTheLatestPoint(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "fm", 2)
	s.keep = 1
	p3 := begin(t, s, "fm", 3, models[1].clone(), DiskSpec{Name: "vda", Size: 4 << 20})
	p3.data("vda", 2, 2)
	forgot := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := s.Forget(ctx, "fm")
		forgot <- err
	}()
	time.Sleep(300 * time.Millisecond) // forget waits for the point being written
	s.retainLater("fm")                // plans 1 into 2, the latest: waits for the point too
	time.Sleep(300 * time.Millisecond)
	if err := p3.w.Abort(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := <-forgot; err != nil {
		t.Fatalf("forget beside a merge into the latest point: %v", err)
	}
	s.SettleRetention()
	if got := pointIDs(t, s, "fm"); len(got) != 0 {
		t.Errorf("points after forget: %v, want none", got)
	}
}

// adoptSeed adopts a 4 MiB qcow2 image made in dir, its first 8 blocks
// random data, as point 1 of vm (protection in reverse), and returns the
// image's path and the model of the point.
func adoptSeed(t *testing.T, s *Store, dir, vm string) (string, model) {
	t.Helper()
	m := model{"vda": make([]byte, 4<<20)}
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 1))
	for i := range 8 * B {
		m["vda"][i] = byte(rng.Uint32())
	}
	raw, seed := filepath.Join(dir, vm+"-vda.raw"), filepath.Join(dir, vm+"-vda.qcow2")
	if err := os.WriteFile(raw, m["vda"], 0o600); err != nil {
		t.Fatal(err)
	}
	if err := qemu.Convert(testCtx(t), raw, "raw", seed, "qcow2"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Adopt(testCtx(t), BeginSpec{VM: vm, ID: 1, Instant: time.Unix(1001, 0).UTC(),
		Disks: []DiskSpec{{Name: "vda", Size: 4 << 20, Resync: true, Lineage: "lineage-vda", Generation: "gen-vda-1", Seed: seed}}}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	return seed, m
}

// A VM protected in reverse onto disks on another file system than the
// store: its first point's image is an overlay over the old production
// disk, renamed where it was (failback.Reverse). Forget refuses it, as it
// says, rather than delete the overlays and leave that disk behind, read by
// nothing and named by no record. Before, the check looked at the points'
// own images, which always lie in the store, and the forget went through.
func TestForgetRefusesAVMProtectedInReverseOntoItsOwnDisks(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	seed, m := adoptSeed(t, s, t.TempDir(), "rv")
	p := begin(t, s, "rv", 2, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 20, 3)
	p.commit()
	if _, err := s.Forget(testCtx(t), "rv"); err == nil || !strings.Contains(err.Error(), "outside the store") || !strings.Contains(err.Error(), seed) {
		t.Fatalf("forget of a VM protected in reverse onto its own disks: %v; want a refusal naming %s", err, seed)
	}
	if got := pointIDs(t, s, "rv"); len(got) != 2 {
		t.Fatalf("a refused forget changed the points: %v", got)
	}
	checkPoint(t, s, "rv", 2, m)

	// On the store's file system the seed was moved into the VM's
	// directory: the VM's to forget with its points.
	in := filepath.Join(s.Dir(), "vms", "rv2", "vda")
	if err := os.MkdirAll(in, 0o750); err != nil {
		t.Fatal(err)
	}
	adoptSeed(t, s, in, "rv2")
	if f, err := s.Forget(testCtx(t), "rv2"); err != nil || len(f.Points) != 1 {
		t.Fatalf("forget of a VM whose seed lies in the store: %+v, %v", f, err)
	}
}

// A site killed in the middle of a forget: before the catalog forgot the
// VM, its points stay listed and whole (the files set aside go back at
// Open); after, its files go at Open, so a VM of that name replicated again
// from nothing finds none of them. The hook stands in for the kill, which
// cannot be timed between two steps from outside.
func TestForgetCutShortByACrash(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	for _, step := range []string{"aside", "cataloged"} {
		t.Run(step, func(t *testing.T) {
			s := openStore(t, dir, 100)
			models := writeSeries(t, s, "cut-"+step, 2)
			s.testForgetHook = func(at string) error {
				if at == step {
					return errMergeStopped
				}
				return nil
			}
			if _, err := s.Forget(testCtx(t), "cut-"+step); !errors.Is(err, errMergeStopped) {
				t.Fatalf("forget: %v, want the hook's stop", err)
			}
			crash(t, s)
			s = openStore(t, dir, 100)
			if trash, _ := filepath.Glob(filepath.Join(dir, "vms", forgottenPrefix+"*")); len(trash) != 0 {
				t.Errorf("after Open, set-aside files are left: %v", trash)
			}
			switch step {
			case "aside": // the forget did not happen
				if got := pointIDs(t, s, "cut-"+step); len(got) != 2 {
					t.Fatalf("points after a forget cut short before the catalog: %v, want both", got)
				}
				for i, m := range models {
					checkPoint(t, s, "cut-"+step, uint64(i+1), m)
				}
			case "cataloged": // it did: the files are gone
				if got := pointIDs(t, s, "cut-"+step); len(got) != 0 {
					t.Fatalf("points after a forget cut short after the catalog: %v, want none", got)
				}
				if _, err := os.Stat(filepath.Join(dir, "vms", "cut-"+step)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the forgotten VM's directory is back: %v", err)
				}
				again := writeSeries(t, s, "cut-"+step, 1)
				checkPoint(t, s, "cut-"+step, 1, again[0])
			}
			s.Close()
		})
	}
}

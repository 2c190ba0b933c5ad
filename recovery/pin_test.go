package recovery

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// While a run pins a VM, retention merges none of its points (a merge
// rewrites the images a started VM reads); once the last pin goes, it
// catches up by itself, without waiting for a new point. A pin of a point that does not exist is refused.
func TestPinHoldsRetention(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "p1", 5)
	s.keep = 3
	if err := s.AddPin(testCtx(t), "p1", "run-a", Pin{Point: 2, Reason: "test failover", Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddPin(testCtx(t), "p1", "run-b", Pin{Point: 99}); err == nil {
		t.Error("a pin of a point that does not exist was taken")
	}
	if err := s.ApplyRetention(testCtx(t), "p1"); err != nil {
		t.Fatal(err)
	}
	if got := pointIDs(t, s, "p1"); !slices.Equal(got, []uint64{1, 2, 3, 4, 5}) {
		t.Fatalf("points with a pin after retention: %v, want all five", got)
	}
	checkPoint(t, s, "p1", 2, models[1])
	if err := s.RemovePin("p1", "run-a"); err != nil {
		t.Fatal(err)
	}
	if pins, _ := s.Pins("p1"); len(pins) != 0 {
		t.Fatalf("pins after removal: %v", pins)
	}
	// With no new point: the VM may never send one again (production lost).
	s.SettleRetention()
	if got := pointIDs(t, s, "p1"); !slices.Equal(got, []uint64{3, 4, 5}) {
		t.Fatalf("points once the last pin went: %v, want [3 4 5]", got)
	}
	for i := 2; i < 5; i++ {
		checkPoint(t, s, "p1", uint64(i+1), models[i])
	}
}

// A merge that fails without a crash stays recorded and releases the chain,
// so a failover may pin the VM and start from a point meanwhile. Retention
// then waits for the pin before finishing the recorded merge, a restart of
// the site while the failover's VM runs (it outlives lifeboat) opens the
// store and leaves the merge alone, and once the run ends retention
// finishes it.
func TestRecordedMergeWaitsForPins(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	models := writeSeries(t, s, "vm1", 3)
	s.keep = 2
	failOnce := true
	// The hook stands in for a failure after the commit (the store full, a
	// read-back mismatch: the tests of those drive them for real).
	s.testMergeHook = func(step string) error {
		if step == stepCommitted && failOnce {
			failOnce = false
			return errMergeStopped
		}
		return nil
	}
	if err := s.ApplyRetention(testCtx(t), "vm1"); !errors.Is(err, errMergeStopped) {
		t.Fatalf("ApplyRetention: %v, want the hook's failure", err)
	}
	// A failover from the latest point: pinned, its QEMU reads the chain
	// with QEMU's image locks.
	if err := s.AddPin(testCtx(t), "vm1", "vm1-3-failover-abc", Pin{Point: 3, Reason: "failover", Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	reader := failoverReader(t, s, "vm1", 3)
	if err := s.ApplyRetention(testCtx(t), "vm1"); err != nil {
		t.Errorf("ApplyRetention with a failover pinned: %v, want it to wait for the pin", err)
	}
	if m, err := s.recordedMerge("vm1"); err != nil || m == nil || m.Done {
		t.Errorf("merge after retention with a pin: %+v %v, want it recorded and not done", m, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// The site restarts while the failover's VM runs.
	s2 := openStore(t, dir, 2) // Open must not fail
	if got := pointIDs(t, s2, "vm1"); !slices.Equal(got, []uint64{2, 3}) {
		t.Errorf("points after Open: %v, want [2 3]", got)
	}
	checkPoint(t, s2, "vm1", 3, models[2])

	// The run ends: retention finishes the merge.
	if err := reader.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := s2.RemovePin("vm1", "vm1-3-failover-abc"); err != nil {
		t.Fatal(err)
	}
	if err := s2.ApplyRetention(testCtx(t), "vm1"); err != nil {
		t.Fatalf("retention once the run ended: %v", err)
	}
	if m, err := s2.recordedMerge("vm1"); err != nil || m != nil {
		t.Errorf("merge after the run ended and retention ran: %+v %v, want it finished", m, err)
	}
	if files := imageFiles(t, s2, "vm1"); len(files) != 2 {
		t.Errorf("images after the merge: %v, want 2", files)
	}
	checkPoint(t, s2, "vm1", 2, models[1])
	checkPoint(t, s2, "vm1", 3, models[2])
}

// failoverReader stands in for a failover's qemu-system (which outlives
// lifeboat): an overlay above point id's image, opened writable with QEMU's
// default image locks, its chain as the headers say.
func failoverReader(t *testing.T, s *Store, vm string, id uint64) *qemu.Daemon {
	t.Helper()
	base, err := s.ImagePath(vm, id, "vda")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ov := filepath.Join(dir, "disk-0.qcow2")
	if err := qemu.CreateImage(testCtx(t), ov, "qcow2", 0, base, "qcow2"); err != nil {
		t.Fatal(err)
	}
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: filepath.Join(dir, "q")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Kill() })
	if err := d.Monitor().BlockdevAdd(testCtx(t), map[string]any{"driver": "qcow2", "node-name": "lb-d0",
		"file": map[string]any{"driver": "file", "filename": ov}}); err != nil {
		t.Fatal(err)
	}
	return d
}

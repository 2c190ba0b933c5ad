package recovery

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A lifeboat killed during a merge leaves its daemons running, and one of
// them may hold the merged point's image with QEMU's lock (the merge's
// read-back check opens it so). Open kills them before it finishes the
// merge, whose commit needs that image's write lock.
func TestOpenFinishesAMergeThatALeftoverDaemonHeld(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	models := writeSeries(t, s, "vm1", 3)
	s.testMergeHook = func(step string) error {
		if step == stepRecorded {
			return errMergeStopped
		}
		return nil
	}
	s.keep = 2
	if err := s.ApplyRetention(testCtx(t), "vm1"); err == nil {
		t.Fatal("the merge was not stopped")
	}
	keepImage := s.abs(imageRel("vm1", "vda", 2))
	crash(t, s)

	// The crashed site's daemon, in its runtime directory, with point 2's
	// image open read-only and locked.
	run, err := os.MkdirTemp(filepath.Join(dir, "run"), "w")
	if err != nil {
		t.Fatal(err)
	}
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: run})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Kill() })
	if err := d.Monitor().BlockdevAdd(testCtx(t), map[string]any{"driver": "qcow2", "node-name": "held", "read-only": true,
		"file": map[string]any{"driver": "file", "filename": keepImage}}); err != nil {
		t.Fatal(err)
	}

	s2 := openStoreOpts(t, dir, Options{Keep: 2})
	if got := pointIDs(t, s2, "vm1"); len(got) != 2 || got[0] != 2 {
		t.Fatalf("points after Open = %v, want [2 3]", got)
	}
	checkPoint(t, s2, "vm1", 2, models[1])
	checkPoint(t, s2, "vm1", 3, models[2])
	if alive(d.Pid()) {
		t.Errorf("Open left the crashed site's daemon (pid %d) running", d.Pid())
	}
}

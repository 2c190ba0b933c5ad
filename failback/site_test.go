package failback_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
)

// The qemu-storage-daemon over production's disks dies between two failback
// cycles while production's site runs on (the OOM killer, an admin's kill):
// lifeboat no longer holds the disks, and the production VM is started by
// hand there, writes and is stopped. The next cycle's PrepareFailback
// (Site.Take) finds the daemon gone and opens the disks again from the
// failback's record; the daemon was killed, so its generations are
// inconsistent and both disks are compared by hashes, and production ends
// byte-exact as the recovered VM. Before, Take answered "prepared already"
// with the dead daemon, and every later cycle failed on its QMP until
// production's site restarted.
func TestFailbackDaemonDiesBetweenCycles(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	fb, err := failback.NewStore(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.Close(context.Background()) })
	runDir := testsite.ShortDir(t)
	site := &failback.Site{Store: fb, RunDir: runDir,
		VM: func(context.Context, string) (failback.VMInfo, bool) {
			return failback.VMInfo{Peer: "dr", WorkDir: r.workDir}, true
		}}
	take := func() lifeboat.Point {
		t.Helper()
		held, err := site.Take(ctx(t), "dr", "vm1", holds, r.own())
		if err != nil {
			t.Fatalf("PrepareFailback: %v", err)
		}
		return held
	}
	p := cycles(rec, testsite.ShortDir(t), r.failbackTarget(t, fb, holds))
	if held := take(); held.ID != holds.ID {
		t.Fatalf("production's disks hold point %d, want %d", held.ID, holds.ID)
	}
	pt := r.failbackCycle(t, p, failbackDisks(t, fb), guest, holds.ID)

	// The daemon over the disks dies; production's site goes on.
	b, err := os.ReadFile(filepath.Join(runDir, "vm1", "qsd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("production's failback daemon %d is still there 10 s after SIGKILL", pid)
		}
	}
	// The VM started by hand at production writes, and is stopped.
	r.runByHand(t, false)

	if _, err := guest.Mixed(ctx(t), 3); err != nil {
		t.Fatal(err)
	}
	if held := take(); held.ID != pt.ID {
		t.Errorf("after its daemon died production says its disks hold point %d, want %d", held.ID, pt.ID)
	}
	r.failbackCycleResyncing(t, p, failbackDisks(t, fb), guest, pt.ID, map[string]bool{"vda": true, "vdb": true})
}

// failbackDisks is the production disks fb holds open for vm1's failback.
func failbackDisks(t *testing.T, fb *failback.Store) *failback.Production {
	t.Helper()
	p := failback.ProductionOf(fb, "vm1")
	if p == nil {
		t.Fatal("production holds no disks open for vm1's failback")
	}
	return p
}

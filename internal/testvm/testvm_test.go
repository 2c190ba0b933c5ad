package testvm_test

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
)

// TestCleanupStopsEveryDaemon checks that the daemons a test started — the
// first and the ones Restart and Crash start — are gone with its directory
// when the test ends.
func TestCleanupStopsEveryDaemon(t *testing.T) {
	var pids []int
	var dir string
	t.Run("vm", func(t *testing.T) {
		vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20},
			testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 1 << 20})
		dir = vm.Dir
		pids = append(pids, vm.Daemon.Pid())
		if _, err := os.Stat(vm.ImagePath("vdb")); err != nil {
			t.Fatalf("image of vdb: %v", err)
		}
		vm.Restart(t)
		pids = append(pids, vm.Daemon.Pid())
		vm.Crash(t)
		pids = append(pids, vm.Daemon.Pid())
		if _, err := vm.Monitor().Node(t.Context(), "vdb"); err != nil {
			t.Fatalf("after Crash the disks must be back: %v", err)
		}
	})
	if len(pids) != 3 {
		t.Fatalf("subtest did not get far: pids %v", pids)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("qemu-storage-daemon %d still running after the test (kill -0: %v)", pid, err)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("VM dir %s left behind: %v", dir, err)
	}
}

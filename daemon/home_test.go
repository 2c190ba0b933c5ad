package daemon

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A homecoming waits until the VM runs: its QMP answers and its guest has
// been started. Real peers: a qemu-storage-daemon (no run state: it runs
// when it answers) and a qemu-system started with -S (prelaunch: not yet,
// until `cont`); a socket nothing listens on does not run.
func TestVMRuns(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon", "qemu-system-x86_64")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "lbhome")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	absent := &vm{cfg: VMConfig{Name: "vm1", QMP: filepath.Join(dir, "none.qmp")}}
	if absent.runs(ctx) {
		t.Error("a VM whose QMP socket does not exist runs")
	}

	qsd, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: filepath.Join(dir, "qsd")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qsd.Stop(context.Background()) })
	if v := (&vm{cfg: VMConfig{Name: "vm1", QMP: qsd.ClientQMPSocket()}}); !v.runs(ctx) {
		t.Error("a storage daemon that answers does not run")
	}

	sock := filepath.Join(dir, "vm.qmp")
	cmd := exec.Command("qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	v := &vm{cfg: VMConfig{Name: "vm1", QMP: sock}}
	for deadline := time.Now().Add(20 * time.Second); ; {
		m, err := qemu.Dial(ctx, sock)
		if err == nil {
			m.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-system's QMP did not answer: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v.runs(ctx) {
		t.Error("a QEMU started with -S (prelaunch) runs before `cont`")
	}
	m, err := qemu.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	err = m.Execute(ctx, "cont", nil, nil)
	m.Close() // a QMP socket serves one client at a time
	if err != nil {
		t.Fatal(err)
	}
	if !v.runs(ctx) {
		t.Error("a QEMU does not run after `cont`")
	}
}

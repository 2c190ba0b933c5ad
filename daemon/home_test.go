package daemon

import (
	"context"
	"log/slog"
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

// A start: command that starts the VM in the background and returns (a
// script ending in `qemu-system-x86_64 ... &`) leaves a child holding its
// output: before, the start waited for that child to close it, i.e. for
// the VM to stop, past homeStartTimeout, and replication never resumed.
// Now the start returns once the command has ended (at most
// hostcmd.WaitDelay later), and the VM it started is left running.
func TestStartCommandThatLeavesTheVMRunningReturns(t *testing.T) {
	pids := testenv.NewPIDs(t)
	v := &vm{cfg: VMConfig{Name: "vm1", Start: []string{"sh", "-c", "sleep 600 & echo $! >> " + pids.Path + "; echo started"}}}
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- v.start(context.Background(), slog.New(slog.DiscardHandler)) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("start: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the start: command's background child (the VM it started) holds the start past 30 s")
	}
	t.Logf("start returned after %v", time.Since(start).Round(time.Millisecond))
	if live := pids.Alive(); len(live) != 1 {
		t.Errorf("the process the start: command left running is gone (running: %v)", live)
	}
}

package qemu_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestStartDaemonBadArgReportsStderr(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon")
	dir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: dir, Args: []string{"--blockdev", "driver=no-such-driver,node-name=x"}})
	if err == nil {
		d.Kill()
		t.Fatal("StartDaemon with a bad --blockdev succeeded")
	}
	// qemu-storage-daemon says: Unknown driver 'no-such-driver'
	if !strings.Contains(err.Error(), "no-such-driver") {
		t.Errorf("error does not carry qemu-storage-daemon's stderr: %v", err)
	}
}

// A deep runtime directory cannot hold unix sockets: they go to a short one,
// removed when the daemon ends.
func TestStartDaemonLongDirUsesShortSockets(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("x", 100))
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: dir, NBD: true})
	if err != nil {
		t.Fatal(err)
	}
	sock := d.NBDSocket()
	if len(sock) > 107 || strings.HasPrefix(sock, dir) {
		t.Fatalf("socket %s not moved to a short directory", sock)
	}
	if err := d.Monitor().Execute(testCtx(t), "query-version", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(sock)); !os.IsNotExist(err) {
		t.Fatalf("short socket directory left behind: %v", err)
	}
}

func TestDaemonStopAndKill(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	pid := vm.Daemon.Pid()
	if err := vm.Daemon.Stop(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("daemon %d still there after Stop (kill -0: %v)", pid, err)
	}
	if err := vm.Daemon.Stop(testCtx(t)); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := vm.Daemon.Kill(); err != nil {
		t.Errorf("Kill after Stop: %v", err)
	}
}

func TestBitmapsAcrossRestartAndCrash(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 4 << 20})
	ctx := testCtx(t)
	if err := vm.Monitor().AddBitmap(ctx, "vda", "g1", true, false); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 1 0 64k", "write -P 1 2M 64k")

	vm.Restart(t)
	b, ok := bitmap(t, ctx, vm.Monitor(), "vda", "g1")
	if !ok || !b.Persistent || b.Inconsistent || b.Count != 128<<10 || !b.Recording {
		t.Fatalf("g1 after a clean restart = %+v (present %v); want persistent, consistent, recording, 131072 dirty", b, ok)
	}
	info, err := qemu.ReadImageInfo(ctx, vm.ImagePath("vda"))
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Bitmaps) != 1 || info.Bitmaps[0] != "g1" {
		t.Errorf("qemu-img info bitmaps = %v, want [g1]", info.Bitmaps)
	}

	vm.Crash(t)
	b, ok = bitmap(t, ctx, vm.Monitor(), "vda", "g1")
	if !ok || !b.Inconsistent {
		t.Fatalf("g1 after a crash = %+v (present %v); want inconsistent", b, ok)
	}
	// An inconsistent generation cannot be fleeced from; the error says what to do.
	_, err = vm.Monitor().StartFleece(ctx, []qemu.FleeceDisk{{Node: "vda", File: vm.ImagePath("vda") + ".f", NewBitmap: "g2", OldBitmap: "g1"}})
	if err == nil || !strings.Contains(err.Error(), "inconsistent") {
		t.Errorf("StartFleece from an inconsistent bitmap: err = %v", err)
	}
	if err := vm.Monitor().RemoveBitmap(ctx, "vda", "g1"); err != nil {
		t.Errorf("an inconsistent bitmap must be removable: %v", err)
	}
}

func TestStartDaemonInDirWithComma(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon")
	parent, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(parent) })
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: parent + "/a,b", NBD: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill()
	if _, err := os.Stat(d.NBDSocket()); err != nil {
		t.Errorf("NBD socket not where NBDSocket says: %v", err)
	}
	if err := d.Stop(testCtx(t)); err != nil {
		t.Error(err)
	}
}

// A daemon that does not answer is described by what it is doing. SIGSTOP
// stands in for a hang: a real qemu-storage-daemon cannot be made to stall a
// command on demand.
func TestDiagnosisOfAStalledDaemon(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon")
	d, err := qemu.StartDaemon(testCtx(t), qemu.DaemonConfig{Dir: t.TempDir(), NBD: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Kill() })
	if err := syscall.Kill(d.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := d.Monitor().Execute(ctx, "query-version", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("query-version to a stopped daemon: %v, want a deadline", err)
	}
	diag := d.Diagnosis()
	// Every thread of a stopped process is in state T.
	if !strings.Contains(diag, "is running") || !strings.Contains(diag, fmt.Sprintf("%d/qemu-storage-da T", d.Pid())) || strings.Contains(diag, " S ") {
		t.Errorf("diagnosis does not say the daemon's threads are stopped: %s", diag)
	}
	syscall.Kill(d.Pid(), syscall.SIGCONT)
	if err := d.Kill(); err != nil {
		t.Fatal(err)
	}
	if diag := d.Diagnosis(); !strings.Contains(diag, "has exited") {
		t.Errorf("diagnosis of a killed daemon: %s", diag)
	}
}

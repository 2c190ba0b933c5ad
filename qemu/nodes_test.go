package qemu_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestDisksOnStorageDaemon(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 4 << 20},
		testvm.DiskSpec{Name: "old", Format: "qcow2", Size: 1 << 20, Compat: "0.10"},
	)
	m, ctx := vm.Monitor(), testCtx(t)
	// A read-only node and one of lifeboat's own must not count as disks.
	if err := m.BlockdevAdd(ctx, map[string]any{"driver": "raw", "node-name": "cdrom", "read-only": true,
		"file": map[string]any{"driver": "file", "filename": vm.ImagePath("vdb"), "read-only": true}}); err != nil {
		t.Fatal(err)
	}
	if err := m.BlockdevAdd(ctx, map[string]any{"driver": "null-co", "node-name": qemu.OwnPrefix + "x", "size": 1 << 20}); err != nil {
		t.Fatal(err)
	}
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := diskNames(disks); got != "old,vda,vdb" {
		t.Fatalf("Disks() = %s, want old,vda,vdb", got)
	}
	want := []qemu.BlockNode{
		{NodeName: "old", Driver: "qcow2", Filename: vm.ImagePath("old"), Size: 1 << 20, Compat: "0.10"},
		{NodeName: "vda", Driver: "qcow2", Filename: vm.ImagePath("vda"), Size: 8 << 20, Compat: "1.1"},
		{NodeName: "vdb", Driver: "raw", Filename: vm.ImagePath("vdb"), Size: 4 << 20},
	}
	for i, w := range want {
		g := disks[i]
		if g.NodeName != w.NodeName || g.Driver != w.Driver || g.Filename != w.Filename || g.Size != w.Size || g.Compat != w.Compat || g.ReadOnly {
			t.Errorf("disk %d = %+v, want %+v", i, g, w)
		}
	}
	if disks[0].PersistentBitmaps() || !disks[1].PersistentBitmaps() || disks[2].PersistentBitmaps() {
		t.Error("PersistentBitmaps: want only the qcow2 v3 disk to keep bitmaps")
	}
}

func TestNodeNotFoundListsNodes(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	_, err := vm.Monitor().Node(testCtx(t), "vdx")
	if err == nil || !strings.Contains(err.Error(), `"vdx"`) || !strings.Contains(err.Error(), "vda") {
		t.Errorf("Node(vdx) error = %v; want it to name vdx and list vda", err)
	}
}

// TestDisksOnQEMUSystem runs Disks against a real qemu-system-x86_64 with no
// guest (-machine none): the block layer answers QMP like a running VM's.
func TestDisksOnQEMUSystem(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img")
	dir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx := testCtx(t)
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	if err := qemu.CreateImage(ctx, base, "qcow2", 2<<20, "", ""); err != nil {
		t.Fatal(err)
	}
	if err := qemu.CreateImage(ctx, top, "qcow2", 0, base, "qcow2"); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qmp.sock")
	cmd := exec.Command("qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
		"-qmp", "unix:"+sock+",server=on,wait=off",
		"-blockdev", `{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"`+top+`"}}`,
		"-blockdev", `{"driver":"null-co","node-name":"ro0","read-only":true}`,
	)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	var m *qemu.Monitor
	for deadline := time.Now().Add(10 * time.Second); m == nil; {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		m, err = qemu.Dial(dctx, sock)
		cancel()
		if err != nil {
			select {
			case <-exited:
				t.Fatalf("qemu-system-x86_64 exited: %s", stderr.String())
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("qemu-system-x86_64 QMP never answered: %v", err)
			}
		}
	}
	defer m.Close()
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The backing node and the file nodes are children, ro0 is read-only.
	if got := diskNames(disks); got != "disk0" {
		t.Errorf("Disks() = %q, want disk0", got)
	}
}

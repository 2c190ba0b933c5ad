package qemu_test

import (
	"bufio"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestExports(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	m, ctx := vm.Monitor(), testCtx(t)

	// The daemon's server is already up, and QEMU runs one only.
	if err := m.NBDServerStart(ctx, filepath.Join(vm.Dir, "other.sock")); !errors.Is(err, qemu.ErrNBDServerRunning) {
		t.Errorf("NBDServerStart on a running server: err = %v, want ErrNBDServerRunning", err)
	}

	if err := m.AddBitmap(ctx, "vda", "g1", true, false); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 3 128k 64k")
	// An enabled bitmap cannot be published read-only.
	if err := m.ExportAdd(ctx, qemu.Export{ID: "e1", Node: "vda", Name: "ro", Bitmaps: []string{"g1"}}); err == nil {
		t.Error("export publishing an enabled bitmap was accepted")
	}
	if err := m.DisableBitmap(ctx, "vda", "g1"); err != nil {
		t.Fatal(err)
	}
	if err := m.ExportAdd(ctx, qemu.Export{ID: "e1", Node: "vda", Name: "ro", Bitmaps: []string{"g1"}}); err != nil {
		t.Fatal(err)
	}
	if got := extents(dirtyMap(t, vm.NBDURI("ro"), "g1")); got != "131072+65536" {
		t.Errorf("published g1: dirty %s, want 131072+65536", got)
	}
	if err := tryQemuIO(t, false, vm.NBDURI("ro"), "write 0 64k"); err == nil {
		t.Error("write to a read-only export succeeded")
	}

	// A connected client blocks ExportDel, not ExportDelForce.
	connectedClient(t, vm.NBDURI("ro"))
	if err := m.ExportDel(ctx, "e1"); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("ExportDel with a client connected: err = %v, want in use", err)
	}
	if err := m.ExportDelForce(ctx, "e1"); err != nil {
		t.Fatal(err)
	}
	exports, err := m.Exports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range exports {
		if e.ID == "e1" {
			t.Errorf("export e1 still listed after ExportDelForce: %+v", e)
		}
	}
	if err := m.ExportDel(ctx, "e1"); err == nil {
		t.Error("deleting a missing export succeeded")
	}
}

// connectedClient starts a qemu-io that connects to uri, reads once, and
// stays connected until the test ends. It returns once the read is done.
func connectedClient(t *testing.T, uri string) {
	t.Helper()
	testenv.RequireTools(t, "qemu-io", "stdbuf")
	// stdbuf: qemu-io buffers its report when stdout is a pipe.
	cmd := exec.Command("stdbuf", "-oL", "qemu-io", "-r", "-f", "raw", "-c", "read 0 512", "-c", "sleep 20000", uri)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	connected := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "read 512/512") {
				connected <- true
				return
			}
		}
		connected <- false
	}()
	select {
	case ok := <-connected:
		if !ok {
			t.Fatalf("qemu-io did not read from %s", uri)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("qemu-io did not connect to %s within 10 s", uri)
	}
}

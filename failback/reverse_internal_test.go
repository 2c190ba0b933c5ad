package failback

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A disk image goes into the store when the store is on its file system,
// and is renamed where it is when not (a rename cannot cross file systems,
// and a copy is what the reversal avoids); either way the VM's definition
// no longer finds it, and a move cut off before is finished.
func TestSeedPath(t *testing.T) {
	images := t.TempDir()
	file := filepath.Join(images, "web1.qcow2")
	if err := os.WriteFile(file, []byte("disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	dk := &disk{Disk: Disk{Name: "vda", File: file, Format: "qcow2"}}

	store := t.TempDir()
	if got, want := seedPath(store, "web1", "vda", 7, dk), filepath.Join(store, "vms", "web1", "vda", "seed-0000000000000007.qcow2"); got != want {
		t.Errorf("store on the image's file system: %s, want %s", got, want)
	}
	other, err := os.MkdirTemp("/dev/shm", "lb-store-")
	if err != nil {
		t.Fatalf("a store on another file system (tmpfs /dev/shm): %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(other) })
	if sameFS(images, other) {
		t.Fatalf("%s and %s are on one file system here: the test needs two", images, other)
	}
	to := seedPath(other, "web1", "vda", 7, dk)
	if filepath.Dir(to) != images || !strings.Contains(filepath.Base(to), "lifeboat-web1-point-7") || to == file {
		t.Errorf("store on another file system: %s, want a new name beside %s", to, file)
	}
	sd := Seed{From: file, To: to, Format: "qcow2"}
	if err := moveSeed(context.Background(), sd); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("the image is still at %s: %v", file, err)
	}
	if fi, err := os.Stat(to); err != nil || fi.Mode().Perm() != 0o400 {
		t.Errorf("the moved image: %v %v, want read-only", fi, err)
	}
	if err := moveSeed(context.Background(), sd); err != nil {
		t.Errorf("a repeated move (cut off after the rename): %v", err)
	}
}

// An image whose backing file it names relative to its own directory (as
// `qemu-img create -b base.qcow2` writes it) still reads through it once
// moved into the store.
func TestSeedKeepsItsBacking(t *testing.T) {
	images, store := t.TempDir(), t.TempDir()
	qemuImg := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}
	base, top := filepath.Join(images, "base.qcow2"), filepath.Join(images, "top.qcow2")
	qemuImg("create", "-q", "-f", "qcow2", base, "1M")
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 64k", base).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	cmd := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
	cmd.Dir = images
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	dk := &disk{Disk: Disk{Name: "vda", File: top, Format: "qcow2"}}
	sd := Seed{From: top, To: seedPath(store, "web1", "vda", 3, dk), Format: "qcow2"}
	if err := moveSeed(context.Background(), sd); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5c 0 64k", sd.To).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "read 65536/65536") {
		t.Errorf("the moved image does not read its backing's data: %v\n%s", err, out)
	}
}

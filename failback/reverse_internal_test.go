package failback

import (
	"os"
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
	if err := moveSeed(sd); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("the image is still at %s: %v", file, err)
	}
	if fi, err := os.Stat(to); err != nil || fi.Mode().Perm() != 0o400 {
		t.Errorf("the moved image: %v %v, want read-only", fi, err)
	}
	if err := moveSeed(sd); err != nil {
		t.Errorf("a repeated move (cut off after the rename): %v", err)
	}
}

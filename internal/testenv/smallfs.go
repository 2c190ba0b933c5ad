package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// SmallFS mounts a file system of mib MiB of the kind given ("tmpfs", or
// "ext4" on a loop-mounted image) and returns its path; it is unmounted when
// the test ends. Mounting needs root (CAP_SYS_ADMIN): without it the test
// skips, and fails under CI. It is how a test makes a disk fill up for real.
func SmallFS(t *testing.T, kind string, mib int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lbfs") // short: sockets may live in it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	var cmd *exec.Cmd
	switch kind {
	case "tmpfs":
		cmd = exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%dm", mib), "lifeboat-test", dir)
	case "ext4":
		RequireTools(t, "mkfs.ext4")
		img := filepath.Join(t.TempDir(), "fs.img")
		if out, err := exec.Command("truncate", "-s", fmt.Sprintf("%dM", mib), img).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if out, err := exec.Command("mkfs.ext4", "-q", img).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4: %v: %s", err, out)
		}
		cmd = exec.Command("mount", "-o", "loop", img, dir)
	default:
		t.Fatalf("SmallFS: no file system kind %q", kind)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		msg := fmt.Sprintf("needs to mount a %d MiB %s (run as root): %s", mib, kind, strings.TrimSpace(string(out)))
		if InCI() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// FillUp writes path until its file system is full (at most limit MiB): a
// neighbour taking every free byte.
func FillUp(t *testing.T, path string, limit int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for range limit {
		if _, err := f.Write(buf); err != nil {
			if !strings.Contains(err.Error(), "no space left") {
				t.Fatalf("fill %s: %v", path, err)
			}
			return
		}
	}
	t.Fatalf("fill %s: %d MiB written and the file system is not full", path, limit)
}

package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
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

// FaultyFS is an ext4 file system on a loop-mounted image that a test can
// make fail as a disk does (Fail) and bring back (Clear).
type FaultyFS struct {
	t   *testing.T
	img string
	// Dir is where it is mounted.
	Dir string
}

// NewFaultyFS mounts an ext4 file system of mib MiB (see SmallFS: it needs
// root); it is unmounted when the test ends.
func NewFaultyFS(t *testing.T, mib int) *FaultyFS {
	t.Helper()
	dir := SmallFS(t, "ext4", mib)
	out, err := exec.Command("findmnt", "-n", "-o", "SOURCE", dir).Output()
	if err != nil {
		t.Fatalf("findmnt %s: %v", dir, err)
	}
	loop := strings.TrimSpace(string(out))
	back, err := exec.Command("losetup", "-n", "-O", "BACK-FILE", loop).Output()
	if err != nil {
		t.Fatalf("losetup %s: %v", loop, err)
	}
	return &FaultyFS{t: t, img: strings.TrimSpace(string(back)), Dir: dir}
}

// Fail shuts the file system down as ext4 does on a fatal disk error
// (EXT4_IOC_SHUTDOWN, the journal not flushed): every read or write of it
// fails with EIO from then on, until Clear.
func (f *FaultyFS) Fail() {
	f.t.Helper()
	d, err := os.Open(f.Dir)
	if err != nil {
		f.t.Fatal(err)
	}
	defer d.Close()
	const ext4IocShutdown, noLogFlush = 0x8004587d, 2
	flags := uint32(noLogFlush)
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, d.Fd(), ext4IocShutdown, uintptr(unsafe.Pointer(&flags))); e != 0 {
		f.t.Fatalf("shutting %s down: %v", f.Dir, e)
	}
}

// Clear brings the file system back as an operator does once the disk is
// fixed: unmounted (whatever still holds a file of it must have closed
// it) and mounted again, its journal replayed.
func (f *FaultyFS) Clear() {
	f.t.Helper()
	if out, err := exec.Command("umount", f.Dir).CombinedOutput(); err != nil {
		f.t.Fatalf("umount %s: %v: %s", f.Dir, err, out)
	}
	// The loop device goes once the kernel lets it (autoclear). Mounted
	// again meanwhile, mount took that device again, and with it the
	// file system as it was shut down: every open failed with EIO.
	for deadline := time.Now().Add(10 * time.Second); ; {
		out, err := exec.Command("losetup", "-n", "-O", "NAME", "-j", f.img).Output()
		loops := strings.Fields(string(out))
		if err == nil && len(loops) == 0 {
			break
		}
		if time.Now().After(deadline) {
			for _, l := range loops {
				_ = exec.Command("losetup", "-d", l).Run()
			}
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, err := exec.Command("mount", "-o", "loop", f.img, f.Dir).CombinedOutput(); err != nil {
		f.t.Fatalf("mount %s again: %v: %s", f.img, err, out)
	}
}

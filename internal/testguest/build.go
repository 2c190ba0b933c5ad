package testguest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// CacheDir is where the built guest is kept between runs:
// $LIFEBOAT_GUEST_CACHE, or lifeboat-guest-cache in the temporary directory.
func CacheDir() string {
	if d := os.Getenv("LIFEBOAT_GUEST_CACHE"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "lifeboat-guest-cache")
}

var (
	buildOnce sync.Once
	buildOut  []byte
	buildErr  error
)

// build runs test/guest/build.sh into CacheDir once per test binary (the
// script itself does nothing when its outputs are up to date) and returns the
// kernel and initramfs.
func build(t testing.TB) (kernel, initrd string) {
	t.Helper()
	requireGuestInputs(t)
	dir := CacheDir()
	buildOnce.Do(func() {
		root, err := repoRoot()
		if err != nil {
			buildErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(root, "test", "guest", "build.sh"), dir)
		buildOut, buildErr = cmd.CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("testguest: test/guest/build.sh %s: %v\n%s", dir, buildErr, buildOut)
	}
	return filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.cpio.gz")
}

// requireGuestInputs skips (fails under CI) when the host lacks what the
// guest is made of, the way testenv.RequireTools does for programs.
func requireGuestInputs(t testing.TB) {
	t.Helper()
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	missing := ""
	switch {
	case len(kernels) == 0:
		missing = "a Debian kernel (/boot/vmlinuz-*, package linux-image-amd64)"
	case !exists("/usr/sbin/qemu-ga"):
		missing = "/usr/sbin/qemu-ga (package qemu-guest-agent)"
	case !exists("/bin/busybox"):
		missing = "/bin/busybox (package busybox-static)"
	case mkfs() == "":
		missing = "mkfs.ext4 (package e2fsprogs)"
	default:
		return
	}
	msg := "testguest: the test guest needs " + missing + ": run scripts/deps.sh"
	if testenv.InCI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

// mkfs finds mkfs.ext4, which lives in sbin, often not on a user's PATH.
func mkfs() string {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if exists(p) {
			return p
		}
	}
	return ""
}

// repoRoot finds the module's root from the working directory (a test runs
// in its package's directory).
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil &&
			bytes.Contains(b, []byte("module github.com/lifeboat-dr/lifeboat\n")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("testguest: no lifeboat go.mod above %s: run tests inside the repository", dir)
		}
	}
}

// Build returns the test guest's kernel and initramfs, building them once.
func Build(t testing.TB) (kernel, initrd string) {
	t.Helper()
	return build(t)
}

// MakeDisk makes an image at path, in format qcow2 or raw, holding an empty
// ext4 file system: the test guest's data disk.
func MakeDisk(t testing.TB, path string, size int64, format string) {
	t.Helper()
	if format == "raw" {
		makeFS(t, path, size)
		return
	}
	makeDisk(t, path, size)
}

// makeDisk makes a qcow2 image at path holding an empty ext4 file system.
func makeDisk(t testing.TB, path string, size int64) {
	t.Helper()
	raw := path + ".raw"
	defer os.Remove(raw)
	makeFS(t, raw, size)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path).CombinedOutput(); err != nil {
		t.Fatalf("testguest: qemu-img convert %s: %v\n%s", path, err, out)
	}
}

// makeFS makes a raw image at raw holding an empty ext4 file system.
func makeFS(t testing.TB, raw string, size int64) {
	t.Helper()
	f, err := os.Create(raw)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		t.Fatalf("testguest: make raw disk %s: %v", raw, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Initialise inode tables and journal now: otherwise the guest kernel
	// does it lazily in the background, writing to the disk under the tests.
	run := func(prog string, args ...string) {
		if out, err := exec.CommandContext(ctx, prog, args...).CombinedOutput(); err != nil {
			t.Fatalf("testguest: %s %q: %v\n%s", prog, args, err, out)
		}
	}
	run(mkfs(), "-q", "-F", "-L", "data", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", raw)
}

// CheckWriterFile checks one file the FsyncWriter workload wrote (name is its
// base name, data its content): a header "lifeboat-w NAME LENGTH SHA256\n"
// and a body of LENGTH bytes with that sha256. In any crash-consistent image
// every such file must pass: the writer renames a file into place only after
// fsyncing it.
func CheckWriterFile(name string, data []byte) error {
	header, body, ok := bytes.Cut(data, []byte("\n"))
	if !ok {
		return fmt.Errorf("writer file %s: no header line", name)
	}
	var fileName, sum string
	var length int
	if _, err := fmt.Sscanf(string(header), "lifeboat-w %s %d %s", &fileName, &length, &sum); err != nil {
		return fmt.Errorf("writer file %s: header %.100q: %w", name, header, err)
	}
	if fileName != name {
		return fmt.Errorf("writer file %s: header names %s", name, fileName)
	}
	if len(body) != length {
		return fmt.Errorf("writer file %s: body is %d bytes, header says %d", name, len(body), length)
	}
	got := sha256.Sum256(body)
	if hex.EncodeToString(got[:]) != sum {
		return fmt.Errorf("writer file %s: body sha256 %x, header says %s", name, got, sum)
	}
	if _, err := strconv.Atoi(name); err != nil || len(name) != 6 {
		return errors.New("writer file " + name + ": name is not six digits")
	}
	return nil
}

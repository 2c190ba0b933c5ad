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
	"strings"
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

// build is Build: it skips (fails under CI) when the host lacks the guest's
// ingredients, and fails when the build does.
func build(t testing.TB) (kernel, initrd string) {
	t.Helper()
	if missing := Missing(); missing != "" {
		if testenv.InCI() {
			t.Fatal(missing)
		}
		t.Skip(missing)
	}
	kernel, initrd, err := Kernel()
	if err != nil {
		t.Fatal(err)
	}
	return kernel, initrd
}

// Kernel runs test/guest/build.sh into CacheDir once per process (the script
// itself does nothing when its outputs are up to date) and returns the
// kernel (uncompressed where QEMU can boot it straight: pvhKernel) and the
// initramfs. It is Build for callers without a testing.TB, such
// as the benchmark harness; check Missing first.
func Kernel() (kernel, initrd string, err error) {
	if missing := Missing(); missing != "" {
		return "", "", errors.New(missing)
	}
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
		return "", "", fmt.Errorf("testguest: test/guest/build.sh %s: %v\n%s", dir, buildErr, buildOut)
	}
	pvhOnce.Do(func() { pvhPath = pvhKernel(dir) })
	return pvhPath, filepath.Join(dir, "initramfs.cpio.gz"), nil
}

var (
	pvhOnce sync.Once
	pvhPath string
)

// Missing says what the host lacks to build the guest, and how to get it;
// "" when nothing.
func Missing() string {
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
		return ""
	}
	return "testguest: the test guest needs " + missing + ": run scripts/deps.sh"
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
	if err := NewDisk(path, size, format); err != nil {
		t.Fatal(err)
	}
}

// NewDisk is MakeDisk for callers without a testing.TB.
func NewDisk(path string, size int64, format string) error {
	if format == "raw" {
		return makeFS(path, size)
	}
	raw := path + ".raw"
	defer os.Remove(raw)
	if err := makeFS(raw, size); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path).CombinedOutput(); err != nil {
		return fmt.Errorf("testguest: qemu-img convert %s: %v\n%s", path, err, out)
	}
	return nil
}

// makeFS makes a raw image at raw holding an empty ext4 file system.
func makeFS(raw string, size int64) error {
	f, err := os.Create(raw)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("testguest: make raw disk %s: %v", raw, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Initialise inode tables and journal now: otherwise the guest kernel
	// does it lazily in the background, writing to the disk under the tests.
	prog, args := mkfs(), []string{"-q", "-F", "-L", "data", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", raw}
	if out, err := exec.CommandContext(ctx, prog, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("testguest: %s %q: %v\n%s", prog, args, err, out)
	}
	return nil
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

// FSCheck is what an image of the guest's ext4 data disk looks like from the host.
type FSCheck struct {
	NeedsRecovery bool // the journal must be replayed: the file system was not quiesced
	FsckClean     bool // e2fsck -fn finds nothing
	Files, Bad    int  // the FsyncWriter's files, and those not whole
	Newest        int  // the number of the newest file
}

// CheckFS checks a raw image of the data disk: its journal state, e2fsck,
// and every file the FsyncWriter workload renamed into place.
func CheckFS(t testing.TB, img string) FSCheck {
	t.Helper()
	var c FSCheck
	out, err := exec.Command("dumpe2fs", "-h", img).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs %s: %v\n%s", img, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Filesystem features:") && strings.Contains(l, "needs_recovery") {
			c.NeedsRecovery = true
		}
	}
	c.FsckClean = exec.Command("e2fsck", "-fn", img).Run() == nil
	files, err := os.MkdirTemp("", "lbfs")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(files)
	if out, err := exec.Command("debugfs", "-R", "rdump /w "+files, img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs %s: %v\n%s", img, err, out)
	}
	entries, _ := os.ReadDir(filepath.Join(files, "w"))
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") {
			continue // written before its fsync and rename: may be partial by design
		}
		c.Files++
		if n, err := strconv.Atoi(e.Name()); err == nil {
			c.Newest = max(c.Newest, n)
		}
		b, _ := os.ReadFile(filepath.Join(files, "w", e.Name()))
		if err := CheckWriterFile(e.Name(), b); err != nil {
			c.Bad++
		}
	}
	return c
}

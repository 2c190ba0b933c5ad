// Package testlibvirt runs lifeboat's test guest as a libvirt domain under
// the system libvirtd (QEMU as libvirt-qemu, TCG), starting libvirtd and
// virtlogd first when they do not run: CI machines run no systemd.
package testlibvirt

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
)

// URI is the libvirt the tests use.
const URI = "qemu:///system"

var (
	startOnce sync.Once
	startErr  error
)

// Require makes sure libvirtd answers on URI, starting it (and virtlogd) when
// it does not. It skips when libvirt is not installed or the tests do not run
// as root, and fails instead under CI.
func Require(t testing.TB) {
	t.Helper()
	testenv.RequireTools(t, "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img")
	if os.Geteuid() != 0 {
		if testenv.InCI() {
			t.Fatal("testlibvirt: the libvirt tests need root (the system libvirtd runs QEMU as libvirt-qemu)")
		}
		t.Skip("testlibvirt: the libvirt tests need root")
	}
	startOnce.Do(func() { startErr = start() })
	if startErr != nil {
		t.Fatalf("testlibvirt: %v", startErr)
	}
}

func answers() bool {
	return exec.Command("virsh", "-c", URI, "version").Run() == nil
}

func start() error {
	if answers() {
		return nil
	}
	if _, err := os.Stat("/run/libvirt/virtlogd-sock"); err != nil {
		if out, err := exec.Command("virtlogd", "-d").CombinedOutput(); err != nil {
			return fmt.Errorf("start virtlogd: %v: %s", err, out)
		}
	}
	if out, err := exec.Command("libvirtd", "-d").CombinedOutput(); err != nil {
		return fmt.Errorf("start libvirtd: %v: %s", err, out)
	}
	for range 100 {
		if answers() {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("libvirtd started but does not answer on %s", URI)
}

// Virsh runs virsh against URI and returns its output.
func Virsh(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", URI}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// DiskSpec is one disk of a domain. The first disk (vda) holds the test
// guest's ext4 file system; others are blank.
type DiskSpec struct {
	Target string // vda, vdb
	Format string // qcow2 (default) or raw
	Size   int64
}

// Options describe a domain.
type Options struct {
	Name     string // made unique per test when empty
	Workload string // testguest.None, FsyncWriter or Counter
	Disks    []DiskSpec
}

// Domain is a defined (persistent) test domain.
type Domain struct {
	t     testing.TB
	Name  string
	Dir   string // its files: images, kernel, console log; reachable by QEMU
	Disks []DiskSpec
	opts  Options
}

var seq struct {
	sync.Mutex
	n int
}

// Boot defines and starts a domain running the test guest and waits until
// the guest is ready. Cleanup destroys and undefines it (with its
// checkpoint metadata) and removes its files.
func Boot(t testing.TB, opts Options) *Domain {
	t.Helper()
	Require(t)
	kernel, initrd := testguest.Build(t)
	if opts.Workload == "" {
		opts.Workload = testguest.None
	}
	if len(opts.Disks) == 0 {
		opts.Disks = []DiskSpec{{Target: "vda", Size: testguest.DefaultDiskSize}}
	}
	if opts.Name == "" {
		seq.Lock()
		seq.n++
		opts.Name = fmt.Sprintf("lbt-%d-%d", os.Getpid(), seq.n)
		seq.Unlock()
	}
	// t.TempDir's directories are 0700 root: QEMU (libvirt-qemu) could not
	// reach its images there.
	dir, err := os.MkdirTemp("", "lbv-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	d := &Domain{t: t, Name: opts.Name, Dir: dir, Disks: opts.Disks, opts: opts}
	t.Cleanup(d.cleanup)
	// Own copies: libvirt relabels a domain's kernel and initrd, and the
	// cache is shared by every test.
	for _, f := range [][2]string{{kernel, "vmlinuz"}, {initrd, "initrd"}} {
		if err := copyFile(f[0], filepath.Join(dir, f[1])); err != nil {
			t.Fatal(err)
		}
	}
	for i, ds := range opts.Disks {
		if ds.Format == "" {
			opts.Disks[i].Format = "qcow2"
		}
		path := d.Image(ds.Target)
		if i == 0 {
			testguest.MakeDisk(t, path, ds.Size, opts.Disks[i].Format)
			continue
		}
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", opts.Disks[i].Format, path, strconv.FormatInt(ds.Size, 10)).CombinedOutput(); err != nil {
			t.Fatalf("testlibvirt: qemu-img create %s: %v: %s", path, err, out)
		}
	}
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(d.xml()), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Virsh("define", xmlPath); err != nil {
		t.Fatalf("testlibvirt: %v", err)
	}
	d.Start()
	return d
}

// Image is the path of a disk's image file (its base: an external snapshot
// puts a new active layer on top).
func (d *Domain) Image(target string) string {
	for _, ds := range d.Disks {
		if ds.Target == target {
			return filepath.Join(d.Dir, target+"."+ds.Format)
		}
	}
	return filepath.Join(d.Dir, target+".img")
}

// Console is the guest's serial output so far.
func (d *Domain) Console() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "console.log"))
	return string(b)
}

func (d *Domain) xml() string {
	var disks strings.Builder
	for _, ds := range d.Disks {
		fmt.Fprintf(&disks, `    <disk type='file' device='disk'><driver name='qemu' type='%s'/><source file='%s'/><target dev='%s' bus='virtio'/></disk>
`, ds.Format, d.Image(ds.Target), ds.Target)
	}
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>%s/vmlinuz</kernel><initrd>%s/initrd</initrd>
    <cmdline>console=ttyS0 panic=-1 lb.workload=%s</cmdline></os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
%s    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='%s/console.log' append='on'/></serial>
    <console type='file'><source path='%s/console.log' append='on'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
`, d.Name, d.Dir, d.Dir, d.opts.Workload, disks.String(), d.Dir, d.Dir)
}

// Start starts the (defined) domain and waits until the guest is ready.
func (d *Domain) Start() {
	d.t.Helper()
	before := len(d.Console())
	if _, err := Virsh("start", d.Name); err != nil {
		d.t.Fatalf("testlibvirt: %v", err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		c := d.Console()
		if len(c) > before && strings.Contains(c[before:], "lifeboat-guest: ready") {
			if strings.Contains(c[before:], "error:") {
				d.t.Fatalf("testlibvirt: %s: the guest reports an error:\n%s", d.Name, c[before:])
			}
			// The agent answers through libvirt once it is ready (asked
			// through libvirt's own API: the agent pass-through taints).
			for time.Now().Before(deadline) {
				if _, err := Virsh("domfsinfo", d.Name); err == nil {
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	d.t.Fatalf("testlibvirt: %s: the guest was not ready in 3 minutes; console:\n%s", d.Name, d.Console())
}

// Shutdown shuts the guest down through its agent (`virsh shutdown --mode
// agent`: the test guest handles no ACPI button) and waits until the domain
// is off.
func (d *Domain) Shutdown() {
	d.t.Helper()
	if _, err := Virsh("shutdown", d.Name, "--mode", "agent"); err != nil {
		d.t.Fatalf("testlibvirt: %v", err)
	}
	if !d.waitOff(2 * time.Minute) {
		d.t.Fatalf("testlibvirt: %s did not power off 2 minutes after `virsh shutdown`", d.Name)
	}
}

// Destroy stops the domain at once (as pulling the plug).
func (d *Domain) Destroy() {
	d.t.Helper()
	if _, err := Virsh("destroy", d.Name); err != nil {
		d.t.Fatalf("testlibvirt: %v", err)
	}
}

// QEMUPid is the pid of the domain's QEMU.
func (d *Domain) QEMUPid() int {
	d.t.Helper()
	b, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", d.Name+".pid"))
	if err != nil {
		d.t.Fatalf("testlibvirt: pid of %s: %v", d.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		d.t.Fatalf("testlibvirt: pid of %s: %v", d.Name, err)
	}
	return pid
}

func (d *Domain) waitOff(limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		out, err := Virsh("domstate", d.Name)
		if err == nil && strings.Contains(out, "shut off") {
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	return false
}

// WaitOff waits until the domain is off.
func (d *Domain) WaitOff(limit time.Duration) {
	d.t.Helper()
	if !d.waitOff(limit) {
		d.t.Fatalf("testlibvirt: %s still runs after %v", d.Name, limit)
	}
}

func (d *Domain) cleanup() {
	Virsh("destroy", d.Name)
	if _, err := Virsh("undefine", d.Name, "--checkpoints-metadata", "--snapshots-metadata", "--nvram"); err != nil {
		d.t.Logf("testlibvirt: %v", err)
	}
	if d.t.Failed() {
		d.t.Logf("testlibvirt: %s console:\n%s", d.Name, tail(d.Console(), 30))
	}
	os.RemoveAll(d.Dir)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

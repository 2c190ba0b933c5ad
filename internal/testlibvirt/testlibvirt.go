// Package testlibvirt runs lifeboat's test guest as a libvirt domain under
// the system libvirtd (QEMU as libvirt-qemu, TCG), starting libvirtd and
// virtlogd first when they do not run: CI machines run no systemd.
package testlibvirt

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
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
	if m := missingHost(); m != "" {
		if testenv.InCI() {
			t.Fatal(m)
		}
		t.Skip(m)
	}
	if err := Start(); err != nil {
		t.Fatal(err)
	}
}

// Missing says what this host lacks to run a test domain, and how to get it
// ("" when nothing): a program, root, or the test guest's ingredients.
func Missing() string {
	if m := missingHost(); m != "" {
		return m
	}
	return testguest.Missing()
}

func missingHost() string {
	for _, tool := range []string{"libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "testlibvirt: needs " + tool + " on PATH: run `make deps`"
		}
	}
	if os.Geteuid() != 0 {
		return "testlibvirt: needs root (the system libvirtd runs QEMU as libvirt-qemu)"
	}
	return ""
}

// Start makes sure libvirtd answers on URI, starting it (and virtlogd) once
// per process when it does not. It is Require for callers without a
// testing.TB; check Missing first.
func Start() error {
	startOnce.Do(func() {
		if startErr = start(); startErr == nil {
			sweepOrphans()
		}
	})
	if startErr != nil {
		return fmt.Errorf("testlibvirt: %w", startErr)
	}
	return nil
}

func answers() bool {
	return exec.Command("virsh", "-c", URI, "version").Run() == nil
}

// virtlogdSocket is where libvirtd's QEMU driver reaches virtlogd: without
// it answering, every domain start fails ("Failed to connect socket to
// '/run/libvirt/virtlogd-sock'").
const virtlogdSocket = "/run/libvirt/virtlogd-sock"

// listening reports whether something accepts connections on the unix
// socket at path. A socket file alone says nothing: a daemon killed with
// the machine's previous session leaves its file behind (CI saw exactly
// that: the file was there, the connection was refused).
func listening(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func start() error {
	// virtlogd first and on its own: libvirtd may answer while virtlogd
	// does not (each is its own daemon, and either may have been killed).
	if !listening(virtlogdSocket) {
		if out, err := exec.Command("virtlogd", "-d").CombinedOutput(); err != nil {
			return fmt.Errorf("start virtlogd: %v: %s", err, out)
		}
		if err := waitFor(func() bool { return listening(virtlogdSocket) }); err != nil {
			return fmt.Errorf("virtlogd started but does not answer on %s", virtlogdSocket)
		}
	}
	if answers() {
		return nil
	}
	if out, err := exec.Command("libvirtd", "-d").CombinedOutput(); err != nil {
		return fmt.Errorf("start libvirtd: %v: %s", err, out)
	}
	if err := waitFor(answers); err != nil {
		return fmt.Errorf("libvirtd started but does not answer on %s", URI)
	}
	return nil
}

// waitFor polls ok for up to ten seconds.
func waitFor(ok func() bool) error {
	for range 100 {
		if ok() {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("timed out")
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
// guest's ext4 file system; others are blank, or From.
type DiskSpec struct {
	Target string // vda, vdb
	Format string // qcow2 (default) or raw
	Size   int64
	// From is an image (of Format) to move into the domain's directory as
	// this disk instead of a blank one: a disk made with data, say.
	From string
}

// Options describe a domain.
type Options struct {
	Name     string // made unique per test when empty
	Workload string // testguest.None, FsyncWriter or Counter
	Disks    []DiskSpec
	// Parent is the directory the domain's own is made in (default: the
	// temporary directory). QEMU, as libvirt-qemu, must be able to pass it.
	Parent string
}

// Domain is a defined (persistent) test domain.
type Domain struct {
	t     testing.TB // nil for a domain made by New
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
	testguest.Build(t) // skips (fails under CI) without the guest's ingredients
	d, err := create(opts)
	if d != nil {
		d.t = t
		t.Cleanup(d.cleanup)
	}
	if err == nil {
		err = d.Run(context.Background())
	}
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// New is Boot for callers without a testing.TB, such as the benchmark
// harness: it starts libvirtd if needed (check Missing first), defines and
// starts the domain and waits until the guest is ready. The caller removes
// it (Remove); on an error New removes what it made.
func New(ctx context.Context, opts Options) (*Domain, error) {
	if err := Start(); err != nil {
		return nil, err
	}
	d, err := create(opts)
	if err == nil {
		err = d.Run(ctx)
	}
	if err != nil {
		if d != nil {
			d.Remove()
		}
		return nil, err
	}
	return d, nil
}

// create makes the domain's files and defines it. A non-nil Domain is
// returned whenever there is something to remove.
func create(opts Options) (*Domain, error) {
	kernel, initrd, err := testguest.Kernel()
	if err != nil {
		return nil, err
	}
	if opts.Workload == "" {
		opts.Workload = testguest.None
	}
	if len(opts.Disks) == 0 {
		opts.Disks = []DiskSpec{{Target: "vda", Size: testguest.DefaultDiskSize}}
	}
	opts.Disks = append([]DiskSpec(nil), opts.Disks...)
	if opts.Name == "" {
		seq.Lock()
		seq.n++
		opts.Name = fmt.Sprintf("lbt-%d-%d", os.Getpid(), seq.n)
		seq.Unlock()
	}
	// t.TempDir's directories are 0700 root: QEMU (libvirt-qemu) could not
	// reach its images there.
	dir, err := os.MkdirTemp(opts.Parent, "lbv-")
	if err != nil {
		return nil, fmt.Errorf("testlibvirt: %w", err)
	}
	d := &Domain{Name: opts.Name, Dir: dir, Disks: opts.Disks, opts: opts}
	if err := os.Chmod(dir, 0o755); err != nil {
		return d, fmt.Errorf("testlibvirt: %w", err)
	}
	// Own copies: libvirt relabels a domain's kernel and initrd, and the
	// cache is shared by every test.
	for _, f := range [][2]string{{kernel, "vmlinuz"}, {initrd, "initrd"}} {
		if err := copyFile(f[0], filepath.Join(dir, f[1])); err != nil {
			return d, fmt.Errorf("testlibvirt: %w", err)
		}
	}
	for i, ds := range d.Disks {
		if ds.Format == "" {
			d.Disks[i].Format = "qcow2"
		}
		path := d.Image(ds.Target)
		switch {
		case ds.From != "":
			if err := os.Rename(ds.From, path); err != nil {
				return d, fmt.Errorf("testlibvirt: disk %s: %w", ds.Target, err)
			}
		case i == 0:
			if err := testguest.NewDisk(path, ds.Size, d.Disks[i].Format); err != nil {
				return d, err
			}
		default:
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", d.Disks[i].Format, path, strconv.FormatInt(ds.Size, 10)).CombinedOutput(); err != nil {
				return d, fmt.Errorf("testlibvirt: qemu-img create %s: %v: %s", path, err, out)
			}
		}
	}
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(d.xml()), 0o644); err != nil {
		return d, fmt.Errorf("testlibvirt: %w", err)
	}
	if _, err := Virsh("define", xmlPath); err != nil {
		return d, fmt.Errorf("testlibvirt: %w", err)
	}
	return d, nil
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

// must fails the test of a domain made by Boot on err. The methods that call
// it are for tests; a domain made by New has their error-returning cores.
func (d *Domain) must(err error) {
	if err == nil {
		return
	}
	if d.t == nil {
		panic(fmt.Sprintf("testlibvirt: %v (a test helper called on a domain made by New: use the method returning errors)", err))
	}
	d.t.Helper()
	d.t.Fatal(err)
}

func (d *Domain) helper() {
	if d.t != nil {
		d.t.Helper()
	}
}

// Start starts the (defined) domain and waits until the guest is ready.
func (d *Domain) Start() {
	d.helper()
	d.must(d.Run(context.Background()))
}

// Run is Start, returning its error.
func (d *Domain) Run(ctx context.Context) error {
	before := len(d.Console())
	if _, err := Virsh("start", d.Name); err != nil {
		return fmt.Errorf("testlibvirt: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for ctx.Err() == nil {
		c := d.Console()
		if len(c) > before && strings.Contains(c[before:], "lifeboat-guest: ready") {
			if strings.Contains(c[before:], "error:") {
				return fmt.Errorf("testlibvirt: %s: the guest reports an error:\n%s", d.Name, c[before:])
			}
			// The agent answers through libvirt once it is ready (asked
			// through libvirt's own API: the agent pass-through taints).
			for ctx.Err() == nil {
				if _, err := Virsh("domfsinfo", d.Name); err == nil {
					return nil
				}
				sleep(ctx, 200*time.Millisecond)
			}
		}
		sleep(ctx, 200*time.Millisecond)
	}
	return fmt.Errorf("testlibvirt: %s: the guest was not ready in 3 minutes (%v); console:\n%s", d.Name, context.Cause(ctx), tail(d.Console(), 30))
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// Shutdown shuts the guest down through its agent (`virsh shutdown --mode
// agent`: the test guest handles no ACPI button) and waits until the domain
// is off.
func (d *Domain) Shutdown() {
	d.helper()
	if _, err := Virsh("shutdown", d.Name, "--mode", "agent"); err != nil {
		d.must(fmt.Errorf("testlibvirt: %w", err))
	}
	d.must(d.waitOff(2*time.Minute, "after `virsh shutdown`"))
}

// Destroy stops the domain at once (as pulling the plug).
func (d *Domain) Destroy() {
	d.helper()
	d.must(d.Kill())
}

// Kill is Destroy, returning its error.
func (d *Domain) Kill() error {
	if _, err := Virsh("destroy", d.Name); err != nil {
		return fmt.Errorf("testlibvirt: %w", err)
	}
	return nil
}

// QEMUPid is the pid of the domain's QEMU.
func (d *Domain) QEMUPid() int {
	d.helper()
	pid, err := d.PID()
	d.must(err)
	return pid
}

// PID is QEMUPid, returning its error.
func (d *Domain) PID() (int, error) {
	b, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", d.Name+".pid"))
	if err != nil {
		return 0, fmt.Errorf("testlibvirt: pid of %s: %w", d.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("testlibvirt: pid of %s: %w", d.Name, err)
	}
	return pid, nil
}

func (d *Domain) waitOff(limit time.Duration, what string) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		out, err := Virsh("domstate", d.Name)
		if err == nil && strings.Contains(out, "shut off") {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("testlibvirt: %s still runs %v %s", d.Name, limit, what)
}

// WaitOff waits until the domain is off.
func (d *Domain) WaitOff(limit time.Duration) {
	d.helper()
	d.must(d.waitOff(limit, "later"))
}

func (d *Domain) cleanup() {
	if d.t.Failed() {
		d.t.Logf("testlibvirt: %s console:\n%s", d.Name, tail(d.Console(), 30))
	}
	if err := d.Remove(); err != nil {
		d.t.Logf("%v", err)
	}
}

// Remove destroys the domain, undefines it (with its checkpoint and
// snapshot metadata) and deletes its files.
func (d *Domain) Remove() error {
	Virsh("destroy", d.Name) // fails when it is off: nothing to do
	_, err := Virsh("undefine", d.Name, "--checkpoints-metadata", "--snapshots-metadata", "--nvram")
	if err != nil && strings.Contains(err.Error(), "failed to get domain") {
		err = nil // the test removed it
	}
	if err != nil {
		err = fmt.Errorf("testlibvirt: %w", err)
	}
	return errors.Join(err, os.RemoveAll(d.Dir))
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

// WaitWriterFiles waits (at most limit) until the guest's FsyncWriter has
// written a file: a point taken earlier holds none to check.
func (d *Domain) WaitWriterFiles(limit time.Duration) {
	d.helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	for {
		out, _, err := GuestExec(ctx, d.Name, "/bin/sh", "-c", "ls /data/w 2>/dev/null | head -1")
		if err == nil && strings.TrimSpace(out) != "" {
			return
		}
		select {
		case <-ctx.Done():
			d.must(fmt.Errorf("testlibvirt: %s: the guest's writer wrote no file in %v (last: %q, %v)", d.Name, limit, out, err))
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// GuestExec runs a program in the guest through its agent and waits for it
// (bounded by ctx): its output and exit code. It uses libvirt's agent
// pass-through, which libvirt logs as a taint of the domain: tests and the
// bench only.
func GuestExec(ctx context.Context, domain, path string, args ...string) (string, int, error) {
	cmd, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{"path": path, "arg": args, "capture-output": true}})
	out, err := Virsh("qemu-agent-command", domain, string(cmd))
	if err != nil {
		return "", 0, fmt.Errorf("guest-exec in %s: %w", domain, err)
	}
	var started struct {
		Return struct {
			Pid int `json:"pid"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &started); err != nil {
		return "", 0, fmt.Errorf("guest-exec in %s: %q: %w", domain, out, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	status := fmt.Sprintf(`{"execute":"guest-exec-status","arguments":{"pid":%d}}`, started.Return.Pid)
	for {
		out, err := Virsh("qemu-agent-command", domain, status)
		if err != nil {
			return "", 0, fmt.Errorf("guest-exec-status in %s: %w", domain, err)
		}
		var st struct {
			Return struct {
				Exited   bool   `json:"exited"`
				ExitCode int    `json:"exitcode"`
				Out      string `json:"out-data"`
				Err      string `json:"err-data"`
			} `json:"return"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return "", 0, fmt.Errorf("guest-exec-status in %s: %q: %w", domain, out, err)
		}
		if st.Return.Exited {
			o, _ := base64.StdEncoding.DecodeString(st.Return.Out)
			e, _ := base64.StdEncoding.DecodeString(st.Return.Err)
			return string(o) + string(e), st.Return.ExitCode, nil
		}
		select {
		case <-ctx.Done():
			return "", 0, fmt.Errorf("guest program %s in %s: %w", path, domain, context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// orphanName matches the domains create names (lbt-PID-N).
var orphanName = regexp.MustCompile(`^lbt-([0-9]+)-[0-9]+$`)

// sweepOrphans destroys and undefines the test domains of test processes
// that are gone: a test binary killed (a timeout, kill -9) cannot run its
// cleanup, and libvirtd keeps its running guest burning a CPU under every
// later test and benchmark (one ran 77 minutes here). A domain whose
// process still exists, or whose pid was reused, is left alone.
func sweepOrphans() {
	out, err := Virsh("list", "--all", "--name")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		m := orphanName.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue
		}
		Virsh("destroy", name) // fails when it is off: nothing to do
		Virsh("undefine", name, "--checkpoints-metadata", "--snapshots-metadata", "--nvram")
	}
}

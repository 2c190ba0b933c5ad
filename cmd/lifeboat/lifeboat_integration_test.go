package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lbbin")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "lifeboat")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build lifeboat: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// run runs the lifeboat binary and returns its stdout, failing the test on a non-zero exit.
func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runErr(t, args...)
	if err != nil {
		t.Fatalf("lifeboat %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// site is a `lifeboat serve` process.
type site struct {
	name, config, log string
	cmd               *exec.Cmd
	// orphans are the QEMU daemons of this site's killed processes: a
	// restarted site sweeps them itself (what some tests are about), and the
	// test's cleanup kills what is left, or every killed site of a long run
	// would keep its daemons, and with them its Linux AIO contexts, until
	// the machine's fs.aio-max-nr refuses new ones.
	orphans []int
}

func startSite(t *testing.T, name, config string) *site {
	t.Helper()
	s := &site{name: name, config: config, log: config + ".log"}
	s.start(t)
	t.Cleanup(func() {
		s.kill()
		killOrphans(s.orphans)
	})
	return s
}

func (s *site) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(binary, "serve", "-c", s.config)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := runErr(t, "status", "-c", s.config); err == nil {
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(s.log)
			t.Fatalf("site %s did not start:\n%s", s.name, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill is kill -9: no cleanup of any kind runs in the site. The QEMU daemons
// it started live on (a restarted site must deal with them); they are noted
// for the test's cleanup.
func (s *site) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.orphans = append(s.orphans, childDaemons(s.cmd.Process.Pid)...)
		s.cmd.Process.Signal(syscall.SIGKILL)
		s.cmd.Wait()
		s.cmd = nil
	}
}

// childDaemons lists the qemu-storage-daemon processes whose parent is pid.
func childDaemons(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
		i := bytes.LastIndexByte(stat, ')')
		f := strings.Fields(string(stat[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) && isDaemon(child) {
			out = append(out, child)
		}
	}
	return out
}

func isDaemon(pid int) bool {
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	arg0, _, _ := bytes.Cut(cmd, []byte{0})
	return err == nil && filepath.Base(string(arg0)) == "qemu-storage-daemon"
}

// killOrphans kills those of pids that are still QEMU daemons.
func killOrphans(pids []int) {
	for _, pid := range pids {
		if isDaemon(pid) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// makePKI makes, with lifeboat cert, a CA and the certificates of sites dr
// and prod (on 127.0.0.1) in dir/pki, as the configs of the tests name them.
func makePKI(t *testing.T, dir string) {
	t.Helper()
	pkiDir := filepath.Join(dir, "pki")
	run(t, "cert", "ca", "--dir", pkiDir)
	run(t, "cert", "site", "dr", "--ca", pkiDir, "--out", pkiDir, "--host", "127.0.0.1")
	run(t, "cert", "site", "prod", "--ca", pkiDir, "--out", pkiDir, "--host", "127.0.0.1")
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "lbc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

type deployment struct {
	dir      string
	vm       *testvm.VM
	guest    *workload.Guest
	disks    []workload.Disk
	dr, prod *site
}

func deploy(t *testing.T, vdaSize int64) *deployment {
	t.Helper()
	return deployDisks(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: vdaSize},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 16 << 20})
}

// deployDisks is deploy with a VM of the disks given.
func deployDisks(t *testing.T, specs ...testvm.DiskSpec) *deployment {
	t.Helper()
	return deployWith(t, deployExtra{}, specs...)
}

// deployExtra adds to the configs deployWith writes: dr's and prod's
// lines (after their own), and fields of vm1's entry in prod's `vms:` (a
// flow mapping's "key: value, ...").
type deployExtra struct {
	dr, prod, vm1 string
}

// deployWith is deployDisks with more in the sites' configs.
func deployWith(t *testing.T, extra deployExtra, specs ...testvm.DiskSpec) *deployment {
	t.Helper()
	d := &deployment{dir: shortDir(t)}
	for _, s := range specs {
		d.disks = append(d.disks, workload.Disk{Name: s.Name, Size: s.Size})
	}
	d.vm = testvm.Start(t, specs...)
	g, err := workload.Open(context.Background(), d.vm.NBDSocket(), testenv.Seed(t), d.disks...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	d.guest = g
	makePKI(t, d.dir)
	addr := freeAddr(t)
	drCfg := filepath.Join(d.dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf(`site: dr
state_dir: %s/dr
listen: %s
keep: 10
tls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}
%s`, d.dir, addr, extra.dr)), 0o600)
	prodCfg := filepath.Join(d.dir, "prod.yaml")
	vm1Extra := ""
	if extra.vm1 != "" {
		vm1Extra = ", " + extra.vm1
	}
	os.WriteFile(prodCfg, []byte(fmt.Sprintf(`site: prod
state_dir: %s/prod
tls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}
peers:
  - {name: dr, address: "%s", compression: zstd}
vms:
  - {name: vm1, qmp: %s, nbd_socket: %s%s}
%s`, d.dir, addr, d.vm.QMPSocket(), d.vm.NBDSocket(), vm1Extra, extra.prod)), 0o600)
	d.dr = startSite(t, "dr", drCfg)
	d.prod = startSite(t, "prod", prodCfg)
	return d
}

// startSystemVM starts a qemu-system VM with no guest and one disk, vda
// (16 MiB of qcow2): the VM's own monitor, as a planned migration needs.
func startSystemVM(t *testing.T) *testvm.System {
	t.Helper()
	dir := shortDir(t)
	image := filepath.Join(dir, "vda.qcow2")
	if err := qemu.CreateImage(context.Background(), image, "qcow2", 16<<20, "", ""); err != nil {
		t.Fatal(err)
	}
	return testvm.StartSystem(t, dir,
		"-blockdev", fmt.Sprintf(`{"driver":"qcow2","node-name":"vda-node","file":{"driver":"file","filename":%q}}`, image),
		"-device", "virtio-blk-pci,drive=vda-node,id=vda")
}

// restartWith restarts the site (kill -9) with its config's `vms:` and
// what follows it replaced by vms.
func (s *site) restartWith(t *testing.T, vms string) {
	t.Helper()
	cfg, err := os.ReadFile(s.config)
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(cfg), "vms:")
	if i < 0 {
		t.Fatalf("%s has no vms:", s.config)
	}
	s.kill()
	if err := os.WriteFile(s.config, append(cfg[:i:i], vms...), 0o600); err != nil {
		t.Fatal(err)
	}
	s.start(t)
}

func (d *deployment) points(t *testing.T, config string) []lifeboat.Point {
	t.Helper()
	var pts []lifeboat.Point
	if err := json.Unmarshal([]byte(run(t, "points", "vm1", "--json", "-c", config)), &pts); err != nil {
		t.Fatal(err)
	}
	return pts
}

// checkLatest exports the latest point of every disk and compares it with the source.
func (d *deployment) checkLatest(t *testing.T, want map[string]string) {
	t.Helper()
	for _, disk := range d.disks {
		out := filepath.Join(d.dir, "export-"+disk.Name+".raw")
		run(t, "export", "vm1", "--point", "latest", "--disk", disk.Name, "-o", out, "-c", d.dr.config)
		got := exportSHA256(t, out)
		os.Remove(out)
		if got != want[disk.Name] {
			t.Fatalf("disk %s: exported latest point differs from the source at its instant", disk.Name)
		}
	}
}

func (d *deployment) hashes(t *testing.T) map[string]string {
	t.Helper()
	h, err := d.guest.Hashes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// The commands as a user runs them, against two `lifeboat serve` processes.
func TestCommandsEndToEnd(t *testing.T) {
	d := deploy(t, 32<<20)
	if err := d.guest.Fill(context.Background(), 0.5); err != nil {
		t.Fatal(err)
	}
	want := d.hashes(t)
	out := run(t, "sync", "vm1", "-c", d.prod.config)
	if !strings.Contains(out, "point 1 committed") {
		t.Fatalf("sync output: %s", out)
	}
	d.checkLatest(t, want)
	if _, err := d.guest.Mixed(context.Background(), 10); err != nil {
		t.Fatal(err)
	}
	want = d.hashes(t)
	var pt lifeboat.Point
	if err := json.Unmarshal([]byte(run(t, "sync", "vm1", "--json", "-c", d.prod.config)), &pt); err != nil {
		t.Fatal(err)
	}
	if pt.ID != 2 || pt.Consistency != lifeboat.Crash || pt.Stats.BytesChanged == 0 {
		t.Fatalf("second sync: %+v", pt)
	}
	d.checkLatest(t, want)

	// points at the recovery site, and forwarded from the protected site.
	for _, cfg := range []string{d.dr.config, d.prod.config} {
		if pts := d.points(t, cfg); len(pts) != 2 || pts[1].ID != 2 {
			t.Fatalf("points via %s: %+v", cfg, pts)
		}
	}
	table := run(t, "points", "vm1", "-c", d.dr.config)
	if !strings.Contains(table, "CONSISTENCY") || !strings.Contains(table, "crash") {
		t.Fatalf("points table:\n%s", table)
	}
	if out := run(t, "verify", "vm1", "--point", "1", "-c", d.dr.config); !strings.Contains(out, "OK") {
		t.Fatalf("verify: %s", out)
	}
	var st daemon.StatusReply
	if err := json.Unmarshal([]byte(run(t, "status", "--json", "-c", d.prod.config)), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.VMs) != 1 || st.VMs[0].State != "protected" || st.VMs[0].LastPoint == nil || st.VMs[0].LastPoint.ID != 2 || st.VMs[0].RPO <= 0 {
		t.Fatalf("status: %+v", st)
	}
	if out := run(t, "status", "-c", d.dr.config); !strings.Contains(out, "replica") {
		t.Fatalf("status at dr:\n%s", out)
	}
	// qcow2 and vmdk exports are images of those formats.
	for _, f := range []string{"qcow2", "vmdk"} {
		out := filepath.Join(d.dir, "x."+f)
		run(t, "export", "vm1", "--disk", "vda", "-o", out, "--format", f, "-c", d.dr.config)
		info, err := exec.Command("qemu-img", "info", "--output=json", out).Output()
		if err != nil || !strings.Contains(string(info), `"format": "`+f+`"`) {
			t.Fatalf("export as %s: %v %s", f, err, info)
		}
	}

	// Prometheus metrics on the local API socket.
	metrics := scrape(t, filepath.Join(d.dir, "prod", "api.sock"))
	for _, want := range []string{`lifeboat_rpo_seconds{role="protected",vm="vm1"}`, `lifeboat_cycles_total{result="ok",vm="vm1"} 2`, `lifeboat_bytes_total{kind="sent",vm="vm1"}`} {
		if !strings.Contains(metrics, want) {
			t.Fatalf("metrics lack %s:\n%s", want, metrics)
		}
	}

	// Ownership: the recovery site says who owns vm1; after a handover to
	// another site, prod is refused and told why; handed back, prod goes on
	// incrementally under a new epoch.
	var drst daemon.StatusReply
	if err := json.Unmarshal([]byte(run(t, "status", "--json", "-c", d.dr.config)), &drst); err != nil {
		t.Fatal(err)
	}
	if len(drst.VMs) != 1 || drst.VMs[0].Owner != "prod" || drst.VMs[0].Epoch != 1 {
		t.Fatalf("status at dr: %+v, want vm1 owned by prod at epoch 1", drst.VMs)
	}
	if out := run(t, "handover", "vm1", "--to", "branch", "-c", d.dr.config); !strings.Contains(out, "branch (epoch 2)") {
		t.Fatalf("handover: %s", out)
	}
	if out, err := runErr(t, "sync", "vm1", "-c", d.prod.config); err == nil || !strings.Contains(out, `belongs to site \"branch\"`) && !strings.Contains(out, `belongs to site "branch"`) {
		t.Fatalf("sync after handing vm1 to branch: err %v, output %q", err, out)
	}
	run(t, "handover", "vm1", "--to", "prod", "-c", d.dr.config)
	if err := json.Unmarshal([]byte(run(t, "sync", "vm1", "--json", "-c", d.prod.config)), &pt); err != nil {
		t.Fatal(err)
	}
	for _, disk := range pt.Disks {
		if disk.Name == "vda" && disk.Resync {
			t.Fatalf("vm1's qcow2 disk was resynced after handing it back: %+v", pt)
		}
	}

	// A corrupted byte in the recovery site's copy: verify names disk and offset.
	corruptBase(t, filepath.Join(d.dir, "dr"), "vda")
	out, err := runErr(t, "verify", "vm1", "--point", "1", "-c", d.dr.config)
	if err == nil || !strings.Contains(out, `"vda"`) || !strings.Contains(out, "offset") {
		t.Fatalf("verify of a corrupted point: err %v, output %q", err, out)
	}
	t.Logf("verify after corruption: %s", strings.TrimSpace(out))
	// What it found stays said: points marks point 1 damaged.
	if out := run(t, "points", "vm1", "-c", d.dr.config); !strings.Contains(out, "DAMAGED") || !strings.Contains(out, "disk vda at offset") || !strings.Contains(out, "(verify of point 1)") {
		t.Errorf("points after verify found point 1 damaged:\n%s", out)
	}

	// Usage and lookup errors say what to do.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"sync", "-c", d.prod.config}, "lifeboat sync web1"},
		{[]string{"sync", "nosuchvm", "-c", d.prod.config}, "not protected"},
		{[]string{"export", "vm1", "-c", d.dr.config}, "-o"},
		{[]string{"export", "vm1", "--point", "99", "--disk", "vda", "-o", "/tmp/x", "-c", d.dr.config}, "99"},
		// Two disks and no --disk: the disks, and the command to type.
		{[]string{"export", "vm1", "-o", "/tmp/x.raw", "-c", d.dr.config}, "has 2 disks (vda, vdb): say which one to export with --disk, e.g. `lifeboat export vm1 --point latest --disk vda -o /tmp/x.raw`"},
		{[]string{"export", "vm1", "--point", "1", "-o", "/tmp/x.qcow2", "--format", "qcow2", "-c", d.dr.config}, "`lifeboat export vm1 --point 1 --disk vda -o /tmp/x.qcow2 --format qcow2`"},
		// An unknown disk is named, with the disks there are.
		{[]string{"export", "vm1", "--disk", "vdz", "-o", "/tmp/x.raw", "-c", d.dr.config}, `has no disk "vdz"; its disks are: vda, vdb`},
		{[]string{"verify", "vm1", "-c", d.prod.config}, "recovery site"},
		{[]string{"status", "-c", "/nonexistent.yaml"}, "no such file"},
	} {
		out, err := runErr(t, tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Fatalf("lifeboat %v: err %v, output %q should mention %q", tc.args, err, out, tc.want)
		}
	}
}

// A VM with one disk needs no --disk to export a point, and verify checks it.
func TestExportOneDiskWithoutDiskFlag(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	if err := d.guest.Fill(context.Background(), 0.5); err != nil {
		t.Fatal(err)
	}
	want := d.hashes(t)
	run(t, "sync", "vm1", "-c", d.prod.config)
	out := filepath.Join(d.dir, "vm1.raw")
	run(t, "export", "vm1", "-o", out, "-c", d.dr.config)
	if got := exportSHA256(t, out); got != want["vda"] {
		t.Fatalf("export without --disk: %s differs from the source at the point's instant", out)
	}
	if out := run(t, "verify", "vm1", "-c", d.dr.config); !strings.Contains(out, "OK, 1 disks") {
		t.Fatalf("verify: %s", out)
	}
}

// kill -9 of either site in the middle of a cycle: no partial point is listed,
// no change is lost, and the next sync is byte-exact.
func TestKillSitesMidCycle(t *testing.T) {
	d := deploy(t, 256<<20)
	if err := d.guest.Fill(context.Background(), 0.3); err != nil {
		t.Fatal(err)
	}
	run(t, "sync", "vm1", "-c", d.prod.config)
	// Three kills while the recovery site writes, then kills at random moments
	// of the cycle (more with LIFEBOAT_LONG=1: `make soak`).
	type kill struct {
		victim *site
		after  time.Duration // -1: when the recovery site starts writing
	}
	plan := []kill{{d.dr, -1}, {d.prod, -1}, {d.dr, -1}}
	random := 2
	if !testenv.Short() {
		random = 30
	}
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 1)) // the kill plan; the workload draws from the same seed
	for range random {
		v := d.dr
		if rng.IntN(2) == 0 {
			v = d.prod
		}
		plan = append(plan, kill{v, time.Duration(rng.IntN(1500)) * time.Millisecond})
	}
	committed := uint64(1)
	for round, k := range plan {
		victim := k.victim
		t.Logf("round %d: kill -9 %s %v into the cycle", round, victim.name, k.after)
		sync, out := d.startLongSync(t)
		if k.after < 0 {
			waitWriting(t, d.dir)
		} else {
			time.Sleep(k.after)
		}
		victim.kill()
		err := sync.Wait()
		if err == nil {
			t.Logf("round %d: the cycle finished before %s was killed", round, victim.name)
		} else {
			t.Logf("round %d: sync failed as it should when %s died: %s", round, victim.name, strings.TrimSpace(out.String()))
		}
		victim.start(t)
		pts := d.points(t, d.dr.config)
		latest := pts[len(pts)-1].ID
		// The kill may land after the commit and before the answer: then the
		// point is there, whole (verified below). Nothing else may appear.
		if err != nil && latest != committed && latest != committed+1 {
			t.Fatalf("round %d: latest point %d after an interrupted cycle, want %d", round, latest, committed)
		}
		if err == nil && latest != committed+1 {
			t.Fatalf("round %d: latest point %d after a good cycle, want %d", round, latest, committed+1)
		}
		run(t, "verify", "vm1", "-c", d.dr.config)
		committed = latest
		if _, err := d.guest.Mixed(context.Background(), 10); err != nil {
			t.Fatal(err)
		}
		want := d.hashes(t)
		run(t, "sync", "vm1", "-c", d.prod.config)
		committed++
		d.checkLatest(t, want)
		run(t, "verify", "vm1", "-c", d.dr.config)
	}
}

// startLongSync rewrites 150 MiB of the VM's disk, so that its cycle is long
// enough to interrupt, and starts `lifeboat sync` of it; out gets what the
// command prints.
func (d *deployment) startLongSync(t *testing.T) (sync *exec.Cmd, out *bytes.Buffer) {
	t.Helper()
	if err := d.guest.Fill(context.Background(), 0.6); err != nil {
		t.Fatal(err)
	}
	sync = exec.Command(binary, "sync", "vm1", "-c", d.prod.config)
	out = &bytes.Buffer{}
	sync.Stdout, sync.Stderr = out, out
	if err := sync.Start(); err != nil {
		t.Fatal(err)
	}
	return sync, out
}

// waitWriting waits until the recovery site is writing a point: its writer
// qemu-storage-daemon is running.
func waitWriting(t *testing.T, dir string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if processWith("qemu-storage-daemon", dir+"/dr") {
			time.Sleep(50 * time.Millisecond)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("the recovery site never started writing a point")
}

// A peer whose certificate comes from another deployment's CA is refused.
func TestUnknownPeerRefused(t *testing.T) {
	d := deploy(t, 16<<20)
	other := filepath.Join(d.dir, "other")
	run(t, "cert", "ca", "--dir", other)
	run(t, "cert", "site", "prod", "--ca", other, "--out", other, "--host", "127.0.0.1")
	cfg, _ := os.ReadFile(d.prod.config)
	rogue := strings.ReplaceAll(string(cfg), "pki/", "other/")
	rogue = strings.Replace(rogue, "/prod\n", "/rogue\n", 1)
	rogueCfg := filepath.Join(d.dir, "rogue.yaml")
	os.WriteFile(rogueCfg, []byte(rogue), 0o600)
	d.prod.kill()
	startSite(t, "rogue", rogueCfg)
	out, err := runErr(t, "sync", "vm1", "-c", rogueCfg)
	if err == nil {
		t.Fatal("a site with a certificate from another CA replicated")
	}
	if !strings.Contains(out, "certificate") && !strings.Contains(out, "authority") {
		t.Fatalf("refusal does not say why: %s", out)
	}
	if pts := d.points(t, d.dr.config); len(pts) != 0 {
		t.Fatalf("points listed after a refused peer: %+v", pts)
	}
}

// A consistency group synced with one command: one point per member, sharing the
// group's name and instant, shown by `points` and `status`.
func TestGroupSync(t *testing.T) {
	d := deploy(t, 16<<20)
	vm2 := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20})
	cfg, _ := os.ReadFile(d.prod.config)
	grouped := string(cfg) + fmt.Sprintf("  - {name: vm2, qmp: %s, nbd_socket: %s}\ngroups:\n  - {name: tier1, vms: [vm1, vm2]}\n", vm2.QMPSocket(), vm2.NBDSocket())
	os.WriteFile(d.prod.config, []byte(grouped), 0o600)
	d.prod.kill()
	d.prod.start(t)
	if err := d.guest.Fill(context.Background(), 0.5); err != nil {
		t.Fatal(err)
	}
	var pts []lifeboat.Point
	if err := json.Unmarshal([]byte(run(t, "sync", "tier1", "--json", "-c", d.prod.config)), &pts); err != nil {
		t.Fatal(err)
	}
	if len(pts) != 2 || pts[0].Group == "" || pts[0].Group != pts[1].Group || !strings.HasPrefix(pts[0].Group, "tier1@") {
		t.Fatalf("group sync: %+v", pts)
	}
	if out := run(t, "points", "vm2", "-c", d.dr.config); !strings.Contains(out, pts[0].Group) {
		t.Fatalf("points do not show the group:\n%s", out)
	}
	if out := run(t, "status", "-c", d.prod.config); !strings.Contains(out, "group tier1") {
		t.Fatalf("status does not show the group:\n%s", out)
	}
}

// kill -9 of a site while a guest is frozen: the thaw guard it started before the
// freeze thaws the guest, and the freeze marker goes. The guest's own fsfreeze
// hook holds the freeze request for a few seconds so the kill lands inside it.
func TestKilledSiteNeverLeavesGuestFrozen(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full run")
	}
	g := testguest.Boot(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20})
	if _, err := g.Shell(context.Background(), `mkdir -p /etc/qemu/fsfreeze-hook.d && printf '#!/bin/sh\nif [ "$1" = freeze ]; then echo LB-HOOK-FREEZE > /dev/console; sleep 4; fi\nexit 0\n' > /etc/qemu/fsfreeze-hook.d/slow && chmod +x /etc/qemu/fsfreeze-hook.d/slow`); err != nil {
		t.Fatal(err)
	}
	d := deploy(t, 8<<20)
	cfg, _ := os.ReadFile(d.prod.config)
	withGuest := string(cfg) + fmt.Sprintf("  - {name: g1, qmp: %s, nbd_socket: %s, disks: [vda], consistency: filesystem, agent: %s, freeze_limit: 30s}\n",
		g.StorageQMPSocket(), g.StorageNBDSocket(), g.AgentSocket())
	os.WriteFile(d.prod.config, []byte(withGuest), 0o600)
	d.prod.kill()
	d.prod.start(t)

	sync := exec.Command(binary, "sync", "g1", "-c", d.prod.config)
	if err := sync.Start(); err != nil {
		t.Fatal(err)
	}
	defer sync.Wait()
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(g.Console(), "LB-HOOK-FREEZE"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the freeze never started; console:\n%s", g.Console())
		}
	}
	d.prod.kill()
	marker := filepath.Join(d.dir, "prod", "frozen", "g1.frozen")
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("no freeze marker while frozen: %v", err)
	}
	// The hook ends, the guest freezes with nobody left to thaw it but the guard.
	if _, err := g.WaitThawed(context.Background(), 60*time.Second); err != nil {
		t.Fatalf("%v after its site was killed; prod log:\n%s", err, readFile(d.prod.log))
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Fatalf("freeze marker left after the guard thawed: %v", err)
	}
	if !strings.Contains(readFile(d.prod.log), "thawing it") {
		t.Fatalf("the guard did not say it thawed the guest:\n%s", readFile(d.prod.log))
	}
}

// corruptBase flips bytes in a data cluster of a disk's base image (the image
// without a backing file) under a recovery site's state directory.
func corruptBase(t *testing.T, stateDir, disk string) {
	t.Helper()
	images, _ := filepath.Glob(filepath.Join(stateDir, "recovery", "vms", "*", disk, "*"))
	for _, img := range images {
		info, err := exec.Command("qemu-img", "info", "--output=json", "-U", img).Output()
		if err != nil || strings.Contains(string(info), "backing-filename") {
			continue
		}
		out, err := exec.Command("qemu-img", "map", "--output=json", "-U", img).Output()
		if err != nil {
			t.Fatal(err)
		}
		var extents []struct {
			Data   bool   `json:"data"`
			Zero   bool   `json:"zero"`
			Offset *int64 `json:"offset"`
		}
		json.Unmarshal(out, &extents)
		for _, e := range extents {
			if e.Data && !e.Zero && e.Offset != nil {
				f, err := os.OpenFile(img, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				b := make([]byte, 16)
				f.ReadAt(b, *e.Offset+4096)
				for i := range b {
					b[i] ^= 0xff
				}
				f.WriteAt(b, *e.Offset+4096)
				f.Close()
				return
			}
		}
	}
	t.Fatalf("no base image with data for disk %s under %s", disk, stateDir)
}

func scrape(t *testing.T, socket string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	resp, err := c.Get("http://lifeboat/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// processWith reports whether a running process's command line holds both words.
func processWith(a, b string) bool {
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range cmdlines {
		c, err := os.ReadFile(f)
		if err == nil && bytes.Contains(c, []byte(a)) && bytes.Contains(c, []byte(b)) {
			return true
		}
	}
	return false
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// exportSHA256 is the hex SHA-256 of an exported image's bytes.
func exportSHA256(t *testing.T, path string) string {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := fileSHA256(path, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

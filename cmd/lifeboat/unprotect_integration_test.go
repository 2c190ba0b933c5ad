package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// `lifeboat unprotect`: a VM on its own schedule stops cycling, lifeboat's
// generations leave its disks (another tool's bitmap stays), status says so,
// it stays unprotected across a restart of the site, and `lifeboat sync`
// protects it again with a byte-exact hash resync.
func TestUnprotect(t *testing.T) {
	d := deploy(t, 32<<20)
	if err := d.guest.Fill(context.Background(), 0.4); err != nil {
		t.Fatal(err)
	}
	// The VM on a schedule of its own.
	cfg, err := os.ReadFile(d.prod.config)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(d.prod.config, []byte(strings.Replace(string(cfg), "nbd_socket:", "interval: 1s, nbd_socket:", 1)), 0o600)
	d.prod.kill()
	d.prod.start(t)
	deadline := time.Now().Add(time.Minute)
	for len(d.points(t, d.dr.config)) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no two points from the schedule in a minute:\n%s", readFile(d.prod.log))
		}
		time.Sleep(200 * time.Millisecond)
	}
	m := d.vm.Monitor()
	if err := m.AddBitmap(context.Background(), "vda", "users-own", true, false); err != nil {
		t.Fatal(err)
	}
	generations := func() []string {
		t.Helper()
		nodes, err := m.Nodes(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, n := range nodes {
			for _, b := range n.Bitmaps {
				if strings.HasPrefix(b.Name, "lifeboat") {
					out = append(out, n.NodeName+":"+b.Name)
				}
			}
		}
		return out
	}

	var u daemon.Unprotected
	if err := json.Unmarshal([]byte(run(t, "unprotect", "vm1", "--json", "-c", d.prod.config)), &u); err != nil {
		t.Fatal(err)
	}
	if u.VM != "vm1" || u.Peer != "dr" || len(u.Removed) != 2 || u.Error != "" {
		t.Fatalf("unprotect answered %+v, want vm1's 2 generations for dr removed", u)
	}
	if g := generations(); len(g) > 0 {
		t.Fatalf("after unprotect, lifeboat's generations are left in the VM: %v", g)
	}
	n, err := m.Node(context.Background(), "vda")
	if err != nil {
		t.Fatal(err)
	}
	if b, ok := n.Bitmap("users-own"); !ok || !b.Recording {
		t.Fatalf("unprotect removed or stopped another tool's bitmap: %+v", n.Bitmaps)
	}
	status := func() daemon.VMStatus { t.Helper(); return statusOf(t, d.prod.config) }
	check := func(when string) {
		t.Helper()
		pts := len(d.points(t, d.dr.config))
		time.Sleep(3 * time.Second) // three intervals
		if got := len(d.points(t, d.dr.config)); got != pts {
			t.Fatalf("%s: %d points became %d: the schedule still cycles an unprotected VM", when, pts, got)
		}
		if g := generations(); len(g) > 0 {
			t.Fatalf("%s: generations came back: %v", when, g)
		}
		if s := status(); s.State != "unprotected" || !strings.Contains(s.Detail, "lifeboat sync vm1") || s.Behind {
			t.Fatalf("%s: status of vm1: state %q, detail %q, behind %v; want unprotected, saying how to protect it again", when, s.State, s.Detail, s.Behind)
		}
		// A monitor alerting on the RPO hears of no RPO for it, and why.
		m := scrape(t, filepath.Join(d.dir, "prod", "api.sock"))
		if !strings.Contains(m, `lifeboat_vm_unprotected{vm="vm1"} 1`) || strings.Contains(m, `lifeboat_rpo_seconds{role="protected",vm="vm1"}`) {
			t.Fatalf("%s: metrics of an unprotected vm1, want lifeboat_vm_unprotected 1 and no RPO:\n%s", when, m)
		}
	}
	check("after unprotect")
	if out := run(t, "status", "-c", d.prod.config); !strings.Contains(out, "unprotected") {
		t.Fatalf("status does not say vm1 is unprotected:\n%s", out)
	}
	d.prod.kill()
	d.prod.start(t)
	check("after a restart of the site")

	// Protected again: a hash resync, byte-exact, and the schedule goes on.
	if _, err := d.guest.Mixed(context.Background(), 10); err != nil {
		t.Fatal(err)
	}
	want := d.hashes(t)
	out := run(t, "sync", "vm1", "-c", d.prod.config)
	if !strings.Contains(out, "committed") {
		t.Fatalf("sync after unprotect: %s", out)
	}
	pts := d.points(t, d.dr.config)
	last := pts[len(pts)-1]
	for _, disk := range last.Disks {
		if !disk.Resync {
			t.Errorf("disk %s of the first point after unprotect was sent incrementally", disk.Name)
		}
	}
	d.checkLatest(t, want)
	if s := status(); s.State == "unprotected" {
		t.Fatalf("after sync, vm1 is still %q: %s", s.State, s.Detail)
	}
	deadline = time.Now().Add(30 * time.Second)
	for len(d.points(t, d.dr.config)) <= len(pts) {
		if time.Now().After(deadline) {
			t.Fatalf("the schedule did not resume after sync:\n%s", readFile(d.prod.log))
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Out of protection for good: unprotected, then forgotten at the
	// recovery site. Without --yes forget only says what would go.
	run(t, "unprotect", "vm1", "-c", d.prod.config)
	count := len(d.points(t, d.dr.config))
	if out, err := runErr(t, "forget", "vm1", "-c", d.dr.config); err == nil || !strings.Contains(out, "--yes") || !strings.Contains(out, fmt.Sprintf("the %d restore points", count)) {
		t.Fatalf("forget without --yes: %v: %s; want a refusal saying what would go", err, out)
	}
	if got := len(d.points(t, d.dr.config)); got != count {
		t.Fatalf("forget without --yes deleted points: %d became %d", count, got)
	}
	if out, err := runErr(t, "forget", "vm1", "--yes", "-c", d.prod.config); err == nil || !strings.Contains(out, "not a recovery site") {
		t.Fatalf("forget at the protected site: %v: %s", err, out)
	}
	var f recovery.Forgotten
	if err := json.Unmarshal([]byte(run(t, "forget", "vm1", "--yes", "--json", "-c", d.dr.config)), &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Points) != count || f.Owner != "prod" || f.Bytes == 0 {
		t.Fatalf("forget answered %+v, want %d points of prod's deleted", f, count)
	}
	if pts := d.points(t, d.dr.config); len(pts) != 0 {
		t.Fatalf("after forget the recovery site lists points %v", pts)
	}
	if out := run(t, "status", "-c", d.dr.config); strings.Contains(out, "vm1") {
		t.Fatalf("after forget the recovery site's status shows vm1:\n%s", out)
	}
}

// statusOf is the status --json of vm1 at the site of config.
func statusOf(t *testing.T, config string) daemon.VMStatus {
	t.Helper()
	var st daemon.StatusReply
	if err := json.Unmarshal([]byte(run(t, "status", "--json", "-c", config)), &st); err != nil {
		t.Fatal(err)
	}
	for _, v := range st.VMs {
		if v.VM == "vm1" {
			return v
		}
	}
	t.Fatalf("status shows no vm1: %+v", st)
	return daemon.VMStatus{}
}

// A site whose state_dir refuses the unprotected record (here a directory
// stands where the file goes; a full or read-only file system does the
// same) has not unprotected the VM: unprotect must fail and say why, not
// report success while the VM goes on cycling.
func TestUnprotectRecordNotWritten(t *testing.T) {
	d := deploy(t, 16<<20)
	run(t, "sync", "vm1", "-c", d.prod.config)
	if err := os.MkdirAll(filepath.Join(d.dir, "prod", "protect", "vm1", "unprotected.json", "in-the-way"), 0o750); err != nil {
		t.Fatal(err)
	}
	out, err := runErr(t, "unprotect", "vm1", "-c", d.prod.config)
	if err == nil {
		t.Fatalf("unprotect succeeded though its record could not be written:\n%s", out)
	}
	if !strings.Contains(out, "unprotected.json") {
		t.Errorf("unprotect's error does not say what failed:\n%s", out)
	}
	if s := statusOf(t, d.prod.config); s.State == "unprotected" {
		t.Errorf("status says vm1 is unprotected, though nothing was recorded: %s", s.Detail)
	}
}

// A site that dies between writing the unprotected record and the end of
// the release (here: killed while the VM's QEMU does not answer) starts with
// the VM unprotected; status must say the release did not finish and how to
// finish it, not that lifeboat's change tracking was taken out. Unprotect
// run again finishes it.
func TestUnprotectInterruptedRelease(t *testing.T) {
	d := deploy(t, 16<<20)
	run(t, "sync", "vm1", "-c", d.prod.config)
	pid := d.vm.Daemon.Pid()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() { syscall.Kill(pid, syscall.SIGCONT) }
	defer cont()
	cmd := exec.Command(binary, "unprotect", "vm1", "-c", d.prod.config)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	record := filepath.Join(d.dir, "prod", "protect", "vm1", "unprotected.json")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(record); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unprotect wrote no record in 30s:\n%s", readFile(d.prod.log))
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // the release waits for the stopped QEMU
	d.prod.kill()
	cont()
	d.prod.start(t)
	s := statusOf(t, d.prod.config)
	if s.State != "unprotected" || !strings.Contains(s.Detail, "lifeboat unprotect vm1") {
		t.Fatalf("after a site died during unprotect: state %q, detail %q; want unprotected, saying to run `lifeboat unprotect vm1` again", s.State, s.Detail)
	}
	var u daemon.Unprotected
	if err := json.Unmarshal([]byte(run(t, "unprotect", "vm1", "--json", "-c", d.prod.config)), &u); err != nil {
		t.Fatal(err)
	}
	if len(u.Removed) != 2 || u.Error != "" {
		t.Fatalf("unprotect run again answered %+v, want vm1's 2 generations removed", u)
	}
	if s := statusOf(t, d.prod.config); strings.Contains(s.Detail, "did not finish") {
		t.Fatalf("after unprotect finished, status still says it did not: %s", s.Detail)
	}
}

// A planned migration (`failover --planned`) of an unprotected VM would
// shut it down, send a last point (a whole hash resync, with the guest
// down) and run it at the recovery site while status here still said
// "unprotected": it is refused, saying to protect the VM again first.
func TestUnprotectedVMNotMigrated(t *testing.T) {
	d := deploy(t, 16<<20)
	sys := startSystemVM(t)
	d.prod.restartWith(t, "vms:\n  - {name: vm1, qmp: "+sys.QMPSocket()+"}\n")
	run(t, "sync", "vm1", "-c", d.prod.config)
	run(t, "unprotect", "vm1", "-c", d.prod.config)

	out, err := runErr(t, "failover", "vm1", "--planned", "--shutdown-timeout", "1s", "-c", d.prod.config)
	if err == nil {
		runErr(t, "failover", "vm1", "--undo", "-c", d.dr.config)
		t.Fatalf("a planned migration of an unprotected VM ran:\n%s", out)
	}
	if !strings.Contains(out, "unprotected") || !strings.Contains(out, "lifeboat sync vm1") {
		t.Errorf("the refusal does not say why and what to do:\n%s", out)
	}
	if s := statusOf(t, d.prod.config); s.State != "unprotected" {
		t.Errorf("after the refused migration, vm1 is %q: %s", s.State, s.LastError)
	}
}

// A release that did not finish (the VM was shut down), then the VM's entry
// sent to another recovery site: unprotect run again must still take out
// the generations kept for the site it was unprotected from, or they record
// every write for good while status says the release finished.
func TestUnprotectFinishesAfterPeerChanged(t *testing.T) {
	d := deploy(t, 16<<20)
	run(t, "sync", "vm1", "-c", d.prod.config)
	d.vm.PowerOff(t)
	if out, err := runErr(t, "unprotect", "vm1", "-c", d.prod.config); err == nil {
		t.Fatalf("unprotect of a shut-down VM succeeded:\n%s", out)
	}
	d.vm.PowerOn(t)
	cfg, err := os.ReadFile(d.prod.config)
	if err != nil {
		t.Fatal(err)
	}
	// Another recovery site (its address is never dialled here).
	s := strings.Replace(string(cfg), "peers:\n", "peers:\n  - {name: dr2, address: \"127.0.0.1:1\"}\n", 1)
	s = strings.Replace(s, "name: vm1,", "name: vm1, peer: dr2,", 1)
	d.prod.kill()
	os.WriteFile(d.prod.config, []byte(s), 0o600)
	d.prod.start(t)
	run(t, "unprotect", "vm1", "-c", d.prod.config)
	nodes, err := d.vm.Monitor().Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			if strings.HasSuffix(b.Name, "@dr") {
				t.Errorf("after unprotect ran again, generation %s for site dr is left on node %s", b.Name, n.NodeName)
			}
		}
	}
	if st := statusOf(t, d.prod.config); strings.Contains(st.Detail, "did not finish") {
		t.Errorf("status: %s", st.Detail)
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
)

// The whole failover as a user runs it, against real sites, a real guest and
// its real qemu-system: the production site is lost, `failover` at the
// recovery site brings the guest up from its latest point, `status` there
// says so, the production site, back, is refused and says why in its own
// status, and `--undo` hands the VM back, whose next sync succeeds.
func TestFailoverCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "cli", Workload: testguest.Counter})
	dir := shortDir(t)
	makePKI(t, dir)
	addr := freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\nkeep: 10\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n"+
		"plans: [{name: drill, steps: [{vms: [vm1], timeout: 3m}]}]\n", dir, addr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	writeProd := func(qmp string) {
		os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
			"peers:\n  - {name: dr, address: %q}\nvms:\n  - {name: vm1, qmp: %s}\n", dir, addr, qmp)), 0o600)
	}
	writeProd(g.VMQMPSocket())
	startSite(t, "dr", drCfg)
	prod := startSite(t, "prod", prodCfg)

	for i := 1; i <= 3; i++ {
		if err := g.Count(fmt.Sprintf("line-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "sync", "vm1", "-c", prodCfg)
	// The production site is lost: its guest and its lifeboat, kill -9.
	g.Kill()
	prod.kill()

	// The production site was in contact a moment ago: a failover now could
	// run the VM twice, and is refused unless forced.
	out, err := runErr(t, "failover", "vm1", "-c", drCfg)
	if err == nil || !strings.Contains(out, "probably still running the VM") || !strings.Contains(out, "--planned") || !strings.Contains(out, "--force") {
		t.Fatalf("a failover right after production's last contact: %v\n%s", err, out)
	}
	out = run(t, "failover", "vm1", "--force", "-c", drCfg)
	t.Logf("lifeboat failover vm1 --force:\n%s", out)
	for _, want := range []string{"failover of point 1", "QEMU running", "agent answering", "--commit", "--undo"} {
		if !strings.Contains(out, want) {
			t.Errorf("failover's output lacks %q", want)
		}
	}
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	t.Cleanup(func() { runErr(t, "failover", "vm1", "--undo", "-c", drCfg) })
	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "failed over from point 1, waiting for --commit or --undo") {
		t.Errorf("status at the recovery site:\n%s", st)
	}
	// For scripts, the state is one word and the sentence is its detail.
	var st daemon.StatusReply
	if err := json.Unmarshal([]byte(run(t, "status", "--json", "-c", drCfg)), &st); err != nil || len(st.VMs) != 1 ||
		st.VMs[0].State != "failed-over-here" || !strings.Contains(st.VMs[0].Detail, "failed over from point 1") {
		t.Errorf("status --json at the recovery site: %+v %v; want vm1 failed-over-here, its detail naming point 1", st.VMs, err)
	}

	// Production comes back: its guest on its own disk, its lifeboat.
	g2 := testguest.Boot(t, testguest.Options{Name: "cli2", Image: g.DiskImage()})
	writeProd(g2.VMQMPSocket())
	prod = startSite(t, "prod", prodCfg)
	out, err = runErr(t, "sync", "vm1", "-c", prodCfg)
	if err == nil || !strings.Contains(out, "failed over to recovery site") {
		t.Fatalf("sync at the old production site after the failover: %v\n%s", err, out)
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "failed-over") || !strings.Contains(st, "failover vm1 --undo") {
		t.Errorf("status at the old production site does not say the VM was failed over and what to do:\n%s", st)
	}
	// Unprotect of a VM that runs at its recovery site is refused, saying
	// why; it would hide the failed-over state behind "unprotected".
	if out, err := runErr(t, "unprotect", "vm1", "-c", prodCfg); err == nil || !strings.Contains(out, "runs at recovery site") {
		t.Errorf("unprotect of the failed-over vm1: %v\n%s; want a refusal", err, out)
	}

	out = run(t, "failover", "vm1", "--undo", "-c", drCfg)
	if !strings.Contains(out, "handed back to site prod") {
		t.Errorf("--undo said:\n%s", out)
	}
	out = run(t, "sync", "vm1", "-c", prodCfg)
	t.Logf("sync after the undo:\n%s", out)
	if st := run(t, "failover", "--list", "-c", drCfg); !strings.Contains(st, "no VM runs") {
		t.Errorf("runs after the undo:\n%s", st)
	}
	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "handed to prod at") || !strings.Contains(st, "epoch 3") {
		t.Errorf("status at the recovery site after the undo does not say the VM was handed back:\n%s", st)
	}

	// A planned migration from the production site (the config names no
	// agent: the power button, which the test guest ignores, then its CPUs
	// are stopped).
	out = run(t, "failover", "vm1", "--planned", "--shutdown-timeout", "3s", "-c", prodCfg)
	t.Logf("lifeboat failover vm1 --planned:\n%s", out)
	if !strings.Contains(out, "migrated to dr with no loss") {
		t.Errorf("--planned said:\n%s", out)
	}
	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "failed over from point") {
		t.Errorf("status at the recovery site after the migration:\n%s", st)
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "by a planned migration") {
		t.Errorf("status at the production site after the migration:\n%s", st)
	}

	// A drill of the recovery plan beside the failed-over VM: its summary, then
	// plan stop ends it and leaves the failover.
	out = run(t, "plan", "run", "drill", "--test", "-c", drCfg)
	t.Logf("lifeboat plan run drill --test:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "AGENT ANSWERING") || !strings.HasPrefix(lines[1], "1 ") ||
		!strings.Contains(lines[1], "vm1") || !strings.HasSuffix(lines[1], " -") {
		t.Errorf("plan run's summary:\n%s", out)
	}
	if pts := run(t, "points", "vm1", "-c", drCfg); !strings.Contains(pts, "TESTED") || !strings.Contains(pts, "agent +") {
		t.Errorf("points after the drill do not show the tested point:\n%s", pts)
	}
	if out := run(t, "plan", "stop", "drill", "-c", drCfg); !strings.Contains(out, "1 test run(s) stopped") {
		t.Errorf("plan stop said:\n%s", out)
	}
	if st := run(t, "failover", "--list", "-c", drCfg); strings.Count(st, "vm1-") != 1 || strings.Contains(st, "test failover") {
		t.Errorf("runs after plan stop, want the failover alone:\n%s", st)
	}
}

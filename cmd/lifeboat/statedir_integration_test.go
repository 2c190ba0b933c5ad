package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testguest"
)

// A second site started on a state_dir a running site serves (a copied
// config, its api_socket changed) is refused, naming the first. Before, a
// protected site started and ran the same VMs' cycles, each clearing the
// other's fleece as a dead lifeboat's; a recovery site was refused by its
// catalog's lock without saying whose, after it had thawed the first's
// guests as left frozen.
func TestSecondSiteOnAStateDirIsRefused(t *testing.T) {
	d := deploy(t, 16<<20)
	for _, s := range []*site{d.prod, d.dr} {
		cfg, err := os.ReadFile(s.config)
		if err != nil {
			t.Fatal(err)
		}
		second := filepath.Join(d.dir, s.name+"-again.yaml")
		again := string(cfg) + fmt.Sprintf("api_socket: %s\n", filepath.Join(d.dir, s.name+"-again.sock"))
		if s == d.dr {
			again = strings.Replace(again, "listen: ", "listen: 127.0.0.1:0\n# was: ", 1)
		}
		if err := os.WriteFile(second, []byte(again), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		out, err := exec.CommandContext(ctx, binary, "serve", "-c", second).CombinedOutput()
		timedOut := ctx.Err() != nil
		cancel()
		want := fmt.Sprintf("site %q, pid %d", s.name, s.cmd.Process.Pid)
		if timedOut || err == nil || !strings.Contains(string(out), want) {
			t.Fatalf("a second `lifeboat serve` on site %s's state_dir: %v (ran for the whole 15 s: %v)\n%s\nwant it refused, naming %s", s.name, err, timedOut, out, want)
		}
		if _, err := runErr(t, "status", "-c", s.config); err != nil {
			t.Fatalf("site %s after the refusal: %v", s.name, err)
		}
	}
}

// A recovery site restarted with a lower `keep:` merges down to it at once,
// also for a VM that sends no more points (its production site is gone), and
// the latest point stays byte-exact. Before, retention ran only after a
// commit, so such a VM kept its old count for good.
func TestKeepLoweredCatchesUpAtStart(t *testing.T) {
	d := deploy(t, 16<<20)
	ctx := context.Background()
	var want map[string]string
	for range 4 {
		if _, err := d.guest.Mixed(ctx, 4); err != nil {
			t.Fatal(err)
		}
		want = d.hashes(t)
		run(t, "sync", "vm1", "-c", d.prod.config)
	}
	d.prod.kill()
	if n := len(d.points(t, d.dr.config)); n != 4 {
		t.Fatalf("%d points before keep was lowered, want 4", n)
	}
	cfg, err := os.ReadFile(d.dr.config)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.dr.config, []byte(strings.Replace(string(cfg), "keep: 10", "keep: 2", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	d.dr.kill()
	d.dr.start(t)
	var ids []uint64
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		ids = ids[:0]
		for _, p := range d.points(t, d.dr.config) {
			ids = append(ids, p.ID)
		}
		if len(ids) == 2 || time.Now().After(deadline) {
			break
		}
	}
	if fmt.Sprint(ids) != "[3 4]" {
		t.Fatalf("points a minute after a restart with keep 2: %v, want [3 4]", ids)
	}
	d.checkLatest(t, want)
	run(t, "verify", "vm1", "--point", "3", "-c", d.dr.config)
}

// A recovery site whose `listen:` was removed while a VM runs there from one
// of its points does not start, naming the run: nothing could stop, commit
// or fail it back without the recovery service. Before, the site started as
// a protected site only, and the run's QEMU ran on, out of every command's
// reach (`failover --list` said nothing of it).
func TestListenRemovedWithARunIsRefused(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "nolisten", Workload: testguest.Counter})
	dir := shortDir(t)
	makePKI(t, dir)
	addr := freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	drYAML := fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\nkeep: 10\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n", dir, addr)
	os.WriteFile(drCfg, []byte(drYAML), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
		"peers:\n  - {name: dr, address: %q}\nvms:\n  - {name: vm1, qmp: %s}\n", dir, addr, g.VMQMPSocket())), 0o600)
	dr := startSite(t, "dr", drCfg)
	startSite(t, "prod", prodCfg)
	run(t, "sync", "vm1", "-c", prodCfg)
	run(t, "failover", "vm1", "--test", "-c", drCfg)
	t.Cleanup(func() {
		os.WriteFile(drCfg, []byte(drYAML), 0o600)
		if dr.cmd == nil {
			dr.start(t)
		}
		run(t, "failover", "vm1", "--test", "--stop", "-c", drCfg)
	})

	dr.kill()
	os.WriteFile(drCfg, []byte(strings.Replace(drYAML, "listen: "+addr+"\n", "", 1)), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	out, err := exec.CommandContext(ctx, binary, "serve", "-c", drCfg).CombinedOutput()
	timedOut := ctx.Err() != nil
	cancel()
	if timedOut || err == nil || !strings.Contains(string(out), "vm vm1: test failover vm1-1-") || !strings.Contains(string(out), "--test --stop") {
		t.Fatalf("`lifeboat serve` without `listen:` while a test failover runs there: %v (ran for the whole 15 s: %v)\n%s\nwant it refused, naming the run and how to end it", err, timedOut, out)
	}
}

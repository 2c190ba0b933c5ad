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

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
)

// A failback into a libvirt domain, as a user runs it: production protects
// its domain through libvirt (no socket, no XML edited), is lost (its
// lifeboat killed, the domain destroyed) after its host wrote a little more
// into the image, the VM fails over to dr (a qemu-system there, from the
// domain's XML). Production, back and serving, takes the failback into the
// stopped domain's image, which then reads exactly as the recovered VM's
// disk: production's own late writes are gone. The recovered guest writes
// a file, and --finalize brings the VM home: production starts the domain
// through libvirt once dr has handed it over, and its first cycle, through
// libvirt again, continues incrementally from dr's fold point (the
// finalize made that point's generation a checkpoint of the domain's); the
// file reads right in the domain.
func TestLibvirtFailbackCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a libvirt domain and a guest under TCG: covered by the full (non -short) run")
	}
	dom := testlibvirt.Boot(t, testlibvirt.Options{Workload: testguest.None})
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o755); err != nil { // like /var/lib: QEMU as libvirt-qemu passes it
		t.Fatal(err)
	}
	makePKI(t, dir)
	drAddr, prodAddr := freeAddr(t), freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n"+
		"peers:\n  - {name: prod, address: %q}\n", dir, drAddr, prodAddr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
		"peers:\n  - {name: dr, address: %q}\nvms:\n  - name: web1\n    libvirt: {domain: %s}\n", dir, prodAddr, drAddr, dom.Name)), 0o600)
	startSite(t, "dr", drCfg)
	prod := startSite(t, "prod", prodCfg)
	run(t, "sync", "web1", "-c", prodCfg)
	run(t, "sync", "web1", "-c", prodCfg)

	// Production is lost; its host wrote a little more into the image first.
	prod.kill()
	dom.Destroy()
	image := dom.Image("vda")
	qemuIO(t, image, "write -P 0x5a 3M 192k")
	t.Logf("lifeboat failover web1 --force:\n%s", run(t, "failover", "web1", "--force", "-c", drCfg))
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	rec := runs[0]
	t.Cleanup(func() {
		if rec.Alive() {
			syscall.Kill(rec.PID, syscall.SIGKILL)
		}
	})
	startSite(t, "prod", prodCfg)

	pause(t, rec.QMP)
	out := run(t, "failback", "web1", "-c", drCfg)
	t.Logf("lifeboat failback web1:\n%s", out)
	if cmp, err := exec.Command("qemu-img", "compare", "-U", image, rec.Overlays["vda"]).CombinedOutput(); err != nil {
		t.Fatalf("the domain's image after the failback differs from the recovered VM's disk: %v\n%s", err, cmp)
	}
	cont(t, rec.QMP)
	sum := guestShell(t, rec.Agent, "dd if=/dev/urandom of=/data/home.bin bs=64k count=8 status=none && sync && sha256sum /data/home.bin")

	out, err := runErr(t, "failback", "web1", "--finalize", "--json", "--shutdown-timeout", "60s", "--wait", "150s", "-c", drCfg)
	if err != nil {
		t.Fatalf("lifeboat failback web1 --finalize: %v\n%s", err, out)
	}
	var fin struct {
		Home string `json:"home"`
		Fold struct {
			ID uint64 `json:"id"`
		} `json:"fold"`
		Down    time.Duration `json:"down_ns"`
		Resumed *pointJSON    `json:"resumed"`
	}
	if err := json.Unmarshal([]byte(out), &fin); err != nil {
		t.Fatalf("failback --finalize --json: %v\n%s", err, out)
	}
	t.Logf("finalize: the domain was down %v until its first point at production", fin.Down.Round(time.Millisecond))
	if p := fin.Resumed; p == nil || p.Site != "prod" || len(p.Disks) != 1 || p.Disks[0].Resync || p.Disks[0].Base != fin.Fold.ID || p.Stats.BytesSent > 16<<20 {
		t.Errorf("production's first point after the finalize: %+v; want one from prod, incremental from the fold %d, a few MiB at most\n%s", p, fin.Fold.ID, out)
	} else {
		t.Logf("production's first point after the finalize: %d, %d bytes sent", p.ID, p.Stats.BytesSent)
	}
	if st, err := testlibvirt.Virsh("domstate", dom.Name); err != nil || !strings.Contains(st, "running") {
		t.Errorf("the domain at production: %q %v, want running", st, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The guest boots (TCG) while production's first point is taken: its
	// agent answers a little later.
	var (
		got  string
		code int
	)
	for {
		got, code, err = testlibvirt.GuestExec(ctx, dom.Name, "/bin/sh", "-c", "sha256sum /data/home.bin")
		if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "not connected") && !strings.Contains(err.Error(), "not responding") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil || code != 0 || got != sum {
		t.Errorf("the file the recovered guest wrote reads in the domain at production as %q (exit %d, %v), want %q", got, code, err, sum)
	}
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
)

// A failback into a libvirt domain, as a user runs it: production protects
// its domain through libvirt (no socket, no XML edited), is lost (its
// lifeboat killed, the domain destroyed) after its host wrote a little more
// into the image, the VM fails over to dr: a qemu-system there, from the
// domain's XML, or, where dr's config names a libvirtd, a libvirt domain
// again. Production, back and serving, takes the failback into the stopped
// domain's image, which then reads exactly as the recovered VM's disk:
// production's own late writes are gone. The recovered guest writes a
// file, and --finalize brings the VM home: production starts the domain
// through libvirt once dr has handed it over, and its first cycle, through
// libvirt again, continues incrementally from dr's fold point (the
// finalize made that point's generation a checkpoint of the domain's); the
// file reads right in the domain. (Both sites share this host's libvirtd:
// where dr runs the VM under libvirt, production's domain is renamed once
// it is lost, as it would be on a host of its own.)
func TestLibvirtFailbackCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a libvirt domain and a guest under TCG: covered by the full (non -short) run")
	}
	for _, tc := range []struct {
		name               string
		drLibvirt, reverse bool
		long               bool // `make soak` only: its paths are the other cases' and TestFailbackCommands'
	}{{"dr runs qemu-system", false, false, true}, {"dr runs libvirt", true, false, false}, {"dr runs libvirt, protected in reverse", true, true, false}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.long && testenv.Short() {
				t.Skip("a long case: `make soak` (LIFEBOAT_LONG=1) runs it")
			}
			libvirtFailback(t, tc.drLibvirt, tc.reverse)
		})
	}
}

// libvirtFailback is one case of TestLibvirtFailbackCommands; with reverse,
// the VM stays at dr and is protected from there to production instead
// (`lifeboat protect --reverse`): production's domain keeps its points, its
// image moved out of the domain's reach, and every cycle after is
// incremental, through libvirt at both ends.
func libvirtFailback(t *testing.T, drLibvirt, reverse bool) {
	dom := testlibvirt.Boot(t, testlibvirt.Options{Workload: testguest.None})
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o755); err != nil { // like /var/lib: QEMU as libvirt-qemu passes it
		t.Fatal(err)
	}
	makePKI(t, dir)
	drAddr, prodAddr := freeAddr(t), freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	drLv := ""
	if drLibvirt {
		drLv = "libvirt: " + testlibvirt.URI + "\n"
	}
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n%s"+
		"peers:\n  - {name: prod, address: %q}\n", dir, drAddr, drLv, prodAddr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	prodConfig := func(domain string) {
		os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
			"peers:\n  - {name: dr, address: %q}\nvms:\n  - name: web1\n    libvirt: {domain: %s}\n", dir, prodAddr, drAddr, domain)), 0o600)
	}
	prodConfig(dom.Name)
	startSite(t, "dr", drCfg)
	prod := startSite(t, "prod", prodCfg)
	run(t, "sync", "web1", "-c", prodCfg)
	run(t, "sync", "web1", "-c", prodCfg)

	// Production is lost; its host wrote a little more into the image first.
	prod.kill()
	dom.Destroy()
	image := dom.Image("vda")
	qemuIO(t, image, "write -P 0x5a 3M 192k")
	prodDomain := dom.Name
	if drLibvirt {
		// Production's domain as another host's libvirtd would keep it: the
		// failover defines the VM's own name and UUID here.
		prodDomain = dom.Name + "-prod"
		doc, err := testlibvirt.Virsh("dumpxml", "--inactive", dom.Name)
		if err != nil {
			t.Fatal(err)
		}
		doc = strings.Replace(doc, "<name>"+dom.Name+"</name>", "<name>"+prodDomain+"</name>", 1)
		doc = regexp.MustCompile(`\s*<uuid>[^<]*</uuid>`).ReplaceAllString(doc, "")
		xml := filepath.Join(dir, "prod-domain.xml")
		if err := os.WriteFile(xml, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{{"undefine", dom.Name, "--checkpoints-metadata"}, {"define", xml}} {
			if out, err := testlibvirt.Virsh(args...); err != nil {
				t.Fatalf("virsh %v: %v\n%s", args, err, out)
			}
		}
		t.Cleanup(func() {
			testlibvirt.Virsh("destroy", prodDomain)
			testlibvirt.Virsh("undefine", prodDomain, "--checkpoints-metadata")
		})
		prodConfig(prodDomain)
	}
	t.Logf("lifeboat failover web1 --force:\n%s", run(t, "failover", "web1", "--force", "-c", drCfg))
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	rec := runs[0]
	t.Cleanup(func() {
		if rec.Domain != "" {
			testlibvirt.Virsh("destroy", rec.Domain)
			testlibvirt.Virsh("undefine", rec.Domain, "--checkpoints-metadata")
		} else if rec.Alive() {
			syscall.Kill(rec.PID, syscall.SIGKILL)
		}
	})
	if drLibvirt != (rec.Domain != "") {
		t.Fatalf("the failover at dr runs as libvirt domain %q; want one: %v", rec.Domain, drLibvirt)
	}
	// The recovered VM, paused, resumed, and a shell in its guest.
	pauseRec, contRec := func() { pause(t, rec.QMP) }, func() { cont(t, rec.QMP) }
	recShell := func(script string) string { return guestShell(t, rec.Agent, script) }
	if drLibvirt {
		virsh := func(args ...string) {
			if out, err := testlibvirt.Virsh(args...); err != nil {
				t.Fatalf("virsh %v: %v\n%s", args, err, out)
			}
		}
		pauseRec, contRec = func() { virsh("suspend", rec.Domain) }, func() { virsh("resume", rec.Domain) }
		recShell = func(script string) string {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, code, err := testlibvirt.GuestExec(ctx, rec.Domain, "/bin/sh", "-c", script)
			if err != nil || code != 0 {
				t.Fatalf("in the recovered guest: %q: %v (exit %d)", script, err, code)
			}
			return out
		}
	}
	startSite(t, "prod", prodCfg)
	if reverse {
		run(t, "failover", "web1", "--commit", "-c", drCfg)
		recShell("dd if=/dev/urandom of=/data/away.bin bs=64k count=8 status=none && sync")
		var first pointJSON
		if out := run(t, "protect", "web1", "--reverse", "--interval", "1h", "--json", "-c", drCfg); json.Unmarshal([]byte(out), &first) != nil || first.ID == 0 {
			t.Fatalf("protect --reverse --json: %s", out)
		}
		if _, err := os.Stat(image); !os.IsNotExist(err) {
			t.Errorf("production's image %s is still where its domain would open it (%v)", image, err)
		}
		// The schedule's first cycle runs at once and freezes the guest:
		// the guest's next write waits for it.
		deadline := time.Now().Add(time.Minute)
		for {
			var st struct {
				VMs []vmStatusJSON `json:"vms"`
			}
			json.Unmarshal([]byte(run(t, "status", "--json", "-c", drCfg)), &st)
			if slices.ContainsFunc(st.VMs, func(v vmStatusJSON) bool {
				return v.ReverseRun != "" && v.LastPoint != nil && v.LastPoint.ID > first.ID
			}) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("dr's schedule took no point of the VM protected in reverse within a minute")
			}
			time.Sleep(200 * time.Millisecond)
		}
		recShell("dd if=/dev/urandom of=/data/away2.bin bs=64k count=32 status=none && sync")
		var next pointJSON
		if out := run(t, "sync", "web1", "--json", "-c", drCfg); json.Unmarshal([]byte(out), &next) != nil || next.ID <= first.ID ||
			len(next.Disks) != 1 || next.Disks[0].Resync || next.Disks[0].Base != next.ID-1 || next.Stats.BytesSent > 8<<20 {
			t.Errorf("a cycle in reverse after point %d: %+v; want incremental, a few MiB at most\n%s", first.ID, next, out)
		}
		if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "reversed") {
			t.Errorf("status at production:\n%s", st)
		}
		return
	}

	pauseRec()
	out := run(t, "failback", "web1", "-c", drCfg)
	t.Logf("lifeboat failback web1:\n%s", out)
	if cmp, err := exec.Command("qemu-img", "compare", "-U", image, rec.Overlays["vda"]).CombinedOutput(); err != nil {
		t.Fatalf("the domain's image after the failback differs from the recovered VM's disk: %v\n%s", err, cmp)
	}
	contRec()
	sum := recShell("dd if=/dev/urandom of=/data/home.bin bs=64k count=8 status=none && sync && sha256sum /data/home.bin")

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
	if st, err := testlibvirt.Virsh("domstate", prodDomain); err != nil || !strings.Contains(st, "running") {
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
		got, code, err = testlibvirt.GuestExec(ctx, prodDomain, "/bin/sh", "-c", "sha256sum /data/home.bin")
		if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "not connected") && !strings.Contains(err.Error(), "not responding") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil || code != 0 || got != sum {
		t.Errorf("the file the recovered guest wrote reads in the domain at production as %q (exit %d, %v), want %q", got, code, err, sum)
	}
}

// vmStatusJSON is what `status --json` says of a VM, as these tests read it.
type vmStatusJSON struct {
	ReverseRun string     `json:"reverse_run"`
	LastPoint  *pointJSON `json:"last_point"`
}

package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// `lifeboat protect --reverse` as a user runs it, against real sites and a
// real guest: production replicates, is lost (kill -9) after writing a
// little more, the VM fails over to dr and stays there. Before the failover
// is committed the reversal is refused; once it is, the recovered guest
// writes a file and the reversal makes production keep the VM's points
// from its own disk, brought up to date by one failback cycle, with no full
// copy: production's image leaves the VM's reach (moved into its store),
// both sites' status say what happened, and the next cycle from dr is
// incremental from that first point, a few MiB for a few MiB written. The
// latest point at production, exported, equals the recovered VM's disk and
// holds the file; a restarted dr goes on protecting the VM in reverse.
// (dr's schedule runs a cycle as soon as the reversal is done, so the
// command's own sync may come second.)
func TestProtectReverseCommands(t *testing.T) {
	r := newFailbackRig(t)
	drCfg, prodCfg, rec := r.drCfg, r.prodCfg, r.rec
	// A committed failover refuses --undo: its QEMU is the test's to end.
	t.Cleanup(func() {
		if rec.Alive() {
			syscall.Kill(rec.PID, syscall.SIGKILL)
		}
	})
	startSite(t, "prod", prodCfg)

	if out, err := runErr(t, "protect", "vm1", "--reverse", "-c", drCfg); err == nil || !strings.Contains(out, "--commit") {
		t.Fatalf("protection in reverse of an uncommitted failover: %v\n%s", err, out)
	}
	run(t, "failover", "vm1", "--commit", "-c", drCfg)
	sum := guestShell(t, rec.Agent, "dd if=/dev/urandom of=/data/rev.bin bs=64k count=8 status=none && sync && sha256sum /data/rev.bin")

	out := run(t, "protect", "vm1", "--reverse", "--interval", "1h", "--json", "-c", drCfg)
	var first pointJSON
	if err := json.Unmarshal([]byte(out), &first); err != nil {
		t.Fatalf("protect --reverse --json: %v\n%s", err, out)
	}
	t.Logf("lifeboat protect vm1 --reverse: production's first point is %d", first.ID)
	if first.ID == 0 || first.Site != "dr" {
		t.Errorf("the adopted point: %+v; want a point of dr's", first)
	}
	if _, err := os.Stat(r.g.DiskImage()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("production's image %s is still where the VM would open it (%v)", r.g.DiskImage(), err)
	}
	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "protected in reverse to prod") {
		t.Errorf("status at dr after the reversal:\n%s", st)
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "reversed") || !strings.Contains(st, "protects it no more") {
		t.Errorf("status at production after the reversal:\n%s", st)
	}
	if out, err := runErr(t, "sync", "vm1", "-c", prodCfg); err == nil {
		t.Errorf("production synced the VM it keeps the points of:\n%s", out)
	}

	// The VM writes on at dr; a cycle sends what it wrote, incrementally.
	guestShell(t, rec.Agent, "dd if=/dev/urandom of=/data/rev2.bin bs=64k count=32 status=none && sync")
	pause(t, rec.QMP) // the disk stands still for the comparison below
	out = run(t, "sync", "vm1", "--json", "-c", drCfg)
	var next pointJSON
	if err := json.Unmarshal([]byte(out), &next); err != nil {
		t.Fatalf("sync --json at dr: %v\n%s", err, out)
	}
	t.Logf("the first cycle in reverse: point %d, %d bytes changed, %d sent", next.ID, next.Stats.BytesChanged, next.Stats.BytesSent)
	if next.ID <= first.ID || len(next.Disks) != 1 || next.Disks[0].Resync || next.Disks[0].Base != next.ID-1 || next.Stats.BytesSent > 8<<20 {
		t.Errorf("a cycle in reverse: %+v; want a point after %d, incremental from the one before, a few MiB at most", next, first.ID)
	}
	var pts []pointJSON
	if err := json.Unmarshal([]byte(run(t, "points", "vm1", "--json", "-c", prodCfg)), &pts); err != nil || len(pts) != int(next.ID-first.ID+1) {
		t.Fatalf("points at production: %v %+v; want %d..%d", err, pts, first.ID, next.ID)
	}
	for _, p := range pts[1:] {
		if p.Disks[0].Resync || p.Stats.BytesSent > 8<<20 {
			t.Errorf("point %d at production: %+v; want every cycle in reverse incremental, a few MiB at most", p.ID, p)
		}
	}
	img := filepath.Join(r.dir, "latest.qcow2")
	run(t, "export", "vm1", "--point", "latest", "-o", img, "--format", "qcow2", "-c", prodCfg)
	if cmp, err := exec.Command("qemu-img", "compare", "-U", img, rec.Overlays["vda"]).CombinedOutput(); err != nil {
		t.Fatalf("production's latest point differs from the recovered VM's disk: %v\n%s", err, cmp)
	}
	cont(t, rec.QMP)
	if got := guestShell(t, rec.Agent, "sha256sum /data/rev.bin"); got != sum {
		t.Errorf("the guest's file reads %q, want %q", got, sum)
	}

	// A restarted dr protects the VM in reverse still.
	r.dr.kill()
	r.dr = startSite(t, "dr", drCfg)
	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "protected in reverse to prod") {
		t.Errorf("status at dr after its restart:\n%s", st)
	}
	out = run(t, "sync", "vm1", "--json", "-c", drCfg)
	var again pointJSON
	if err := json.Unmarshal([]byte(out), &again); err != nil || again.ID <= next.ID || again.Disks[0].Resync || again.Disks[0].Base != again.ID-1 {
		t.Errorf("a cycle after dr's restart: %v %+v; want a point after %d, incremental", err, again, next.ID)
	}
}

// pointJSON is what the commands' --json say of a point.
type pointJSON struct {
	ID    uint64 `json:"id"`
	Site  string `json:"site"`
	Disks []struct {
		Name   string `json:"name"`
		Resync bool   `json:"resync"`
		Base   uint64 `json:"base"`
	} `json:"disks"`
	Stats struct {
		BytesChanged int64 `json:"bytes_changed"`
		BytesSent    int64 `json:"bytes_sent"`
	} `json:"stats"`
}

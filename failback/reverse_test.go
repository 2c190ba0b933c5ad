package failback_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Protection in reverse with no full copy: production wrote after its last
// point and was stopped, the VM failed over and wrote more, one failback
// cycle made the production disks the recovered VM's; the reversal makes
// those disks the first point of the VM in production's own recovery store
// (moved there, nothing copied, their blocks hashed into its record), and an
// ordinary cycle from the recovered VM to production is then incremental
// from that point, sending only what the VM wrote since, every point
// byte-exact and verified. A store that keeps another VM of that name is
// refused before anything moves. A production VM started again on its old images
// no longer finds them; a reversal cut off after the images moved is
// finished by a restarted site, and one run again returns the same point.
// Retention then merges later points into the adopted point's image, never
// into the moved image under it. (The cut is a test hook: a kill -9 at
// that instant cannot be aimed.)
func TestReverseProtection(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 15); err != nil {
		t.Fatal(err)
	}
	images, err := protect.ReadImages(r.workDir)
	if err != nil {
		t.Fatal(err)
	}

	stateDir := t.TempDir()
	fb, prod := r.prepare(t, stateDir, holds)
	rs, err := recovery.Open(ctx(t), filepath.Join(filepath.Dir(images[0].File), "store"), recovery.Options{Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	client := r.productionServer(t, failback.Routed{Failback: fb, Other: wire.RecoveryStore(rs)})

	// Before any failback cycle the disks still hold production's own writes.
	if _, err := fb.Reverse(ctx(t), "vm1", "dr", rs); err == nil {
		t.Fatal("production reversed vm1 before a failback cycle overwrote its own writes")
	}
	fbp := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: rec.QMPSocket(), NBDSocket: rec.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: &failback.Target{Client: client, Shared: holds.ID, SharedMap: r.pointMap(holds.ID)}, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
	fpt := r.failbackCycle(t, fbp, prod, guest, holds.ID)

	if _, err := fb.Reverse(ctx(t), "vm1", "prod", rs); !errors.Is(err, recovery.ErrNotOwner) {
		t.Errorf("a site other than the VM's owner reversed it: %v", err)
	}
	// A store that keeps another VM of that name refuses before anything moves.
	other, err := recovery.Open(ctx(t), t.TempDir(), recovery.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	w, err := other.Begin(ctx(t), recovery.BeginSpec{VM: "vm1", ID: 1, Site: "elsewhere",
		Disks: []recovery.DiskSpec{{Name: "vda", Size: 1 << 20, Resync: true, Lineage: "another"}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(ctx(t), lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	if _, err := fb.Reverse(ctx(t), "vm1", "dr", other); err == nil || !strings.Contains(err.Error(), "nothing was moved") {
		t.Errorf("a store keeping another vm1 took the reversal: %v", err)
	}
	for _, im := range images {
		if _, err := os.Stat(im.File); err != nil {
			t.Errorf("after the refused reversal production's image %s: %v", im.File, err)
		}
	}

	// The site dies once the images have moved: a restarted site's
	// reversal finishes the adoption from its record.
	died := errors.New("production site killed")
	failback.SetReverseMovedHook(func() error { return died })
	if _, err := fb.Reverse(ctx(t), "vm1", "dr", rs); !errors.Is(err, died) {
		t.Fatalf("reversal cut off after the moves: %v", err)
	}
	failback.SetReverseMovedHook(nil)
	if _, found, _ := rs.Latest("vm1"); found {
		t.Fatal("the store holds a point of vm1 though the reversal was cut off before the adoption")
	}
	restarted, err := failback.NewStore(stateDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := restarted.Reverse(ctx(t), "vm1", "dr", rs)
	if err != nil {
		t.Fatal(err)
	}
	if adopted.ID != fpt.ID {
		t.Errorf("the adopted point is %d, want the failback point %d", adopted.ID, fpt.ID)
	}
	for _, im := range images {
		if _, err := os.Stat(im.File); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("production's image %s is still where the VM would open it (%v)", im.File, err)
		}
	}
	r.checkPoint(t, rs, adopted.ID, guest)
	var total int64
	for _, d := range disks {
		total += d.Size
	}
	if du := dirBytes(t, rs.Dir()) - seedBytes(t, rs.Dir()); du > total/4 {
		t.Errorf("the store holds %d bytes besides the adopted images, more than a quarter of the disks (%d): was something copied?", du, total)
	}
	if again, err := fb.Reverse(ctx(t), "vm1", "dr", rs); err != nil || again.ID != adopted.ID {
		t.Errorf("a repeated reversal gave point %d, %v; want %d", again.ID, err, adopted.ID)
	}

	// The VM, protected in reverse: an ordinary cycle to production's store.
	more, err := guest.Mixed(ctx(t), 8)
	if err != nil {
		t.Fatal(err)
	}
	p := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: rec.QMPSocket(), NBDSocket: rec.NBDSocket(), WorkDir: fbp.VM.WorkDir},
		Target: client, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
	pt, err := p.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range pt.Disks {
		if d.Resync || d.Base != adopted.ID {
			t.Errorf("point %d disk %s: resync %v from point %d, want an incremental from the adopted point %d", pt.ID, d.Name, d.Resync, d.Base, adopted.ID)
		}
	}
	touched := workload.TouchedBytes(more)
	t.Logf("reverse cycle: point %d handled %d bytes, sent %d, for %d the VM wrote since the reversal (disks %d bytes)", pt.ID, pt.Stats.BytesChanged, pt.Stats.BytesSent, touched, total)
	if pt.Stats.BytesChanged > touched {
		t.Errorf("the first reverse cycle handled %d bytes, more than the %d the VM wrote since the reversal", pt.Stats.BytesChanged, touched)
	}
	r.checkPoint(t, rs, pt.ID, guest)

	// Retention merges the later points into the adopted one's image, a
	// thin overlay: the moved image under it stays as it was.
	if _, err := guest.Mixed(ctx(t), 4); err != nil {
		t.Fatal(err)
	}
	pt3, err := p.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	rs.SettleRetention()
	pts, err := rs.Points("vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(pts) != 2 || pts[0].ID != pt.ID || pts[1].ID != pt3.ID {
		t.Errorf("after retention (keep 2) production holds %+v, want points %d and %d", pts, pt.ID, pt3.ID)
	}
	r.checkPoint(t, rs, pt3.ID, guest)
	if _, err := rs.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
		t.Errorf("point %d, merged into the adopted image, does not verify: %v", pt.ID, err)
	}
	if n := seedBytes(t, rs.Dir()); n == 0 {
		t.Error("the adopted images are gone from the store after retention")
	}
}

// checkPoint exports every disk of point id from rs and checks it reads as
// the guest's disks do now, and that the point verifies.
func (r *replicated) checkPoint(t *testing.T, rs *recovery.Store, id uint64, guest *workload.Guest) {
	t.Helper()
	want, err := guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		out := filepath.Join(t.TempDir(), d.Name+".raw")
		if err := rs.Export(ctx(t), "vm1", id, d.Name, out, "raw"); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if got := hex.EncodeToString(sum[:]); got != want[d.Name] {
			t.Errorf("production's point %d disk %s reads sha256 %s, the VM's %s", id, d.Name, got[:12], want[d.Name][:12])
		}
	}
	if _, err := rs.Verify(ctx(t), "vm1", id, nil); err != nil {
		t.Errorf("production's point %d does not verify: %v", id, err)
	}
}

// dirBytes is the space the files under dir take.
func dirBytes(t *testing.T, dir string) int64 {
	return sumFiles(t, dir, func(string) bool { return true })
}

// seedBytes is the space the adopted images under dir take.
func seedBytes(t *testing.T, dir string) int64 {
	return sumFiles(t, dir, func(name string) bool { m, _ := filepath.Match("seed-*", name); return m })
}

func sumFiles(t *testing.T, dir string, keep func(string) bool) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !keep(d.Name()) {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		n += fi.Size()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A reversal takes production's disks for the failback point they hold, so
// they must be that point: nothing written since its commit. Here
// production's site restarted after the failback cycle (its daemon let go
// of the disks), the VM was started there by hand, wrote and was stopped,
// and the failback was taken again (a cycle then cut off before its
// commit). Before, the reversal adopted those disks as the failback point,
// production's late writes and all, and the owner's cycles, incremental
// from it, never sent those blocks again: production's points of the VM
// held production's stale data where the recovered VM's disk did not. Now
// it is refused, saying to run a failback cycle first (what `protect
// --reverse` does), and the reversal after that cycle is byte-exact.
func TestReverseRefusesDisksWrittenSinceTheFailbackPoint(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	rec, guest, holds := r.recovered(t, r.latest.ID)
	if _, err := guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	images, err := protect.ReadImages(r.workDir)
	if err != nil {
		t.Fatal(err)
	}
	stateDir := t.TempDir()
	fb, prod := r.prepare(t, stateDir, holds)
	rs, err := recovery.Open(ctx(t), filepath.Join(filepath.Dir(images[0].File), "store"), recovery.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	workDir := testsite.ShortDir(t)
	failbackTarget := func(fb *failback.Store) *failback.Target {
		return r.failbackTarget(t, failback.Routed{Failback: fb, Other: wire.RecoveryStore(rs)}, holds)
	}
	fpt := r.failbackCycle(t, cycles(rec, workDir, failbackTarget(fb)), prod, guest, holds.ID)

	// Production's site restarts; the VM runs there by hand for a while.
	if err := fb.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.runByHand(t, false)
	again, prod2 := r.prepare(t, stateDir, holds)

	adopted, err := again.Reverse(ctx(t), "vm1", "dr", rs)
	if err == nil {
		t.Errorf("production reversed vm1 taking disks written after failback point %d for that point", fpt.ID)
	} else {
		if !strings.Contains(err.Error(), "failback cycle") {
			t.Errorf("the refused reversal does not say to run a failback cycle first: %v", err)
		}
		for _, im := range images {
			if _, serr := os.Stat(im.File); serr != nil {
				t.Errorf("after the refused reversal production's image %s: %v", im.File, serr)
			}
		}
		// As `protect --reverse` does: a failback cycle, then the reversal.
		r.failbackCycleResyncing(t, cycles(rec, workDir, failbackTarget(again)), prod2, guest, fpt.ID, map[string]bool{"vdb": true})
		if adopted, err = again.Reverse(ctx(t), "vm1", "dr", rs); err != nil {
			t.Fatal(err)
		}
	}
	r.checkPoint(t, rs, adopted.ID, guest)

	// Protected in reverse: the owner's cycles, incremental from the adopted point.
	if _, err := guest.Mixed(ctx(t), 4); err != nil {
		t.Fatal(err)
	}
	pt, err := cycles(rec, workDir, failbackTarget(again).Client).Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	r.checkPoint(t, rs, pt.ID, guest)
}

package protect_test

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// powerCycle stops the VM cleanly, runs between (the images are closed), and
// starts it again with a new guest connection.
func (r *rig) powerCycle(t *testing.T, between func()) {
	t.Helper()
	r.guest.Close()
	r.vm.PowerOff(t)
	if between != nil {
		between()
	}
	r.vm.PowerOn(t)
	r.openGuest(t)
}

func diskNamed(t *testing.T, p lifeboat.Point, name string) lifeboat.PointDisk {
	t.Helper()
	for _, d := range p.Disks {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("point %d has no disk %s", p.ID, name)
	return lifeboat.PointDisk{}
}

// A production disk restored from an older copy of itself (its persistent
// bitmaps travel inside the file) carries a generation the recovery site has
// moved past: it must be resynchronised by hashes, never taken as a base.
// Every point, the last one included, is byte-identical to the source.
func TestRestoredDiskResyncs(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	first := r.cycle(t)
	aside := r.vm.ImagePath("vda") + ".aside"
	r.powerCycle(t, func() { copyFile(t, r.vm.ImagePath("vda"), aside) })
	for range 2 {
		if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
			t.Fatal(err)
		}
		r.cycle(t)
	}
	r.powerCycle(t, func() { copyFile(t, aside, r.vm.ImagePath("vda")) })
	if _, err := r.guest.Mixed(ctx(t), 3); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t) // byte-exact against the restored source, or it fails here
	vda := diskNamed(t, pt, "vda")
	if !vda.Resync {
		t.Fatalf("the restored qcow2 disk was taken incrementally from generation %q", vda.BaseGeneration)
	}
	if lin := diskNamed(t, first, "vda").Lineage; vda.Lineage != lin || lin == "" {
		t.Fatalf("the restored disk's lineage is %q, want the disk's own %q", vda.Lineage, lin)
	}
	// Only what differs from the replica crossed: the resync compares hashes.
	if pt.Stats.BytesSame == 0 {
		t.Fatalf("the resync skipped nothing the replica already held: %+v", pt.Stats)
	}
	// And the restored disk is tracked again from this point.
	if _, err := r.guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t)
	if d := diskNamed(t, pt, "vda"); d.Resync || d.BaseGeneration != vda.Generation {
		t.Fatalf("after the resync, disk vda: resync %v from %q, want incremental from %q", d.Resync, d.BaseGeneration, vda.Generation)
	}
}

// A copy taken while a cycle that later failed had turned the generations
// over carries a generation named after the same point number as the retried
// cycle's: the name's nonce tells the two instants apart.
func TestRestoredCopyOfFailedCycleResyncs(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	r.cycle(t)
	aside := r.vm.ImagePath("vda") + ".aside"
	// Cycle 3 reaches its instant, then the VM is stopped cleanly and its
	// disk copied: the copy holds the failed cycle's generation of point 3.
	r.p.Hooks.AfterInstant = func(context.Context) error {
		r.guest.Close()
		r.vm.PowerOff(t)
		copyFile(t, r.vm.ImagePath("vda"), aside)
		return errors.New("test: the VM went away after the instant")
	}
	if _, err := r.p.Cycle(ctx(t)); err == nil {
		t.Fatal("cycle 3 succeeded with its VM gone")
	}
	r.p.Hooks.AfterInstant = nil
	r.vm.PowerOn(t)
	r.openGuest(t)
	if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	if pt.ID != 3 || diskNamed(t, pt, "vda").Resync {
		t.Fatalf("the retried cycle made point %d (resync %v), want an incremental point 3", pt.ID, diskNamed(t, pt, "vda").Resync)
	}
	r.powerCycle(t, func() { copyFile(t, aside, r.vm.ImagePath("vda")) })
	if _, err := r.guest.Mixed(ctx(t), 3); err != nil {
		t.Fatal(err)
	}
	if d := diskNamed(t, r.cycle(t), "vda"); !d.Resync {
		t.Fatalf("the copy's generation of the failed point 3 was taken as the base of the retried point 3 (%q)", d.BaseGeneration)
	}
}

// Generations kept for another recovery site (a second deployment protecting
// the same VM) are never touched, and a generation of this one that another
// tool removed leads to a resync, not to a point that misses writes.
func TestGenerationsOfAnotherSiteUntouched(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	m := r.vm.Monitor()
	other := "lifeboat." + diskNamed(t, pt, "vda").Lineage + ".1.00000000@elsewhere"
	if err := m.AddBitmap(ctx(t), "vda", other, true, false); err != nil {
		t.Fatal(err)
	}
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t)
	n, err := m.Node(ctx(t), "vda")
	if err != nil {
		t.Fatal(err)
	}
	if b, ok := n.Bitmap(other); !ok || !b.Recording {
		t.Fatalf("another site's generation %q was removed or disabled: %+v", other, n.Bitmaps)
	}
	// Another tool removes our generation: the next point resyncs, and is exact.
	if err := m.RemoveBitmap(ctx(t), "vda", diskNamed(t, pt, "vda").Generation); err != nil {
		t.Fatal(err)
	}
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	if d := diskNamed(t, r.cycle(t), "vda"); !d.Resync {
		t.Fatalf("disk vda taken incrementally after its generation was removed")
	}
}

// Site ownership: a second protected site with a certificate from the same
// CA, protecting a different VM of the same name, is refused on every call,
// and the first site's replica is untouched; a site that owns nothing cannot
// read another's points; a recovery site presenting another site's
// certificate is refused by the protected site.
func TestSiteOwnership(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)

	// Site "branch": its own VM, also called vm1.
	vm2 := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: vdaSize})
	g2, err := workload.Open(ctx(t), vm2.NBDSocket(), testenv.Seed(t)^1, workload.Disk{Name: "vda", Size: vdaSize})
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if err := g2.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	branch := r.site.DialAs(t, "branch", wire.CompressionZstd)
	p2 := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: vm2.QMPSocket(), NBDSocket: vm2.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: branch,
	}
	_, err = p2.Cycle(ctx(t))
	if status.Code(errors.Unwrap(err)) != codes.PermissionDenied && !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("site branch's cycle of its own vm1: %v, want PermissionDenied", err)
	}
	for _, want := range []string{`"prod"`, `"branch"`, "lifeboat handover vm1 --to branch"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("the refusal does not say %s: %v", want, err)
		}
	}
	// Not even a point stream that skips Latest gets in.
	st, err := branch.Begin(ctx(t), lifeboat.Point{VM: "vm1", ID: 9, Disks: []lifeboat.PointDisk{
		{Name: "vda", Size: vdaSize, Resync: true, Lineage: "0123456789abcdef"}}})
	if err == nil {
		_, err = st.Commit(lifeboat.CycleStats{})
	}
	if status.Code(errors.Unwrap(err)) != codes.PermissionDenied && !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("a point from site branch: %v, want PermissionDenied", err)
	}
	if _, err := branch.Points(ctx(t), "vm1"); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("site branch listed prod's points of vm1: %v", err)
	}
	if _, err := branch.BlockMap(ctx(t), "vm1", "vda"); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("site branch read prod's block map of vm1: %v", err)
	}
	// prod's replica is untouched and its next cycle exact and incremental.
	if pts := r.points(t); len(pts) != 1 {
		t.Fatalf("vm1 has %d points after site branch's attempts, want 1", len(pts))
	}
	if _, err := r.guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	if d := diskNamed(t, r.cycle(t), "vda"); d.Resync {
		t.Fatal("prod's vm1 was resynced after site branch's attempts")
	}
	// After an explicit handover, branch owns vm1 and prod is refused.
	if _, err := r.site.Store.Handover("vm1", "branch"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.p.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), `belongs to site "branch"`) {
		t.Fatalf("prod's cycle after handing vm1 to branch: %v", err)
	}
	if o, _, _ := r.site.Store.Owner("vm1"); o.Site != "branch" || o.Epoch != 2 {
		t.Fatalf("owner after handover: %+v, want branch at epoch 2", o)
	}
}

// A recovery site is trusted only with its own certificate: a server holding
// another site's (same CA) is refused by the protected site before any call.
func TestRecoverySiteImpersonated(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	impostor := testsite.StartAs(t, site, "prod2", recovery.Options{})
	_, err := impostor.Client(context.Background(), wire.CompressionNone)
	if err == nil || !strings.Contains(strings.ReplaceAll(err.Error(), `\"`, `"`), `names site "prod2", not "dr"`) {
		t.Fatalf("dialling dr reached a server with prod2's certificate: %v", err)
	}
}

// A cycle fails after its instant, and meanwhile another tool removed the
// cycle's new generation (it records, it is not busy: QEMU lets it go). The
// rollback cannot merge it back into the base; done step by step it enabled
// the base first and left it recording and trusted without the writes made
// since the instant, so the next cycle was incremental and missed them. In
// one transaction the base stays disabled, and the next cycle resyncs, byte-
// exact (r.cycle compares the point with the source at its instant).
func TestRollbackWithoutItsNewGeneration(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	m := r.vm.Monitor()
	r.p.Hooks.BeforeCommit = func(context.Context) error {
		// The guest writes after the instant: only the new generation has it.
		if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
			t.Fatal(err)
		}
		n, err := m.Node(ctx(t), "vda")
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range n.Bitmaps {
			if strings.HasSuffix(b.Name, "@"+r.p.Target.Peer()) && b.Recording {
				if err := m.RemoveBitmap(ctx(t), "vda", b.Name); err != nil { // another tool
					t.Fatal(err)
				}
			}
		}
		return errors.New("test: the cycle fails before its commit")
	}
	if _, err := r.p.Cycle(ctx(t)); err == nil {
		t.Fatal("the cycle succeeded")
	}
	r.p.Hooks.BeforeCommit = nil
	pt := r.cycle(t)
	if vda := diskNamed(t, pt, "vda"); !vda.Resync {
		t.Fatalf("point %d: vda incremental from a base that missed the writes of a removed generation, want a resync", pt.ID)
	}
}

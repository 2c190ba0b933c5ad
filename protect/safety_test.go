package protect_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// smallFS is a 40 MiB file system of the kind given (see testenv.SmallFS).
func smallFS(t *testing.T, kind string) string { return testenv.SmallFS(t, kind, 40) }

// fillUp writes path until its file system is full: a neighbour taking every
// free byte of state_dir while a cycle runs.
func fillUp(t *testing.T, path string) { testenv.FillUp(t, path, 64) }

// With the fleece directory (VM.WorkDir) on a 40 MiB file system that a
// neighbour fills up after the instant, the guest overwrites its disk while the
// cycle reads. Copy-before-write must never fail the guest's write: every one
// succeeds, the cycle is abandoned with an error that says why and what to do,
// no point is committed, a cycle is refused (before any instant) while the file
// system is full, and once there is room the next cycle is incremental (the
// generation survived) and byte-exact.
func TestFleeceNeverFailsGuestWrites(t *testing.T) {
	kinds := []string{"tmpfs", "ext4"}
	if testing.Short() {
		kinds = kinds[:1] // the race detector's run: the watch's concurrency is the same on both
	}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) { testFleeceNeverFailsGuestWrites(t, kind) })
	}
}

func testFleeceNeverFailsGuestWrites(t *testing.T, kind string) {
	// 512 MiB as in the report under LIFEBOAT_LONG=1; otherwise more than the
	// file system holds, which fails the guest just the same without the fix:
	// 64 MiB, or 48 MiB under -short (the race detector's run).
	vdaSize, vdbSize := int64(64<<20), int64(4<<20)
	switch {
	case !testenv.Short():
		vdaSize = 512 << 20
	case testing.Short():
		vdaSize = 48 << 20
	}
	start := time.Now()
	work := smallFS(t, kind)
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: vdaSize},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: vdbSize})
	site := testsite.Start(t, recovery.Options{Keep: 100})
	p := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), WorkDir: work},
		Target: site.Dial(t, wire.CompressionNone), Readers: 4, Connections: 2,
		// The defaults (256 MiB left free, 128 MiB at least per disk) would
		// refuse every cycle on 40 MiB: here the overlays share all the space
		// above a 4 MiB floor (vdb's whole overlay needs 8 MiB, vda gets the rest).
		Safety: protect.Safety{FleeceFloor: 4 << 20, FleeceShare: 1, FleeceMinBudget: 4 << 20},
	}
	disks := []workload.Disk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}}
	g, err := workload.Open(ctx(t), vm.NBDSocket(), testenv.Seed(t), disks...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	r := &rig{vm: vm, site: site, guest: g, disks: disks, p: p}

	// Every block written, then an initial sync.
	if err := g.Fill(ctx(t), 1); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Cycle(ctx(t)); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: initial sync of %d MiB done at %v", kind, (vdaSize+vdbSize)>>20, time.Since(start).Round(time.Millisecond))

	// While the cycle reads the fleece: a neighbour takes every free byte of
	// the file system, then the guest overwrites all of vda and vdb.
	neighbour := filepath.Join(work, "neighbour")
	var guestErr error
	p.Hooks.AfterPlan = func(context.Context) error {
		fillUp(t, neighbour)
		// Not the hook's context: the cycle's end must not stop the guest.
		guestErr = g.Fill(ctx(t), 1)
		return nil
	}
	_, err = p.Cycle(ctx(t))
	p.Hooks.AfterPlan = nil
	if guestErr != nil {
		t.Fatalf("a guest write failed during the cycle: %v", guestErr)
	}
	if err == nil {
		t.Fatal("the cycle committed a point although its fleece could not hold the overwritten data")
	}
	t.Logf("cycle error: %v", err)
	if !errors.Is(err, qemu.ErrFleeceFull) {
		t.Errorf("cycle error does not wrap qemu.ErrFleeceFull: %v", err)
	}
	for _, want := range []string{`vm "vm1"`, "abandoned", work, "give state_dir more space", "interval", "no change is lost"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("cycle error does not say %q: %v", want, err)
		}
	}
	if pts := r.points(t); len(pts) != 1 {
		t.Fatalf("%d points after the abandoned cycle, want 1", len(pts))
	}
	assertNoFleece(t, vm.Monitor(), work)

	// While the file system is full again: refused before the instant, the
	// guest unharmed.
	fillUp(t, neighbour+"2")
	_, err = p.Cycle(ctx(t))
	if err == nil || !strings.Contains(err.Error(), "not starting a cycle") || !strings.Contains(err.Error(), work) ||
		!strings.Contains(err.Error(), "give state_dir more space") {
		t.Fatalf("cycle on a full fleece directory: %v, want a refusal naming %s and the fix", err, work)
	}
	t.Logf("refusal: %v", err)
	if err := g.Fill(ctx(t), 0.01); err != nil {
		t.Fatalf("guest write after the refused cycle: %v", err)
	}
	assertNoFleece(t, vm.Monitor(), work)

	// Room again: the next cycle sends everything since point 1, from the
	// surviving generation (no resync), and matches the source.
	for _, f := range []string{neighbour, neighbour + "2"} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	// An overlay a dead lifeboat left, still holding its reservation, must not
	// count against the next cycle.
	fillUp(t, filepath.Join(work, "vm1-vda-fleece.qcow2"))
	pt := r.cycle(t)
	if pt.ID != 2 {
		t.Errorf("point %d after the abandoned cycle, want 2", pt.ID)
	}
	for _, d := range pt.Disks {
		if d.Resync {
			t.Errorf("disk %s was resynchronised: the abandoned cycle lost its generation", d.Name)
		}
	}
	if pt.Stats.BytesChanged < vdaSize {
		t.Errorf("point 2 sent %d changed bytes, want at least the %d overwritten during the abandoned cycle", pt.Stats.BytesChanged, vdaSize)
	}
	assertNoFleece(t, vm.Monitor(), work)
	t.Logf("took %v", time.Since(start).Round(time.Millisecond))
}

// assertNoFleece checks that no fleece is left: no lifeboat node, job or
// copy-before-write filter in QEMU, no overlay file in the fleece directory.
func assertNoFleece(t *testing.T, m *qemu.Monitor, dir string) {
	t.Helper()
	testvm.AssertNoLeftovers(t, m)
	left, _ := filepath.Glob(filepath.Join(dir, "*fleece*"))
	if len(left) > 0 {
		t.Errorf("fleece overlays left in %s: %v", dir, left)
	}
}

// A cycle whose fleece transaction runs in QEMU but whose reply it never gets
// (its context ends: the site's stop, or the command timeout while QEMU
// drains slow storage for the transaction) must not leave the fleece behind:
// the backup job's copy-before-write filter would stay in the guest's write
// path, unwatched, after the cycle returned, copying every first write into
// state_dir with no bound (and a full state_dir then fails the guest's
// writes). The reply is lost by a proxy in front of the real QMP socket: no
// real QEMU can be made to lose it on demand. The cycle must remove every job,
// node and overlay of its own, and keep every write since point 1 (including
// those after the lost instant) for the next cycle, which is incremental and
// byte-exact.
func TestTransactionReplyLostLeavesNoFilter(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	var logs testenv.LogBuffer
	r.p.Log = slog.New(slog.NewTextHandler(&logs, nil))
	cctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	qmp := r.p.VM.QMPSocket
	r.p.VM.QMPSocket = r.vm.LossyQMPSocket(t, testvm.LostCommand{
		Match: func(cmd []byte) bool {
			return strings.Contains(string(cmd), `"transaction"`) && strings.Contains(string(cmd), "blockdev-backup")
		},
		Ran: true,
		Lost: func() {
			// QEMU has run the transaction: the guest writes after the
			// instant (into the new generation), then the cycle is cancelled.
			if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
				t.Error(err)
			}
			cancel()
		},
	})
	_, err := r.p.Cycle(cctx)
	if !errors.Is(err, qemu.ErrOutcomeUnknown) || !errors.Is(err, context.Canceled) {
		t.Errorf("cycle = %v; want an error saying the transaction's outcome is unknown, from the cancel", err)
	}
	t.Logf("cycle: %v", err)
	testvm.AssertNoLeftovers(t, r.vm.Monitor())
	overlays, _ := filepath.Glob(filepath.Join(r.p.VM.WorkDir, "*-fleece.qcow2"))
	if len(overlays) > 0 {
		t.Errorf("fleece overlays left after the cycle returned: %v", overlays)
	}
	if l := logs.String(); !strings.Contains(l, "vm=vm1") || !strings.Contains(l, "vda=vda") || !strings.Contains(l, "had run it") {
		t.Errorf("no warning naming the VM, its disks and what QEMU had done:\n%s", l)
	}
	if len(r.points(t)) != 1 {
		t.Fatalf("%d points after the failed cycle, want 1", len(r.points(t)))
	}
	r.p.VM.QMPSocket = qmp
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	for _, d := range pt.Disks {
		if d.Resync {
			t.Errorf("disk %s resynchronised after the lost reply; want incremental (its generations intact)", d.Name)
		}
	}
}

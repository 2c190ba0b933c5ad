package qemu_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestFleece(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 4 << 20},
	)
	m, ctx := vm.Monitor(), testCtx(t)
	if err := m.AddBitmap(ctx, "vda", "g1", true, false); err != nil {
		t.Fatal(err)
	}
	if err := m.AddBitmap(ctx, "vdb", "g1", false, false); err != nil {
		t.Fatal(err)
	}
	// Writes before the instant: in g1, and what the fleece must show.
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 0xa1 0 64k", "write -P 0xa2 1M 128k")
	qemuIO(t, false, vm.NBDURI("vdb"), "write -P 0xb1 2M 64k")

	f, err := m.StartFleece(ctx, []qemu.FleeceDisk{
		{Node: "vda", File: filepath.Join(vm.Dir, "fa.qcow2"), NewBitmap: "g2", OldBitmap: "g1", Persistent: true, ExportName: "fleece-vda"},
		{Node: "vdb", File: filepath.Join(vm.Dir, "fb.qcow2"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "fleece-vdb"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if f.Instant().IsZero() {
		t.Error("Instant() is zero")
	}
	torn := false
	t.Cleanup(func() {
		if !torn {
			f.Teardown(context.Background())
		}
	})

	// The disks are still the VM's two disks while the fleece runs.
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := diskNames(disks); got != "vda,vdb" {
		t.Errorf("Disks() during a fleece = %s, want vda,vdb", got)
	}

	// The guest overwrites after the instant.
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 0xee 0 64k", "write -P 0xef 4M 64k")
	qemuIO(t, false, vm.NBDURI("vdb"), "write -P 0xee 2M 64k")

	// The fleece still shows the instant.
	qemuIO(t, true, vm.NBDURI("fleece-vda"), "read -P 0xa1 0 64k", "read -P 0xa2 1M 128k", "read -P 0 4M 64k")
	qemuIO(t, true, vm.NBDURI("fleece-vdb"), "read -P 0xb1 2M 64k")
	// The disk itself shows the new data (so the check above could fail).
	qemuIO(t, true, vm.NBDURI("vda"), "read -P 0xee 0 64k")

	// The published generation holds exactly the writes before the instant.
	if got := extents(dirtyMap(t, vm.NBDURI("fleece-vda"), "g1")); got != "0+65536 1048576+131072" {
		t.Errorf("g1 on fleece-vda: dirty %s, want 0+65536 1048576+131072", got)
	}
	if got := extents(dirtyMap(t, vm.NBDURI("fleece-vdb"), "g1")); got != "2097152+65536" {
		t.Errorf("g1 on fleece-vdb: dirty %s, want 2097152+65536", got)
	}
	// The new generation holds the writes after it.
	n, err := m.Node(ctx, "vda")
	if err != nil {
		t.Fatal(err)
	}
	g1, _ := n.Bitmap("g1")
	g2, ok := n.Bitmap("g2")
	if !ok || !g2.Recording || !g2.Persistent || g2.Count != 128<<10 {
		t.Errorf("g2 on vda = %+v (present %v); want recording, persistent, 131072 dirty", g2, ok)
	}
	if g1.Recording || !g1.Busy {
		t.Errorf("g1 on vda = %+v; want disabled and busy (published)", g1)
	}

	if err := f.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	torn = true
	testvm.AssertNoLeftovers(t, m)
	for _, p := range []string{"fa.qcow2", "fb.qcow2"} {
		if _, err := os.Stat(filepath.Join(vm.Dir, p)); !os.IsNotExist(err) {
			t.Errorf("fleece overlay %s not removed: %v", p, err)
		}
	}
	// Bitmaps are the caller's: both generations still there, g1 no longer busy.
	n, _ = m.Node(ctx, "vda")
	if g1, ok := n.Bitmap("g1"); !ok || g1.Busy {
		t.Errorf("g1 after teardown = %+v (present %v); want present, not busy", g1, ok)
	}
	if err := f.Teardown(ctx); err != nil {
		t.Errorf("second Teardown: %v", err)
	}
}

func TestFleeceFirstSync(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 7 0 64k")
	f, err := m.StartFleece(ctx, []qemu.FleeceDisk{
		{Node: "vda", File: filepath.Join(vm.Dir, "f.qcow2"), NewBitmap: "g1", Persistent: true, ExportName: "fl"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Teardown(ctx)
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 8 0 64k")
	qemuIO(t, true, vm.NBDURI("fl"), "read -P 7 0 64k")
	if err := f.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	testvm.AssertNoLeftovers(t, m)
}

func TestStartFleeceFailureUndoes(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20},
		testvm.DiskSpec{Name: "vdb", Format: "qcow2", Size: 1 << 20},
	)
	m, ctx := vm.Monitor(), testCtx(t)
	for _, d := range []string{"vda", "vdb"} {
		if err := m.AddBitmap(ctx, d, "g1", true, false); err != nil {
			t.Fatal(err)
		}
	}
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 1 0 64k")
	file := func(n string) string { return filepath.Join(vm.Dir, n) }

	for i, tc := range []struct {
		name  string
		disks []qemu.FleeceDisk
		want  string // in the error
	}{
		{"node does not exist", []qemu.FleeceDisk{
			{Node: "vda", File: file("fa"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "fa"},
			{Node: "vdz", File: file("fz"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "fz"},
		}, `"vdz" not found`},
		{"old bitmap missing", []qemu.FleeceDisk{
			{Node: "vda", File: file("fa"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "fa"},
			{Node: "vdb", File: file("fb"), NewBitmap: "g2", OldBitmap: "g0", ExportName: "fb"},
		}, "g0"},
		{"export name taken (fails after the transaction)", []qemu.FleeceDisk{
			{Node: "vda", File: file("fa"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "fa"},
			{Node: "vdb", File: file("fb"), NewBitmap: "g2", OldBitmap: "g1", ExportName: "vda"},
		}, "vda"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Writes between tries must survive the undo in g1.
			qemuIO(t, false, vm.NBDURI("vdb"), fmt.Sprintf("write -P 2 %d 64k", (i+1)<<16))
			before := bitmapsOf(t, ctx, m)
			f, err := m.StartFleece(ctx, tc.disks)
			if err == nil {
				f.Teardown(ctx)
				t.Fatal("StartFleece succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if after := bitmapsOf(t, ctx, m); after != before {
				t.Errorf("bitmaps before: %s\nafter the failed fleece: %s", before, after)
			}
			testvm.AssertNoLeftovers(t, m)
			for _, n := range []string{"fa", "fb", "fz"} {
				if _, err := os.Stat(file(n)); !os.IsNotExist(err) {
					t.Errorf("overlay %s left behind", n)
				}
			}
		})
	}
}

func bitmapsOf(t *testing.T, ctx context.Context, m *qemu.Monitor) string {
	t.Helper()
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, d := range disks {
		for _, b := range d.Bitmaps {
			s = append(s, fmt.Sprintf("%s/%s count=%d rec=%v busy=%v", d.NodeName, b.Name, b.Count, b.Recording, b.Busy))
		}
	}
	return strings.Join(s, "; ")
}

func diskNames(disks []qemu.BlockNode) string {
	var names []string
	for _, d := range disks {
		names = append(names, d.NodeName)
	}
	return strings.Join(names, ",")
}

func extents(es []extent) string {
	var s []string
	for _, e := range es {
		s = append(s, fmt.Sprintf("%d+%d", e.Offset, e.Length))
	}
	return strings.Join(s, " ")
}

// TestRemoveStale plays a lifeboat that died with a fleece up: the Fleece
// value is dropped without Teardown, and RemoveStale must clear QEMU.
func TestRemoveStale(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	if err := m.AddBitmap(ctx, "vda", "g1", true, false); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(vm.Dir, "stale.qcow2")
	if _, err := m.StartFleece(ctx, []qemu.FleeceDisk{{Node: "vda", File: file, NewBitmap: "g2", OldBitmap: "g1", ExportName: "fl"}}); err != nil {
		t.Fatal(err)
	}
	// A client still connected to the stale export must not block removal.
	connectedClient(t, vm.NBDURI("fl"))
	if _, err := m.RemoveStale(ctx, nil); err != nil {
		t.Fatal(err)
	}
	testvm.AssertNoLeftovers(t, m)
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("stale overlay not removed: %v", err)
	}
	if b, _ := bitmap(t, ctx, m, "vda", "g1"); b.Busy {
		t.Errorf("g1 still busy after RemoveStale: %+v", b)
	}
	// The next cycle can fleece again.
	f, err := m.StartFleece(ctx, []qemu.FleeceDisk{{Node: "vda", File: file, NewBitmap: "g3", OldBitmap: "g2", ExportName: "fl"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := m.RemoveStale(ctx, nil); err != nil {
		t.Errorf("RemoveStale with nothing stale: %v", err)
	}
}

// A dead lifeboat's NBD server is the one this QEMU runs on lifeboat's own
// socket: RemoveStale stops it, and only it. With nothing on lifeboat's
// socket, or another process listening there, this QEMU's server (its own,
// elsewhere) and the other's are left alone.
func TestRemoveStaleStopsOnlyOwnNBDServer(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	other := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	running := func(m *qemu.Monitor, whose string) {
		t.Helper()
		if err := m.NBDServerStart(ctx, filepath.Join(vm.Dir, "probe.sock")); !errors.Is(err, qemu.ErrNBDServerRunning) {
			t.Fatalf("%s NBD server was stopped (start: %v)", whose, err)
		}
	}
	for _, sock := range []string{filepath.Join(vm.Dir, "nobody.sock"), other.NBDSocket()} {
		if ours, err := m.ServesNBD(ctx, sock); err != nil || ours {
			t.Errorf("ServesNBD(%s) = %v, %v; want false: this QEMU does not listen there", sock, ours, err)
		}
		if _, err := m.RemoveStale(ctx, nil, sock); err != nil {
			t.Fatal(err)
		}
		running(m, "the VM's own")
		running(other.Monitor(), "another QEMU's")
	}
	if ours, err := m.ServesNBD(ctx, vm.NBDSocket()); err != nil || !ours {
		t.Fatalf("ServesNBD(%s) = %v, %v; want true: this QEMU listens there", vm.NBDSocket(), ours, err)
	}
	if _, err := m.RemoveStale(ctx, nil, vm.NBDSocket()); err != nil {
		t.Fatal(err)
	}
	if err := m.NBDServerStart(ctx, filepath.Join(vm.Dir, "next.sock")); err != nil {
		t.Fatalf("the server on the socket given to RemoveStale still runs: %v", err)
	}
	if err := m.NBDServerStop(ctx); err != nil {
		t.Fatal(err)
	}
}

// A fleece with a budget reserves it for its overlay before the instant, and
// breaks itself once the overlay outgrows half of it: the guest's writes go on
// (the copy-before-write filter left their path), the export is gone, Err says
// why, and Teardown still cleans up.
func TestFleeceBudget(t *testing.T) {
	const budget = 4 << 20
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 32 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 1 0 8M")
	file := filepath.Join(vm.Dir, "f.qcow2")
	f, err := m.PrepareFleece(ctx, []qemu.FleeceDisk{{Node: "vda", File: file, NewBitmap: "g1", ExportName: "fl", Budget: budget}})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Teardown(ctx)
	var st syscall.Stat_t
	if err := syscall.Stat(file, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 < budget || st.Size >= budget {
		t.Errorf("overlay before the instant: %d bytes allocated, size %d; want the %d-byte budget allocated past a small size", st.Blocks*512, st.Size, budget)
	}
	if err := f.Snapshot(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.Export(ctx); err != nil {
		t.Fatal(err)
	}
	// Under the watermark: the fleece holds.
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 2 0 1M")
	select {
	case <-f.Broken():
		t.Fatalf("fleece broke after 1 MiB of a %d-byte budget: %v", budget, f.Err())
	case <-time.After(200 * time.Millisecond):
	}
	qemuIO(t, true, vm.NBDURI("fl"), "read -P 1 0 1M")
	// Past it: every guest write succeeds, and the fleece breaks.
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 3 0 8M")
	select {
	case <-f.Broken():
	case <-time.After(10 * time.Second):
		t.Fatal("fleece did not break 10 s after its overlay outgrew its budget")
	}
	if err := f.Err(); !errors.Is(err, qemu.ErrFleeceFull) || !strings.Contains(err.Error(), file) {
		t.Errorf("Err() = %v, want ErrFleeceFull naming %s", err, file)
	}
	jobs, err := m.Jobs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 0 {
		t.Errorf("jobs after the break: %+v, want none (the filter out of the write path)", jobs)
	}
	if err := tryQemuIO(t, true, vm.NBDURI("fl"), "read 0 64k"); err == nil {
		t.Error("the broken fleece's export still serves reads")
	}
	qemuIO(t, false, vm.NBDURI("vda"), "write -P 4 0 8M")
	qemuIO(t, true, vm.NBDURI("vda"), "read -P 4 0 8M")
	if err := f.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	testvm.AssertNoLeftovers(t, m)
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("overlay not removed: %v", err)
	}
}

// A fleece transaction whose reply is lost (the caller's context ended: a
// site's stop, the command timeout while QEMU drains slow storage) may or may
// not have run in QEMU. Snapshot must find out and undo what it ran: no
// backup job (its copy-before-write filter would stay in the guest's write
// path with no watch), no node, no overlay, and the generations as before,
// with every write since the instant kept in the old one.
func TestSnapshotReplyLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		ran  bool // QEMU got the transaction and ran it; else it never saw it
		want string
	}{
		{"reply lost", true, "had run it"},
		{"command lost", false, "had not run it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := testvm.Start(t,
				testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 4 << 20},
				testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 4 << 20},
			)
			ctx := testCtx(t)
			for _, d := range []string{"vda", "vdb"} {
				if err := vm.Monitor().AddBitmap(ctx, d, "g1", d == "vda", false); err != nil {
					t.Fatal(err)
				}
				qemuIO(t, false, vm.NBDURI(d), "write -P 1 0 64k")
			}
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			lossy := vm.LossyQMPSocket(t, testvm.LostCommand{
				Match: func(cmd []byte) bool { return strings.Contains(string(cmd), "blockdev-backup") },
				Ran:   tc.ran,
				Lost: func() {
					// A guest write after the instant (when it ran), then
					// the caller gives up waiting.
					for _, d := range []string{"vda", "vdb"} {
						qemuIO(t, false, vm.NBDURI(d), "write -P 2 1M 64k")
					}
					cancel()
				},
			})
			m, err := qemu.Dial(ctx, lossy)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			file := func(n string) string { return filepath.Join(vm.Dir, n) }
			f, err := m.PrepareFleece(ctx, []qemu.FleeceDisk{
				{Node: "vda", File: file("fa"), NewBitmap: "g2", OldBitmap: "g1", Persistent: true, Budget: 2 << 20},
				{Node: "vdb", File: file("fb"), NewBitmap: "g2", OldBitmap: "g1", Budget: 2 << 20},
			})
			if err != nil {
				t.Fatal(err)
			}
			err = f.Snapshot(sctx)
			if !errors.Is(err, qemu.ErrOutcomeUnknown) || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Snapshot = %v; want ErrOutcomeUnknown, context.Canceled and %q", err, tc.want)
			}
			t.Logf("Snapshot: %v", err)
			testvm.AssertNoLeftovers(t, vm.Monitor())
			for _, n := range []string{"fa", "fb"} {
				if _, err := os.Stat(file(n)); !os.IsNotExist(err) {
					t.Errorf("overlay %s left behind", n)
				}
			}
			// Both writes, before and after the instant, are in g1, which
			// records again; g2 is gone.
			for _, d := range []string{"vda", "vdb"} {
				n, err := vm.Monitor().Node(ctx, d)
				if err != nil {
					t.Fatal(err)
				}
				if g1, ok := n.Bitmap("g1"); !ok || !g1.Recording || g1.Busy || g1.Count != 128<<10 {
					t.Errorf("%s: g1 = %+v (present %v); want recording, not busy, 131072 bytes dirty", d, g1, ok)
				}
				if g2, ok := n.Bitmap("g2"); ok {
					t.Errorf("%s: g2 left behind: %+v", d, g2)
				}
			}
			// The guest writes on, and QEMU copies nothing anywhere.
			qemuIO(t, false, vm.NBDURI("vda"), "write -P 3 0 1M")
		})
	}
}

package failback_test

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// The production VM's disks: a qcow2 one, whose generations persist, and a
// raw one, whose do not.
var disks = []workload.Disk{{Name: "vda", Size: 32 << 20}, {Name: "vdb", Size: 16 << 20}}

func ctx(t *testing.T) context.Context { return testenv.Context(t, 2*time.Minute) }

// replicated is a production VM protected to a recovery site, two points
// sent, and then written more (the writes after its last point, as a
// production host makes before it dies).
type replicated struct {
	vm      *testvm.VM
	site    *testsite.Site
	workDir string // the protector's, with its record of the disks' images
	latest  lifeboat.Point
	peer    string
	after   []workload.Op // the writes after the latest point
}

func replicate(t *testing.T, restart bool) *replicated {
	t.Helper()
	testenv.RequireTools(t, "qemu-storage-daemon", "qemu-img")
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: disks[0].Name, Format: "qcow2", Size: disks[0].Size},
		testvm.DiskSpec{Name: disks[1].Name, Format: "raw", Size: disks[1].Size})
	site := testsite.Start(t, recovery.Options{})
	target := site.Dial(t, wire.CompressionZstd)
	p := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: target, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
	g, err := workload.Open(ctx(t), vm.NBDSocket(), testenv.Seed(t), disks...)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := g.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r := &replicated{vm: vm, site: site, peer: target.Peer(), workDir: p.VM.WorkDir}
	for range 2 {
		if _, err := g.Mixed(ctx(t), 10); err != nil {
			t.Fatal(err)
		}
		if r.latest, err = p.Cycle(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	if restart {
		// Stored in the images at a clean stop, the generations are in use
		// once the VM runs again: a crash from here leaves them inconsistent.
		g.Close()
		vm.Restart(t)
		if g, err = workload.Open(ctx(t), vm.NBDSocket(), testenv.Seed(t)+1, disks...); err != nil {
			t.Fatal(err)
		}
		defer g.Close()
	}
	if r.after, err = g.Mixed(ctx(t), 15); err != nil {
		t.Fatal(err)
	}
	// Mixed picks disks at random: make sure each one changed, whatever the draw.
	for _, d := range disks {
		op := workload.Op{Disk: d.Name, Kind: "data", Offset: 1 << 20, Length: 2 * lifeboat.BlockSize}
		if err := g.Do(ctx(t), op); err != nil {
			t.Fatal(err)
		}
		r.after = append(r.after, op)
	}
	return r
}

// open opens the production VM's disks for a failback (the VM stopped).
func (r *replicated) open(t *testing.T) *failback.Production {
	t.Helper()
	ds, err := protect.ReadImages(r.workDir)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range r.vm.Disks {
		if want := (failback.Disk{Name: d.Name, File: r.vm.ImagePath(d.Name), Format: d.Format}); i >= len(ds) || ds[i] != want {
			t.Fatalf("the protector's record of the disks' images is %+v, want %+v at %d", ds, want, i)
		}
	}
	p, err := failback.Open(ctx(t), testsite.ShortDir(t), "vm1", ds, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(context.Background()) })
	return p
}

func (r *replicated) shared(t *testing.T, disk string) failback.Shared {
	for _, d := range r.latest.Disks {
		if d.Name == disk {
			return failback.Shared{Peer: r.peer, Lineage: d.Lineage, Point: r.latest.ID, Generation: d.Generation}
		}
	}
	t.Fatalf("the latest point has no disk %q", disk)
	return failback.Shared{}
}

// changes is the set of blocks Changes reports for a disk.
func changes(t *testing.T, p *failback.Production, disk string, sh failback.Shared) (map[int64]bool, error) {
	got := map[int64]bool{}
	err := p.Changes(ctx(t), disk, sh, func(off, length int64) error {
		for b := off / lifeboat.BlockSize; b*lifeboat.BlockSize < off+length; b++ {
			got[b] = true
		}
		return nil
	})
	return got, err
}

// After a clean stop, a production qcow2 disk's generations say which blocks
// it wrote after its latest point: every block a write or a write of zeros
// touched, and nothing outside the blocks some request touched (a discard
// may change a block or not: the image may ignore it). A raw disk has no
// record left and says so. The scan leaves the disk's bitmaps as they were.
func TestChangesSinceTheSharedPoint(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	p := r.open(t)
	var writes []workload.Op
	for _, op := range r.after {
		if op.Kind != "trim" {
			writes = append(writes, op)
		}
	}
	must, may := workload.Touched(writes)["vda"], workload.Touched(r.after)["vda"]

	got, err := changes(t, p, "vda", r.shared(t, "vda"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vda: %d blocks written after point %d, %d touched by any request, %d reported", len(must), r.latest.ID, len(may), len(got))
	for b := range must {
		if !got[b] {
			t.Errorf("vda: block %d was written after the point and is not reported", b)
		}
	}
	for b := range got {
		if !may[b] {
			t.Errorf("vda: block %d is reported, and no request touched it", b)
		}
	}

	_, err = changes(t, p, "vdb", r.shared(t, "vdb"))
	if !errors.Is(err, failback.ErrNoRecord) || !strings.Contains(err.Error(), "is not on the disk") {
		t.Errorf("raw vdb, whose bitmaps died with its QEMU: %v, want ErrNoRecord saying the generation is gone", err)
	}

	// A wrong generation name proves nothing.
	sh := r.shared(t, "vda")
	sh.Generation = lifeboat.NewGeneration(sh.Peer, sh.Lineage, sh.Point)
	if _, err := changes(t, p, "vda", sh); !errors.Is(err, failback.ErrNoRecord) {
		t.Errorf("vda under another generation's name: %v, want ErrNoRecord", err)
	}
	// And the scans left nothing behind: the same answer again.
	again, err := changes(t, p, "vda", r.shared(t, "vda"))
	if err != nil || !maps.Equal(again, got) {
		t.Errorf("a second scan: %d blocks, %v; the first found %d", len(again), err, len(got))
	}
}

// After a crash (kill -9 of the production QEMU, which is not started again)
// the generations are inconsistent: no record, and the reason says so.
// (Generations made since the QEMU started were never stored in the image:
// those are simply gone, TestChangesSinceTheSharedPoint's raw disk case.)
func TestChangesAfterACrash(t *testing.T) {
	r := replicate(t, true)
	r.vm.Kill(t)
	p := r.open(t)
	_, err := changes(t, p, "vda", r.shared(t, "vda"))
	if !errors.Is(err, failback.ErrNoRecord) || !strings.Contains(err.Error(), "inconsistent") {
		t.Fatalf("vda after a crash: %v, want ErrNoRecord saying the generation is inconsistent", err)
	}
	if _, err := changes(t, p, "vdc", r.shared(t, "vda")); err == nil || !strings.Contains(err.Error(), `no disk "vdc"`) {
		t.Errorf("a disk production does not have: %v", err)
	}
	r.checkDiffering(t, p, "vda")
	r.checkDiffering(t, p, "vdb")
	names := slices.Sorted(maps.Keys(p.Clients()))
	if !slices.Equal(names, []string{"vda", "vdb"}) {
		t.Errorf("the failback's targets are %v, want vda and vdb", names)
	}
}

// checkDiffering compares a disk by hashes with the shared point, as a
// failback does when production has no record of its writes, and checks the
// blocks found against a full comparison of the two, block by block.
func (r *replicated) checkDiffering(t *testing.T, p *failback.Production, disk string) {
	t.Helper()
	point, err := r.site.Store.BlockMap("vm1", disk, r.latest.ID)
	if err != nil {
		t.Fatal(err)
	}
	prod := map[int64]lifeboat.Hash{}
	if err := p.Hashes(ctx(t), disk, func(b int64, h lifeboat.Hash) error { prod[b] = h; return nil }); err != nil {
		t.Fatal(err)
	}
	found := map[int64]bool{}
	err = failback.Differing(point, prod, func(off, length int64) error {
		if length != lifeboat.BlockSize || off%lifeboat.BlockSize != 0 {
			t.Errorf("disk %s: range %d+%d is not one block", disk, off, length)
		}
		found[off/lifeboat.BlockSize] = true
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The truth: the point exported whole, against the production disk read whole.
	out := filepath.Join(t.TempDir(), disk+".raw")
	if err := r.site.Store.Export(ctx(t), "vm1", r.latest.ID, disk, out, "raw"); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if err := p.Clients()[disk].Read(ctx(t), got, 0); err != nil {
		t.Fatal(err)
	}
	differ := 0
	for b := int64(0); b*lifeboat.BlockSize < int64(len(want)); b++ {
		lo, hi := b*lifeboat.BlockSize, min((b+1)*lifeboat.BlockSize, int64(len(want)))
		d := !bytes.Equal(want[lo:hi], got[lo:hi])
		if d {
			differ++
		}
		if d != found[b] {
			t.Errorf("disk %s block %d: differs %v, found by hashes %v", disk, b, d, found[b])
		}
	}
	t.Logf("disk %s: %d of %d blocks differ from point %d, found by hashing the %d blocks production holds data in",
		disk, differ, (len(want)+lifeboat.BlockSize-1)/lifeboat.BlockSize, r.latest.ID, len(prod))
	if differ == 0 {
		t.Errorf("disk %s: production wrote nothing that changed it: the comparison proves nothing", disk)
	}
}

// A production lifeboat killed during a failback leaves the daemon over the
// disks running, holding their locks: the next Open in the same directory
// kills it first, and then opens the disks. Killed, that daemon leaves the
// generations inconsistent, so production's own writes are then found by
// hashes. (The first Production stands in for the dead lifeboat's: its
// daemon is the one left.)
func TestOpenKillsALeftoverDaemon(t *testing.T) {
	r := replicate(t, false)
	r.vm.PowerOff(t)
	ds, err := protect.ReadImages(r.workDir)
	if err != nil {
		t.Fatal(err)
	}
	dir := testsite.ShortDir(t)
	first, err := failback.Open(ctx(t), dir, "vm1", ds, nil)
	if err != nil {
		t.Fatal(err)
	}
	second, err := failback.Open(ctx(t), dir, "vm1", ds, nil)
	if err != nil {
		t.Fatalf("opening the disks again with a daemon left in %s: %v", dir, err)
	}
	defer second.Close(context.Background())
	if _, err := changes(t, second, "vda", r.shared(t, "vda")); !errors.Is(err, failback.ErrNoRecord) || !strings.Contains(err.Error(), "inconsistent") {
		t.Errorf("vda after its failback daemon was killed: %v, want no record (inconsistent)", err)
	}
	r.checkDiffering(t, second, "vda")
	if err := first.Close(context.Background()); err == nil {
		t.Error("the first daemon still answered: it was not killed")
	}
}

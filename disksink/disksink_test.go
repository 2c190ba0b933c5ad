package disksink_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/disksink"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/wire"
)

const (
	vdaSize = 48 << 20
	vdbSize = 24 << 20
)

var disks = []workload.Disk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func startVM(t *testing.T) *testvm.VM {
	return testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: vdaSize},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: vdbSize})
}

func dial(t *testing.T, vm *testvm.VM) map[string]*nbd.Client {
	t.Helper()
	out := map[string]*nbd.Client{}
	for _, d := range disks {
		c, err := nbd.Dial(ctx(t), "unix:"+vm.NBDSocket(), d.Name, nbd.Options{Connections: 2, MaxInFlight: 8})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		out[d.Name] = c
	}
	return out
}

// openGuest opens a workload on vm's disks (seed 0 for one that only reads).
func openGuest(t *testing.T, vm *testvm.VM, seed uint64) *workload.Guest {
	t.Helper()
	g, err := workload.Open(ctx(t), vm.NBDSocket(), seed, disks...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return g
}

// protector protects vm (as "vm1") into target.
func protector(t *testing.T, vm *testvm.VM, target protect.Target) *protect.Protector {
	return &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: target, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
}

// diskTarget is protect.Target over disks: each cycle's point goes into the
// same disks, and the last committed point is what they hold (kept in
// memory: this test's target does not outlive it).
type diskTarget struct {
	disks  map[string]*nbd.Client
	latest lifeboat.Point
	sink   *disksink.Sink
}

func (d *diskTarget) Peer() string { return "disk-target" }
func (d *diskTarget) Latest(context.Context, string) (lifeboat.Point, bool, error) {
	return d.latest, d.latest.ID != 0, nil
}
func (d *diskTarget) BlockMap(context.Context, string, string) (map[int64]lifeboat.Hash, error) {
	return nil, nil
}
func (d *diskTarget) Begin(ctx context.Context, p lifeboat.Point) (lifeboat.PointSink, error) {
	s, err := disksink.Open(ctx, p, d.disks)
	d.sink = s
	return committer{s, d}, err
}
func (d *diskTarget) Failover(context.Context, string, uint64) (wire.FailoverResult, error) {
	return wire.FailoverResult{}, errors.New("a disk target does not start VMs")
}

// committer records the committed point as the target's latest.
type committer struct {
	*disksink.Sink
	d *diskTarget
}

func (c committer) Commit(s lifeboat.CycleStats) (lifeboat.Point, error) {
	p, err := c.Sink.Commit(s)
	if err == nil {
		c.d.latest = p
	}
	return p, err
}

// The same cycle that replicates to a recovery site's chain writes, with a
// disk sink, straight into other disks: the first cycle a thin full copy
// into empty disks, later ones only what changed, and after each the target
// disks are byte-identical to the source at the instant.
func TestCycleIntoDisks(t *testing.T) {
	src, dst := startVM(t), startVM(t)
	guest := openGuest(t, src, testenv.Seed(t))
	target := &diskTarget{disks: dial(t, dst)}
	p := protector(t, src, target)
	if err := guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	check := openGuest(t, dst, 0)
	for i := range 4 {
		if i > 0 {
			if _, err := guest.Mixed(ctx(t), 25); err != nil {
				t.Fatal(err)
			}
		}
		want, err := guest.Hashes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("cycle %d: %v", i+1, err)
		}
		got, err := check.Hashes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range disks {
			if got[d.Name] != want[d.Name] {
				t.Fatalf("point %d disk %s: target disk sha256 %s, source at the instant %s", pt.ID, d.Name, got[d.Name][:12], want[d.Name][:12])
			}
		}
		s := pt.Stats
		t.Logf("point %d into disks: changed %d, data %d, zero %d, written %d, zeroed %d",
			pt.ID, s.BytesChanged, s.BytesData, s.BytesZero, target.sink.Written(), target.sink.Zeroed())
		if w := target.sink.Written(); w != s.BytesData+s.BytesDedup {
			t.Errorf("point %d: %d bytes written into the disks, the cycle sent %d data + %d dedup", pt.ID, w, s.BytesData, s.BytesDedup)
		}
		if i == 0 && s.BytesData > (vdaSize+vdbSize)*4/10 {
			t.Errorf("the first copy wrote %d bytes of data for 30%% of %d filled: not thin", s.BytesData, vdaSize+vdbSize)
		}
		if i > 0 && s.BytesChanged >= vdaSize+vdbSize {
			t.Errorf("incremental point %d handled the whole disks (%d bytes)", pt.ID, s.BytesChanged)
		}
	}
}

// What a sink refuses: a block that does not match its hash (and nothing of
// that call reaches the disk), a target of the wrong size or a disk the point
// lacks, a copy from a block the point has not written, anything after Abort.
func TestSinkRefuses(t *testing.T) {
	vm := startVM(t)
	cl := dial(t, vm)
	p := lifeboat.Point{VM: "vm1", ID: 7, Disks: []lifeboat.PointDisk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}}}

	if _, err := disksink.Open(ctx(t), lifeboat.Point{VM: "vm1", ID: 7, Disks: []lifeboat.PointDisk{{Name: "vda", Size: vdaSize + 1<<20}, {Name: "vdb", Size: vdbSize}}}, cl); err == nil ||
		!strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), "resize") {
		t.Errorf("a target of the wrong size: %v, want an error naming the disk and what to do", err)
	}
	if _, err := disksink.Open(ctx(t), lifeboat.Point{VM: "vm1", ID: 7, Disks: []lifeboat.PointDisk{{Name: "vda", Size: vdaSize}}}, cl); err == nil || !strings.Contains(err.Error(), `"vdb"`) {
		t.Errorf("a target disk the point lacks: %v", err)
	}
	if _, err := disksink.Open(ctx(t), lifeboat.Point{VM: "vm1", ID: 7, Disks: []lifeboat.PointDisk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}, {Name: "vdc", Size: 1 << 20}}}, cl); err == nil || !strings.Contains(err.Error(), `"vdc"`) {
		t.Errorf("a point disk without a target: %v", err)
	}

	s, err := disksink.Open(ctx(t), p, cl)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 2*lifeboat.BlockSize)
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(t), 1)), data)
	hashes := []lifeboat.Hash{lifeboat.HashBlock(data[:lifeboat.BlockSize]), lifeboat.HashBlock(data[lifeboat.BlockSize:])}
	bad := append([]lifeboat.Hash(nil), hashes...)
	bad[1][0] ^= 1
	var mm *disksink.HashMismatchError
	if _, err := s.SendBlocks("vda", 0, data, bad); !errors.As(err, &mm) || mm.Offset != lifeboat.BlockSize || mm.Disk != "vda" {
		t.Fatalf("a block with a wrong hash: %v, want a HashMismatchError at offset %d", err, lifeboat.BlockSize)
	}
	back := make([]byte, len(data))
	if err := cl["vda"].Read(ctx(t), back, 0); err != nil {
		t.Fatal(err)
	}
	if !lifeboat.AllZero(back) {
		t.Fatal("a call with a mismatched block wrote some of its blocks")
	}
	if err := s.SendCopy("vdb", 0, "vda", 0, lifeboat.BlockSize, hashes[0]); !errors.Is(err, lifeboat.ErrSourcePending) {
		t.Errorf("a copy from a block not written yet: %v, want ErrSourcePending", err)
	}
	if _, err := s.SendBlocks("vda", 0, data, hashes); err != nil {
		t.Fatal(err)
	}
	if err := s.SendCopy("vdb", 0, "vda", 0, lifeboat.BlockSize, hashes[1]); err == nil || !strings.Contains(err.Error(), "send the block itself") {
		t.Errorf("a copy from a block written with another hash: %v", err)
	}
	if err := s.SendCopy("vdb", lifeboat.BlockSize, "vda", 0, lifeboat.BlockSize, hashes[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SendBlocks("vda", 100, data[:lifeboat.BlockSize], hashes[:1]); err == nil {
		t.Error("a write off the block grid was taken")
	}
	if _, err := s.SendBlocks("vdz", 0, data, hashes); err == nil || !strings.Contains(err.Error(), `"vdz"`) {
		t.Errorf("a write to a disk the point lacks: %v", err)
	}
	pt, err := s.Commit(lifeboat.CycleStats{BytesData: 2 * lifeboat.BlockSize})
	if err != nil || pt.ID != 7 || pt.Stats.BytesData != 2*lifeboat.BlockSize {
		t.Fatalf("commit: %+v, %v", pt, err)
	}
	if err := cl["vdb"].Read(ctx(t), back[:lifeboat.BlockSize], lifeboat.BlockSize); err != nil {
		t.Fatal(err)
	}
	if lifeboat.HashBlock(back[:lifeboat.BlockSize]) != hashes[0] {
		t.Error("the copied block does not hold its source's bytes")
	}
	if _, err := s.SendBlocks("vda", 0, data, hashes); !errors.Is(err, disksink.ErrAborted) {
		t.Errorf("a write after commit: %v, want ErrAborted", err)
	}

	s2, err := disksink.Open(ctx(t), p, cl)
	if err != nil {
		t.Fatal(err)
	}
	s2.Abort()
	if err := s2.SendZeroes("vda", 0, lifeboat.BlockSize); !errors.Is(err, disksink.ErrAborted) {
		t.Errorf("zeroes after abort: %v, want ErrAborted", err)
	}
	if _, err := s2.Commit(lifeboat.CycleStats{}); !errors.Is(err, disksink.ErrAborted) {
		t.Errorf("commit after abort: %v, want ErrAborted", err)
	}
}

// A failback's first cycle: the recovered VM's disks carry a generation that
// its failover started at point 5's instant (named by lifeboat.NewGeneration for
// the production site), and the production disks hold point 5. The unchanged
// cycle takes that generation as its base and writes into the production
// disks only the blocks the recovered VM changed: no disk is read whole, and
// afterwards the production disks are byte-identical to the recovered VM's.
func TestFailbackCycleStartsFromFailoverGeneration(t *testing.T) {
	rec, prod := startVM(t), startVM(t)
	guest := openGuest(t, rec, testenv.Seed(t))
	target := shareAPoint(t, rec, prod, guest)
	ops, err := guest.Mixed(ctx(t), 25)
	if err != nil {
		t.Fatal(err)
	}
	touched := workload.TouchedBytes(ops)
	pt := failbackCycle(t, rec, prod, guest, target)
	if s := pt.Stats; s.BytesChanged > touched {
		t.Errorf("the cycle handled %d bytes, more than the %d in blocks the recovered VM touched", s.BytesChanged, touched)
	}
}

// A failback cycle sends the union of both sides' changes since the point
// they share: the blocks the recovered VM wrote and those the production VM
// wrote after that point, before its site was lost (invariant 5). After it,
// the production disks hold exactly what the recovered VM's hold: none of
// the production-only writes is left. Production's own record of what it
// wrote is here the workload's list of its writes (ChangedTarget); reading
// it from the production disk's bitmap is the production site's part.
func TestFailbackSendsBothSidesChanges(t *testing.T) {
	rec, prod := startVM(t), startVM(t)
	seed := testenv.Seed(t)
	guest := openGuest(t, rec, seed)
	target := shareAPoint(t, rec, prod, guest)
	prodOps, err := openGuest(t, prod, seed^0x5eed).Mixed(ctx(t), 12)
	if err != nil {
		t.Fatal(err)
	}
	recOps, err := guest.Mixed(ctx(t), 12)
	if err != nil {
		t.Fatal(err)
	}
	target.changed = workload.Touched(prodOps)
	union := workload.TouchedBytes(append(recOps, prodOps...))
	pt := failbackCycle(t, rec, prod, guest, target)
	s := pt.Stats
	t.Logf("union of both sides' changes %d bytes (recovered VM %d, production %d); the cycle handled %d",
		union, workload.TouchedBytes(recOps), workload.TouchedBytes(prodOps), s.BytesChanged)
	if s.BytesChanged > union {
		t.Errorf("the cycle handled %d bytes, more than the %d in the union of both sides' changes", s.BytesChanged, union)
	}
	if s.BytesChanged < workload.TouchedBytes(prodOps)-int64(len(disks))*lifeboat.BlockSize {
		t.Errorf("the cycle handled %d bytes, less than the %d production changed on its own", s.BytesChanged, workload.TouchedBytes(prodOps))
	}
}

// shareAPoint makes point 5 as both sites hold it after a failover: the
// recovered VM's disks copied to production's, and the failover's generation
// started on the recovered VM's disks, named for production's site.
func shareAPoint(t *testing.T, rec, prod *testvm.VM, guest *workload.Guest) *failbackTarget {
	t.Helper()
	if err := guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	shared := lifeboat.Point{VM: "vm1", ID: sharedPoint}
	prodDisks := dial(t, prod)
	for _, d := range disks {
		buf := make([]byte, d.Size)
		if err := guest.Client(d.Name).Read(ctx(t), buf, 0); err != nil {
			t.Fatal(err)
		}
		if err := prodDisks[d.Name].Write(ctx(t), buf, 0, false); err != nil {
			t.Fatal(err)
		}
		lineage := "feed" + d.Name
		gen := lifeboat.NewGeneration(prodSite, lineage, sharedPoint)
		if err := rec.Monitor().AddBitmap(ctx(t), d.Name, gen, d.Name == "vda", false); err != nil {
			t.Fatal(err)
		}
		shared.Disks = append(shared.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Lineage: lineage, Generation: gen})
	}
	return &failbackTarget{diskTarget: diskTarget{disks: prodDisks, latest: shared}, peer: prodSite}
}

const (
	prodSite    = "prod-site"
	sharedPoint = 5
)

// failbackCycle runs one cycle from the recovered VM into production's disks
// and checks that it was incremental from the shared point and that the
// production disks then read as the recovered VM's.
func failbackCycle(t *testing.T, rec, prod *testvm.VM, guest *workload.Guest, target *failbackTarget) lifeboat.Point {
	t.Helper()
	want, err := guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := protector(t, rec, target).Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	s := pt.Stats
	t.Logf("failback cycle: changed %d, data %d, zero %d, written %d", s.BytesChanged, s.BytesData, s.BytesZero, target.sink.Written())
	for _, d := range pt.Disks {
		if d.Resync || d.Base != sharedPoint {
			t.Errorf("disk %s: resync %v from base %d, want an incremental from point %d", d.Name, d.Resync, d.Base, sharedPoint)
		}
	}
	got, err := openGuest(t, prod, 0).Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if got[d.Name] != want[d.Name] {
			t.Errorf("production disk %s after failback: sha256 %s, the recovered VM's %s", d.Name, got[d.Name][:12], want[d.Name][:12])
		}
	}
	return pt
}

// failbackTarget is diskTarget under the production site's name, which says
// what production changed on its own (nil: nothing).
type failbackTarget struct {
	diskTarget
	peer    string
	changed map[string]map[int64]bool
}

func (f *failbackTarget) Peer() string { return f.peer }

func (f *failbackTarget) TargetChanged(_ context.Context, _, disk string, fn func(off, length int64) error) error {
	for b := range f.changed[disk] {
		if err := fn(b*lifeboat.BlockSize, lifeboat.BlockSize); err != nil {
			return err
		}
	}
	return nil
}

// A patch (failback's writer takes them from the wire) writes only its
// sub-blocks, once they match their hash; the rest of the block stays the
// disk's own, and a copy from the patched block checks it whole.
func TestSinkWritesPatches(t *testing.T) {
	vm := startVM(t)
	cl := dial(t, vm)
	p := lifeboat.Point{VM: "vm1", ID: 3, Disks: []lifeboat.PointDisk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}}}
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 1))
	old := make([]byte, lifeboat.BlockSize)
	workload.Random(rng, old)
	if err := cl["vda"].Write(ctx(t), old, 0, false); err != nil {
		t.Fatal(err)
	}
	s, err := disksink.Open(ctx(t), p, cl)
	if err != nil {
		t.Fatal(err)
	}
	block := bytes.Clone(old)
	dirty := lifeboat.Dirty(0b0110_0000_0000_1001)
	for _, r := range dirty.Ranges(len(block)) {
		workload.Random(rng, block[r[0]:r[1]])
	}
	parts := dirty.Gather(nil, block)
	bad := bytes.Clone(parts)
	bad[0] ^= 1
	var mm *disksink.HashMismatchError
	if err := s.WritePatch("vda", 0, dirty, bad, lifeboat.HashBlock(parts), lifeboat.HashBlock(block)); !errors.As(err, &mm) {
		t.Fatalf("a patch that does not match its hash: %v, want a HashMismatchError", err)
	}
	if err := s.WritePatch("vda", 0, dirty, parts[1:], lifeboat.HashBlock(parts[1:]), lifeboat.HashBlock(block)); err == nil {
		t.Fatal("a patch one byte short of its sub-blocks was taken")
	}
	back := make([]byte, lifeboat.BlockSize)
	if err := cl["vda"].Read(ctx(t), back, 0); err != nil || !bytes.Equal(back, old) {
		t.Fatalf("refused patches changed the disk (%v)", err)
	}
	if err := s.WritePatch("vda", 0, dirty, parts, lifeboat.HashBlock(parts), lifeboat.HashBlock(block)); err != nil {
		t.Fatal(err)
	}
	if err := s.SendCopy("vdb", 0, "vda", 0, lifeboat.BlockSize, lifeboat.HashBlock(block)); err != nil {
		t.Fatalf("a copy from the patched block: %v", err)
	}
	if _, err := s.Commit(lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"vda", "vdb"} {
		if err := cl[d].Read(ctx(t), back, 0); err != nil || !bytes.Equal(back, block) {
			t.Errorf("disk %s block 0 after the patch is not the patched block (%v)", d, err)
		}
	}
	if w := s.Written(); w != int64(len(parts))+lifeboat.BlockSize {
		t.Errorf("written %d bytes, want the patch's %d and the copy's block", w, len(parts))
	}
}

package protect_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

const (
	vdaSize = 48 << 20
	vdbSize = 24 << 20
)

// rig is a protected VM (qcow2 + raw disk), its guest, and a recovery site.
type rig struct {
	vm    *testvm.VM
	site  *testsite.Site
	guest *workload.Guest
	disks []workload.Disk
	p     *protect.Protector
	// seed is the workload's (testenv.Seed); each guest opened on the rig
	// draws from seed+opens, so a replay replays every one of them.
	seed, opens uint64
}

func newRig(t *testing.T, compression wire.Compression) *rig {
	t.Helper()
	r := &rig{disks: []workload.Disk{{Name: "vda", Size: vdaSize}, {Name: "vdb", Size: vdbSize}}, seed: testenv.Seed(t)}
	r.vm = testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: vdaSize},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: vdbSize})
	r.site = testsite.Start(t, recovery.Options{Keep: 100})
	r.p = &protect.Protector{
		VM: protect.VM{Name: "vm1", QMPSocket: r.vm.QMPSocket(), NBDSocket: r.vm.NBDSocket(),
			WorkDir: testsite.ShortDir(t)},
		Target: r.site.Dial(t, compression), Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
	r.openGuest(t)
	return r
}

func (r *rig) openGuest(t *testing.T) {
	t.Helper()
	g, err := workload.Open(ctx(t), r.vm.NBDSocket(), r.seed+r.opens, r.disks...)
	r.opens++
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	r.guest = g
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

// cycle runs one cycle with the guest paused and checks that the point's export
// is byte-identical to the source at the instant.
func (r *rig) cycle(t *testing.T) lifeboat.Point {
	t.Helper()
	want, err := r.guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := r.p.Cycle(ctx(t))
	if err != nil {
		t.Fatalf("cycle: %v", err)
	}
	r.checkPoint(t, pt.ID, want)
	return pt
}

func (r *rig) checkPoint(t *testing.T, id uint64, want map[string]string) {
	t.Helper()
	for _, d := range r.disks {
		if got := r.exportHash(t, id, d.Name); got != want[d.Name] {
			t.Fatalf("point %d disk %s: export sha256 %s, source at the instant %s", id, d.Name, got[:12], want[d.Name][:12])
		}
	}
}

func (r *rig) exportHash(t *testing.T, id uint64, disk string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), disk+".raw")
	if err := r.site.Store.Export(ctx(t), "vm1", id, disk, out, "raw"); err != nil {
		t.Fatalf("export point %d disk %s: %v", id, disk, err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return hex.EncodeToString(h.Sum(nil))
}

func (r *rig) points(t *testing.T) []lifeboat.Point {
	t.Helper()
	pts, err := r.site.Store.Points("vm1")
	if err != nil {
		t.Fatal(err)
	}
	return pts
}

// Random writes between cycles (data, patterns, zeros, discards, 4 KiB to 4 MiB,
// aligned and unaligned) on a qcow2 and a raw disk: every point is byte-identical
// to the source at its instant, and later cycles send only what changed.
func TestCyclesByteExact(t *testing.T) {
	for _, comp := range []wire.Compression{wire.CompressionZstd, wire.CompressionNone} {
		t.Run(string(comp), func(t *testing.T) {
			r := newRig(t, comp)
			if err := r.guest.Fill(ctx(t), 0.3); err != nil {
				t.Fatal(err)
			}
			cycles := 10
			if comp == wire.CompressionNone {
				cycles = 3
			}
			for i := range cycles {
				if i > 0 {
					if _, err := r.guest.Mixed(ctx(t), 25); err != nil {
						t.Fatal(err)
					}
				}
				pt := r.cycle(t)
				if pt.ID != uint64(i+1) {
					t.Fatalf("cycle %d made point %d", i+1, pt.ID)
				}
				s := pt.Stats
				t.Logf("point %d: changed %d zero %d same %d data %d sent %d", pt.ID, s.BytesChanged, s.BytesZero, s.BytesSame, s.BytesData, s.BytesSent)
				if s.BytesData+s.BytesZero+s.BytesSame+s.BytesDedup != s.BytesChanged {
					t.Fatalf("point %d: data %d + zero %d + same %d + dedup %d != changed %d", pt.ID, s.BytesData, s.BytesZero, s.BytesSame, s.BytesDedup, s.BytesChanged)
				}
				if i == 0 {
					// White space is skipped: the initial sync reads only the filled 30%.
					if s.BytesData > (vdaSize+vdbSize)*4/10 {
						t.Fatalf("initial sync sent %d data bytes for %d filled", s.BytesData, (vdaSize+vdbSize)*3/10)
					}
					for _, d := range pt.Disks {
						if !d.Resync {
							t.Fatalf("initial sync of disk %s not marked as a resync", d.Name)
						}
					}
				} else if s.BytesChanged >= vdaSize+vdbSize {
					t.Fatalf("incremental point %d handled the whole disks (%d bytes)", pt.ID, s.BytesChanged)
				}
			}
			if len(r.points(t)) != cycles {
				t.Fatalf("%d points listed after %d cycles", len(r.points(t)), cycles)
			}
			if _, err := r.site.Store.Verify(ctx(t), "vm1", 0, nil); err != nil {
				t.Fatalf("verify latest: %v", err)
			}
		})
	}
}

// A write that lands while a cycle runs belongs to the next point: it is not in
// the current one, and it is not lost.
func TestWriteDuringCycleGoesToNextPoint(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.2); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	before, err := r.guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	r.p.Hooks.AfterInstant = func(c context.Context) error {
		// The guest keeps writing after the instant, on both disks, over
		// data that the current point is copying.
		_, err := r.guest.Mixed(c, 20)
		return err
	}
	pt, err := r.p.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	r.p.Hooks.AfterInstant = nil
	r.checkPoint(t, pt.ID, before)
	after := r.cycle(t)
	if after.Stats.BytesChanged == 0 {
		t.Fatal("the writes made during the previous cycle were not carried by the next point")
	}
}

// A failure at any step of a cycle leaves no partial point and loses no change:
// the next cycle is byte-exact.
func TestFaultAtEachStep(t *testing.T) {
	errInjected := errors.New("injected")
	cases := []struct {
		name  string
		setup func(t *testing.T, r *rig)
	}{
		{"error after the instant", func(t *testing.T, r *rig) {
			r.p.Hooks.AfterInstant = func(context.Context) error { return errInjected }
		}},
		{"connection cut while sending", func(t *testing.T, r *rig) {
			c := r.p.Target.(*wire.Client)
			r.p.Hooks.AfterPlan = func(context.Context) error {
				go func() { time.Sleep(5 * time.Millisecond); c.Close() }()
				return nil
			}
		}},
		{"recovery site killed before commit", func(t *testing.T, r *rig) {
			r.p.Hooks.BeforeCommit = func(context.Context) error {
				r.site.Restart(t) // streams cut, store reopened: the pending point is discarded
				return nil
			}
		}},
		{"VM killed mid-cycle", func(t *testing.T, r *rig) {
			r.p.Hooks.AfterPlan = func(context.Context) error {
				// The VM's QEMU dies (and is started again): its qcow2 bitmaps
				// are inconsistent now, the raw disk's are gone.
				r.guest.Close()
				r.vm.Crash(t)
				r.openGuest(t)
				return nil
			}
		}},
		{"NBD read of the fleece fails", func(t *testing.T, r *rig) {
			r.p.Hooks.AfterPlan = func(c context.Context) error {
				// Drop the fleece exports under the reader, as a QEMU-side failure would.
				exports, err := r.vm.Monitor().Exports(c)
				if err != nil {
					return err
				}
				for _, e := range exports {
					if strings.HasPrefix(e.ID, "lifeboat-") {
						if err := r.vm.Monitor().ExportDelForce(c, e.ID); err != nil {
							return err
						}
					}
				}
				return nil
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, wire.CompressionZstd)
			if err := r.guest.Fill(ctx(t), 0.2); err != nil {
				t.Fatal(err)
			}
			r.cycle(t)
			if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
				t.Fatal(err)
			}
			tc.setup(t, r)
			if _, err := r.p.Cycle(ctx(t)); err == nil {
				t.Fatal("cycle succeeded despite the fault")
			} else {
				t.Logf("cycle failed as it should: %v", err)
			}
			r.p.Hooks = protect.Hooks{}
			if n := len(r.points(t)); n != 1 {
				t.Fatalf("%d points listed after a failed cycle, want 1", n)
			}
			if c, ok := r.p.Target.(*wire.Client); ok {
				c.Close()
			}
			r.p.Target = r.site.Dial(t, wire.CompressionZstd)
			if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
				t.Fatal(err)
			}
			pt := r.cycle(t)
			for _, d := range pt.Disks {
				// After a VM crash a resync by hashes is the right answer; after
				// any other fault the qcow2 disk keeps its generation.
				if d.Name == "vda" && d.Resync != (tc.name == "VM killed mid-cycle") {
					t.Fatalf("qcow2 disk resync = %v after %q", d.Resync, tc.name)
				}
			}
		})
	}
}

// A disk grown between cycles (block_resize) is handled: the replica grows too.
// The cycle after a size change is a hash resync (the generation cannot show
// whether the disk shrank first: TestDiskShrunkThenGrown), which sends only
// what differs: the data written into the grown tail.
func TestDiskGrows(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	const grown = vdaSize + 16<<20
	r.resize(t, grown)
	if err := r.guest.Do(ctx(t), workload.Op{Disk: "vda", Kind: "data", Offset: grown - 3<<20, Length: 2 << 20}); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	vda := diskNamed(t, pt, "vda")
	if vda.Size != grown || !vda.Resync {
		t.Fatalf("point records vda size %d, resync %v; want %d, a resync", vda.Size, vda.Resync, grown)
	}
	if pt.Stats.BytesSent > 2<<20+64<<10 {
		t.Fatalf("growing the disk made the cycle send %d bytes for 2 MiB written", pt.Stats.BytesSent)
	}
}

// A disk shrunk and then grown past its old size between two cycles: QEMU
// drops the shrunk range's bits from the generation and grows it back clean,
// while the source now reads zeros there. The size change makes the next
// cycle a hash resync, and the point is byte-exact (r.cycle compares it with
// the source at the instant). An incremental cycle kept the old bytes.
func TestDiskShrunkThenGrown(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	r.resize(t, 4<<20)
	r.resize(t, vdaSize+8<<20)
	pt := r.cycle(t)
	if vda := diskNamed(t, pt, "vda"); !vda.Resync {
		t.Fatalf("point %d: vda incremental after a shrink and a grow, want a resync", pt.ID)
	}
}

// resize changes vda's size with block_resize. QEMU 7.2's NBD export does not
// share "resize", so the guest's export goes away while the disk changes, as
// a virtio-blk device would allow it.
func (r *rig) resize(t *testing.T, size int64) {
	t.Helper()
	r.guest.Close()
	m := r.vm.Monitor()
	if err := m.ExportDelForce(ctx(t), "vda"); err != nil {
		t.Fatal(err)
	}
	if err := m.BlockResize(ctx(t), "vda", size); err != nil {
		t.Fatal(err)
	}
	if err := m.ExportAdd(ctx(t), qemu.Export{ID: "vda", Node: "vda", Name: "vda", Writable: true}); err != nil {
		t.Fatal(err)
	}
	for i := range r.disks {
		if r.disks[i].Name == "vda" {
			r.disks[i].Size = size
		}
	}
	r.openGuest(t)
}

// Lost change tracking is a normal event: after an unclean QEMU exit the qcow2
// bitmap is inconsistent and the raw disk's is gone; the next cycle resyncs by
// comparing hashes. Whatever the workload draws, the resync writes into the
// point no block the workload left alone since the last point, and every block
// whose content it changed; a block it rewrote with the same content may be
// skipped. What the point wrote is read from its own qcow2 layer.
func TestLostBitmapsResyncByHashes(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	// What point 1 holds is on stable storage, as a guest's flush would make
	// it: a crash loses unflushed writes, and the qcow2 disk would then lose
	// blocks the workload wrote before the point. The writes after the point
	// are not flushed: the crash may lose some of them, which the comparison
	// below allows (a lost write leaves the block as the point has it).
	for _, d := range r.disks {
		if err := r.guest.Client(d.Name).Flush(ctx(t)); err != nil {
			t.Fatal(err)
		}
	}
	r.cycle(t)
	before := r.blockHashes(t)
	ops, err := r.guest.Mixed(ctx(t), 10)
	if err != nil {
		t.Fatal(err)
	}
	written := workload.Touched(ops)
	r.guest.Close()
	r.vm.Crash(t)
	r.openGuest(t)
	after := r.blockHashes(t) // after the crash: what the source holds now
	pt := r.cycle(t)
	var sentBytes int64
	for _, d := range pt.Disks {
		if !d.Resync {
			t.Fatalf("disk %s not resynced after losing its bitmap", d.Name)
		}
		sent := r.pointLayerBlocks(t, pt.ID, d.Name)
		sentBytes += int64(len(sent)) * lifeboat.BlockSize
		var changed, same int
		for b := range before[d.Name] {
			differs := before[d.Name][b] != after[d.Name][b]
			if differs && !written[d.Name][int64(b)] {
				t.Fatalf("disk %s block %d changed content but the workload never wrote it: the test's bookkeeping is wrong", d.Name, b)
			}
			switch {
			case sent[int64(b)] && !written[d.Name][int64(b)]:
				t.Fatalf("disk %s: the resync sent block %d, which the workload did not write since point %d", d.Name, b, pt.ID-1)
			case differs && !sent[int64(b)]:
				t.Fatalf("disk %s: the resync skipped block %d, whose content changed since point %d", d.Name, b, pt.ID-1)
			case differs:
				changed++
			case written[d.Name][int64(b)] && !sent[int64(b)]:
				same++
			}
		}
		t.Logf("disk %s: %d blocks written by the workload, %d changed, %d sent, %d written but unchanged (same content, or the write was lost in the crash) and skipped",
			d.Name, len(written[d.Name]), changed, len(sent), same)
	}
	s := pt.Stats
	if got := s.BytesData + s.BytesDedup + s.BytesZero; got != sentBytes {
		t.Fatalf("stats say the resync sent %d bytes (data %d, dedup %d, zero %d); the point's layers hold %d", got, s.BytesData, s.BytesDedup, s.BytesZero, sentBytes)
	}
	if s.BytesData+s.BytesDedup+s.BytesZero+s.BytesSame != s.BytesChanged {
		t.Fatalf("stats: data %d + dedup %d + zero %d + same %d != changed %d", s.BytesData, s.BytesDedup, s.BytesZero, s.BytesSame, s.BytesChanged)
	}
	// And after the resync, cycles are incremental again.
	if _, err := r.guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t)
	for _, d := range pt.Disks {
		if d.Resync {
			t.Fatalf("disk %s resynced again after a good cycle", d.Name)
		}
	}
}

// blockHashes reads every disk through the guest's exports and hashes each block.
func (r *rig) blockHashes(t *testing.T) map[string][]lifeboat.Hash {
	t.Helper()
	out := map[string][]lifeboat.Hash{}
	buf := make([]byte, 4<<20)
	for _, d := range r.disks {
		for off := int64(0); off < d.Size; off += int64(len(buf)) {
			b := buf[:min(int64(len(buf)), d.Size-off)]
			if err := r.guest.Client(d.Name).Read(ctx(t), b, off); err != nil {
				t.Fatalf("read disk %s at %d: %v", d.Name, off, err)
			}
			for ; len(b) > 0; b = b[min(lifeboat.BlockSize, len(b)):] {
				out[d.Name] = append(out[d.Name], lifeboat.HashBlock(b[:min(lifeboat.BlockSize, len(b))]))
			}
		}
	}
	return out
}

// pointLayerBlocks is the set of blocks that the point's own qcow2 layer holds
// (data or zero clusters), read by qemu-img map: what the cycle wrote for it.
func (r *rig) pointLayerBlocks(t *testing.T, id uint64, disk string) map[int64]bool {
	t.Helper()
	path, err := r.site.Store.ImagePath("vm1", id, disk)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx(t), "qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		t.Fatalf("qemu-img map %s: %v", path, err)
	}
	var extents []struct {
		Start, Length int64
		Depth         int
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatalf("qemu-img map %s: %v", path, err)
	}
	blocks := map[int64]bool{}
	for _, e := range extents {
		if e.Depth != 0 {
			continue
		}
		if e.Start%lifeboat.BlockSize != 0 {
			t.Fatalf("qemu-img map %s: extent at %d is not block aligned", path, e.Start)
		}
		for b := e.Start / lifeboat.BlockSize; b*lifeboat.BlockSize < e.Start+e.Length; b++ {
			blocks[b] = true
		}
	}
	return blocks
}

// A clean VM restart keeps the qcow2 disk's persistent bitmap; the raw disk's
// in-memory bitmap is gone, so only it is resynced.
func TestRestartKeepsQcow2Tracking(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	r.guest.Close()
	r.vm.Restart(t)
	r.openGuest(t)
	pt := r.cycle(t)
	for _, d := range pt.Disks {
		if want := d.Name == "vdb"; d.Resync != want {
			t.Fatalf("disk %s: resync %v after a clean restart, want %v", d.Name, d.Resync, want)
		}
	}
}

// Deduplication within a point: a block whose content was already sent in the
// point crosses the wire as a reference; the replica is still byte-exact.
func TestDuplicateBlocksCrossOnce(t *testing.T) {
	r := newRig(t, wire.CompressionNone)
	// One reader, so that which copy goes first is fixed: with several, copies
	// read at the same moment may each go as data before either is indexed.
	r.p.Readers = 1
	buf := make([]byte, 1<<20)
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(t), 4)), buf)
	for i := range 8 {
		disk := []string{"vda", "vdb"}[i%2]
		if err := r.guest.Client(disk).Write(ctx(t), buf, int64(i)*(2<<20), false); err != nil {
			t.Fatal(err)
		}
	}
	pt := r.cycle(t)
	s := pt.Stats
	t.Logf("8 copies of 1 MiB on two disks: data %d, dedup %d, sent %d", s.BytesData, s.BytesDedup, s.BytesSent)
	if s.BytesData != 1<<20 || s.BytesDedup != 7<<20 || s.BytesSent > 2<<20 {
		t.Fatalf("duplicates were sent as data: data %d, dedup %d, sent %d", s.BytesData, s.BytesDedup, s.BytesSent)
	}
	if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
		t.Fatal(err)
	}
}

// Small writes (4-64 KiB of random data at 4 KiB-aligned offsets) send the
// 4 KiB sub-blocks they touched, not their whole 64 KiB blocks (2.7 times
// as many bytes), and every point is still byte-exact; a cycle whose
// generation is finer than the grid is the default on a disk of this size.
func TestSmallWritesSendTheirSubBlocks(t *testing.T) {
	r := newRig(t, wire.CompressionNone) // bytes sent are bytes of data
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	for round := range 2 {
		sub := map[string]map[int64]bool{}
		blocks := map[string]map[int64]bool{}
		writes := 0
		err := r.guest.Small(ctx(t), 4<<20, func(op workload.Op, _ []byte) {
			writes++
			if sub[op.Disk] == nil {
				sub[op.Disk], blocks[op.Disk] = map[int64]bool{}, map[int64]bool{}
			}
			for o := op.Offset; o < op.Offset+op.Length; o += lifeboat.SubBlock {
				sub[op.Disk][o/lifeboat.SubBlock] = true
				blocks[op.Disk][o/lifeboat.BlockSize] = true
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		var subBytes, blockBytes int64
		for d := range sub {
			subBytes += int64(len(sub[d])) * lifeboat.SubBlock
			blockBytes += int64(len(blocks[d])) * lifeboat.BlockSize
		}
		pt := r.cycle(t)
		s := pt.Stats
		t.Logf("round %d: %d writes touched %d bytes of sub-blocks, %d of blocks; changed %d, sent %d", round, writes, subBytes, blockBytes, s.BytesChanged, s.BytesSent)
		if s.BytesChanged != blockBytes {
			t.Errorf("round %d: changed %d bytes, the writes touched %d bytes of blocks", round, s.BytesChanged, blockBytes)
		}
		if limit := subBytes + 128*int64(len(blocks["vda"])+len(blocks["vdb"])); s.BytesSent > limit {
			t.Errorf("round %d: sent %d bytes for %d bytes of sub-blocks touched (at most %d with each block's header)", round, s.BytesSent, subBytes, limit)
		}
	}
}

// A replica a failing disk damaged is repaired by a whole send (`lifeboat
// sync --whole`, Protector.Whole). A hash resync compares the source's
// hashes with the catalog's, which still hold, so it sends nothing for a
// damaged block; a whole send reads and sends every block, the rest as
// zeros, and its point holds the whole disk: byte-exact (r.cycle), verify
// passes on it, while the point below still reads the damage. Whole is
// cleared by the commit, and the next cycle is incremental again.
func TestWholeSendRepairsADamagedReplica(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	// Bytes of a data cluster of point 1's vda image go bad in its file.
	img, err := r.site.Store.ImagePath("vm1", 1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-img", "map", "-U", "--output=json", "-f", "qcow2", img).Output()
	if err != nil {
		t.Fatalf("qemu-img map %s: %v", img, err)
	}
	var extents []struct {
		Data   bool  `json:"data"`
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatal(err)
	}
	host := int64(-1)
	for _, e := range extents {
		if e.Data && e.Length >= lifeboat.BlockSize {
			host = e.Offset
			break
		}
	}
	if host < 0 {
		t.Fatalf("point 1's image %s has no data cluster: %s", img, out)
	}
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 4096), host+8192); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := r.site.Store.Verify(ctx(t), "vm1", 1, nil); err == nil {
		t.Fatal("verify passed point 1 with a damaged cluster")
	} else {
		t.Logf("verify, as advised: %v", err)
	}
	// What verify found is recorded on the point, until it is repaired.
	if stored, err := r.site.Store.Point("vm1", 1); err != nil || stored.Damaged == nil {
		t.Errorf("point 1 after verify found it damaged: mark %+v (%v)", stored.Damaged, err)
	}

	r.p.Whole = true
	pt := r.cycle(t)
	for _, d := range pt.Disks {
		if !d.Resync {
			t.Errorf("point %d disk %s: incremental, want it sent whole", pt.ID, d.Name)
		}
	}
	if r.p.Whole {
		t.Error("Whole is still set after the point committed")
	}
	if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
		t.Fatalf("verify of the whole send's point %d: %v", pt.ID, err)
	}
	// The recovery site records that it holds the disks whole, so that
	// retention may drop the damaged points below it without a merge.
	if stored, err := r.site.Store.Point("vm1", pt.ID); err != nil {
		t.Fatal(err)
	} else {
		for _, d := range stored.Disks {
			if !d.Whole {
				t.Errorf("point %d disk %s, sent whole, is not recorded whole at the recovery site", pt.ID, d.Name)
			}
		}
		if stored.Damaged != nil {
			t.Errorf("point %d, sent whole, inherited the damage below: %+v", pt.ID, stored.Damaged)
		}
	}
	if _, err := r.site.Store.Verify(ctx(t), "vm1", 1, nil); err == nil {
		t.Error("verify passed point 1, which the whole send does not rewrite")
	}
	if _, err := r.guest.Mixed(ctx(t), 5); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t)
	if vda := diskNamed(t, pt, "vda"); vda.Resync {
		t.Errorf("point %d after the whole send: vda resync, want incremental", pt.ID)
	}
	if stored, err := r.site.Store.Point("vm1", pt.ID); err != nil || diskNamed(t, stored, "vda").Whole {
		t.Errorf("point %d, incremental, recorded whole (%v)", pt.ID, err)
	}
}

package recovery

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// heapInUse is the live Go heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// writeRandom writes n bytes of seeded random data at off, a MiB at a time.
func writeRandom(t *testing.T, w *Writer, disk string, off, n int64, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(testenv.Seed(t)^seed, uint64(off)))
	buf := make([]byte, 1<<20)
	for done := int64(0); done < n; done += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			v := r.Uint64()
			for k := range 8 {
				buf[i+k] = byte(v >> (8 * k))
			}
		}
		if err := w.WriteBlocks(testCtx(t), disk, off+done, buf, hashes(buf)); err != nil {
			t.Fatal(err)
		}
	}
}

func recordStat(t *testing.T, s *Store, vm string, point uint64) RecordStat {
	t.Helper()
	sts, err := s.RecordStats(vm)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range sts {
		if st.Point == point {
			return st
		}
	}
	t.Fatalf("no record of point %d in %+v", point, sts)
	return RecordStat{}
}

// TestBoundedMetadataOnSparseDisk: a 1 TiB sparse disk with 64 MiB of data,
// then a 256 GiB discard, then a retention merge. The discard must cost the
// catalog one entry and the writer no memory per block, its image no qcow2
// metadata for the blocks that held nothing, and the merge only the merged
// point's entries. (Before bounded records the discard was 4M map entries in
// memory and in one catalog value, and the overlay got 32 MiB of L2 tables.)
func TestBoundedMetadataOnSparseDisk(t *testing.T) {
	requireQEMU(t)
	const (
		size    = int64(1) << 40
		half    = int64(32) << 20 // two runs of data of this size
		far     = int64(512) << 30
		discard = int64(256) << 30
	)
	dir := t.TempDir()
	s := openStore(t, dir, 2)
	disk := []DiskSpec{{Name: "vda", Size: size}}
	ctx := testCtx(t)

	w, err := s.Begin(ctx, BeginSpec{VM: "big", ID: 1, Disks: follow(t, s, "big", 1, disk)})
	if err != nil {
		t.Fatal(err)
	}
	writeRandom(t, w, "vda", 0, half, 1)
	writeRandom(t, w, "vda", far, half, 1)
	if _, err := w.Commit(ctx, lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	if st := recordStat(t, s, "big", 1); st.Data != int(2*half/B) || st.ZeroRuns != 0 {
		t.Errorf("point 1 record %+v, want %d data blocks", st, 2*half/B)
	}

	// The discard: [0, 256 GiB), over the first run of data.
	w, err = s.Begin(ctx, BeginSpec{VM: "big", ID: 2, Disks: follow(t, s, "big", 2, disk)})
	if err != nil {
		t.Fatal(err)
	}
	before := heapInUse()
	start := time.Now()
	if err := w.WriteZeroes(ctx, "vda", 0, discard); err != nil {
		t.Fatal(err)
	}
	zeroTook := time.Since(start)
	grown := int64(heapInUse()) - int64(before)
	if grown > 16<<20 {
		t.Errorf("the writer's heap grew by %d MiB for a 256 GiB discard: the record is not bounded", grown>>20)
	}
	start = time.Now()
	if _, err := w.Commit(ctx, lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	commitTook := time.Since(start)
	if st := recordStat(t, s, "big", 2); st.Data != 0 || st.ZeroRuns != 1 {
		t.Errorf("point 2 record %+v, want one zero run", st)
	}
	img, err := s.ImagePath("big", 2, "vda")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	// Zeroing 256 GiB of an overlay writes 32 MiB of L2 tables; zeroing only
	// the 32 MiB that held data, 512 entries.
	if fi.Size() > 4<<20 {
		t.Errorf("the discard's overlay is %d MiB: qcow2 wrote metadata for blocks that held nothing", fi.Size()>>20)
	}

	// Point 3 merges point 1 into point 2 (keep 2).
	w, err = s.Begin(ctx, BeginSpec{VM: "big", ID: 3, Disks: follow(t, s, "big", 3, disk)})
	if err != nil {
		t.Fatal(err)
	}
	writeRandom(t, w, "vda", far+half, 1<<20, 3)
	start = time.Now()
	if _, err := w.Commit(ctx, lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	s.SettleRetention() // the merge runs after the commit's answer
	mergeTook := time.Since(start)
	if got := pointIDs(t, s, "big"); !slices.Equal(got, []uint64{2, 3}) {
		t.Fatalf("points after retention %v, want [2 3]", got)
	}
	// The merged record: point 1's far run, the discard as one run.
	if st := recordStat(t, s, "big", 2); st.Data != int(half/B) || st.ZeroRuns != 1 {
		t.Errorf("merged record %+v, want %d data blocks and one zero run", st, half/B)
	}
	bm, err := s.BlockMap("big", "vda", 3)
	if err != nil {
		t.Fatal(err)
	}
	if want := int(half/B + 16); len(bm) != want {
		t.Errorf("block map at point 3 has %d blocks, want %d", len(bm), want)
	}
	for b := range bm {
		if b < discard/B {
			t.Fatalf("block %d, discarded, is still data in the block map", b)
		}
	}
	rep, err := s.Verify(ctx, "big", 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	cat, err := os.Stat(filepath.Join(dir, "catalog.db"))
	if err != nil {
		t.Fatal(err)
	}
	if cat.Size() > 4<<20 {
		t.Errorf("catalog is %d MiB for %d data blocks", cat.Size()>>20, len(bm))
	}
	t.Logf("discard %s (heap +%d KiB, overlay %d KiB), commit %s, commit with merge %s, verify %d blocks in %s, catalog %d KiB",
		zeroTook.Round(time.Millisecond), max(grown, 0)>>10, fi.Size()>>10, commitTook.Round(time.Millisecond),
		mergeTook.Round(time.Millisecond), rep.Disks[0].Blocks, rep.Duration.Round(time.Millisecond), cat.Size()>>10)
}

// damage writes a pattern into a block of a qcow2 image behind the store's
// back, as a damaged disk or a bug would.
func damage(t *testing.T, image string, block int64) {
	t.Helper()
	testenv.RequireTools(t, "qemu-io")
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x5a %d %d", block*B, B), image).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
}

// TestVerifyChecksUnrecordedBlocksReadZero: data that appears where the
// record says nothing was written, or where it says zeros, fails Verify.
func TestVerifyChecksUnrecordedBlocksReadZero(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "z1", 1, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 0, 8)
	p.commit()
	p = begin(t, s, "z1", 2, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.zeros("vda", 2, 4)
	p.commit()
	checkPoint(t, s, "z1", 2, m)

	for _, tt := range []struct {
		name  string
		point uint64
		block int64
	}{
		{"never written", 1, 40},
		{"zeroed", 2, 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			img, err := s.ImagePath("z1", tt.point, "vda")
			if err != nil {
				t.Fatal(err)
			}
			damage(t, img, tt.block)
			_, err = s.Verify(testCtx(t), "z1", 2, nil)
			var ve *VerifyError
			if !errors.As(err, &ve) || ve.Offset != tt.block*B || !ve.Want.IsZero() {
				t.Fatalf("Verify after data appeared in block %d: %v, want a VerifyError there", tt.block, err)
			}
		})
	}
}

// TestMergeRecheckCatchesDamagedBase: a merged base that does not read back
// as the folded record says stops the merge before the catalog names it.
func TestMergeRecheckCatchesDamagedBase(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	writeSeries(t, s, "mc", 3)
	// A block point 2 wrote: the merge copies it into point 1's image.
	touched := int64(-1)
	if err := s.db.View(func(tx *bolt.Tx) error {
		rec, _ := openRecord(sub(vmBucket(tx, "mc"), bucketRecs), recKey(2, "vda"))
		return rec.eachData(0, func(b int64, _ lifeboat.Hash) error {
			if touched < 0 {
				touched = b
			}
			return nil
		})
	}); err != nil || touched < 0 {
		t.Fatalf("no data block in point 2's record (%v)", err)
	}
	s.keep = 2
	var into string
	// The hook stands in for damage between the commit and the catalog step,
	// which the real parts cannot be made to do on cue.
	s.testMergeHook = func(step string) error {
		if step == stepRebased {
			// Point 1's image, which now holds point 2's data too.
			into = filepath.Join(s.Dir(), imageRel("mc", "vda", 1))
			damage(t, into, touched)
		}
		return nil
	}
	err := s.ApplyRetention(testCtx(t), "mc")
	if err == nil || !strings.Contains(err.Error(), "merged image") {
		t.Fatalf("ApplyRetention over a damaged base: %v, want the check to fail", err)
	}
	if into == "" {
		t.Fatal("the merge never reached the rebase step")
	}
	if !strings.Contains(err.Error(), fmt.Sprintf("offset %d", touched*B)) {
		t.Errorf("the error does not name the damaged block: %v", err)
	}
	// The merge stays recorded, not cataloged: point 2 keeps its own image
	// and record, to be retried.
	var intent *mergeIntent
	if err := s.db.View(func(tx *bolt.Tx) (err error) { intent, err = readIntent(tx, "mc"); return err }); err != nil {
		t.Fatal(err)
	}
	if intent == nil || intent.Done {
		t.Errorf("merge intent %+v, want it recorded and not done", intent)
	}
	if p, err := s.Point("mc", 2); err != nil || p.Disks[0].File != filepath.Join(s.Dir(), imageRel("mc", "vda", 2)) {
		t.Errorf("point 2 after the failed check: %+v %v, want its own image", p, err)
	}
}

// TestOpenAfterAFailedMergeCheck: a merged base that failed its read-back
// check (a failing disk under the store) leaves the merge recorded; the site
// restarted then opens the store all the same, so that its other VMs go on
// and `lifeboat verify`, which the error advises, can run. The VM's points
// stay listed as they were, the dropped one hidden, and why retention is
// stuck is reported until it runs through.
func TestOpenAfterAFailedMergeCheck(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	writeSeries(t, s, "mc", 3)
	other := writeSeries(t, s, "other", 1)
	s.keep = 2
	// Blocks of point 1 that point 2 does not write: the commit leaves them,
	// the check reads a sample of them.
	own := map[int64]bool{}
	if err := s.db.View(func(tx *bolt.Tx) error {
		rec, _ := openRecord(sub(vmBucket(tx, "mc"), bucketRecs), recKey(2, "vda"))
		return rec.eachData(0, func(b int64, _ lifeboat.Hash) error { own[b] = true; return nil })
	}); err != nil {
		t.Fatal(err)
	}
	// The hook stands in for a failing disk between the commit and the
	// check, which the real parts cannot be made to do on cue.
	s.testMergeHook = func(step string) error {
		if step == stepRebased {
			for b := int64(0); b < 64; b++ {
				if !own[b] {
					damage(t, filepath.Join(s.Dir(), imageRel("mc", "vda", 1)), b)
				}
			}
		}
		return nil
	}
	if err := s.ApplyRetention(testCtx(t), "mc"); err == nil || !strings.Contains(err.Error(), "merged image") {
		t.Fatalf("retention over a damaged base: %v, want the check to fail", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := openStore(t, dir, 2) // Open must not fail
	if got := pointIDs(t, s2, "mc"); !slices.Equal(got, []uint64{2, 3}) {
		t.Errorf("points after Open: %v, want [2 3] (point 1 is being dropped)", got)
	}
	f, ok := s2.RetentionFailure("mc")
	if !ok || !strings.Contains(f.Err, `vm "mc"`) || !strings.Contains(f.Err, "point 1 into 2") || !strings.Contains(f.Err, "lifeboat verify mc") {
		t.Errorf("retention failure after Open: %+v %v, want the VM, the merge and what to do", f, ok)
	}
	if _, ok := s2.RetentionFailure("other"); ok {
		t.Error("a retention failure is reported for a VM whose retention never failed")
	}
	checkPoint(t, s2, "other", 1, other[0])
	p := begin(t, s2, "other", 2, other[0].clone(), DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 0, 4)
	p.commit()
}

// TestOpenMigratesV1Records: a catalog with the old one-value records opens
// with the same points, block maps and verify.
func TestOpenMigratesV1Records(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	models := writeSeries(t, s, "mg", 3)
	want := map[uint64]map[int64]lifeboat.Hash{}
	for id := uint64(1); id <= 3; id++ {
		bm, err := s.BlockMap("mg", "vda", id)
		if err != nil {
			t.Fatal(err)
		}
		want[id] = bm
	}
	s.Close()

	// Rewrite the catalog as lifeboat before bounded records kept it.
	db, err := bolt.Open(filepath.Join(dir, "catalog.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		vb := vmBucket(tx, "mg")
		old, err := vb.CreateBucket(bucketBlocks)
		if err != nil {
			return err
		}
		recs := vb.Bucket(bucketRecs)
		for id := uint64(1); id <= 3; id++ {
			rec, ok := openRecord(recs, recKey(id, "vda"))
			if !ok {
				return fmt.Errorf("no record %d", id)
			}
			m := map[int64]lifeboat.Hash{}
			if err := rec.eachData(0, func(b int64, h lifeboat.Hash) error { m[b] = h; return nil }); err != nil {
				return err
			}
			if err := rec.eachZeros(func(lo, hi int64) error {
				for b := lo; b < hi; b++ {
					m[b] = lifeboat.ZeroHash
				}
				return nil
			}); err != nil {
				return err
			}
			if err := old.Put(recKey(id, "vda"), encodeBlockRecordV1(m)); err != nil {
				return err
			}
		}
		return vb.DeleteBucket(bucketRecs)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, 100)
	for id := uint64(1); id <= 3; id++ {
		bm, err := s.BlockMap("mg", "vda", id)
		if err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(bm, want[id]) {
			t.Errorf("point %d: block map after migration has %d blocks, want %d", id, len(bm), len(want[id]))
		}
		checkPoint(t, s, "mg", id, models[id-1])
	}
	if st := recordStat(t, s, "mg", 1); st.ZeroRuns != 1 {
		t.Errorf("point 1's three zero blocks migrated as %d runs, want 1", st.ZeroRuns)
	}
}

// TestWriterSpillsItsRecord: with a tiny batch the writer's record goes to the
// catalog as it is written; copies still find their source, later writes
// still win, and the committed block map is the same.
func TestWriterSpillsItsRecord(t *testing.T) {
	requireQEMU(t)
	old := flushEntries
	flushEntries = 4
	t.Cleanup(func() { flushEntries = old })
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "sp", 1, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 0, 10) // spilled twice over
	h0 := lifeboat.HashBlock(m["vda"][:B])
	if err := p.w.CopyBlock(testCtx(t), "vda", 20*B, "vda", 0, B, h0); err != nil {
		t.Fatalf("copy of a spilled block: %v", err)
	}
	copy(m["vda"][20*B:], m["vda"][:B])
	p.zeros("vda", 2, 3)
	h2 := lifeboat.HashBlock(m["vda"][9*B : 10*B])
	var hm *HashMismatchError
	if err := p.w.CopyBlock(testCtx(t), "vda", 30*B, "vda", 3*B, B, h2); !errors.As(err, &hm) {
		t.Fatalf("copy of a block zeroed after its spill: %v, want a hash mismatch", err)
	}
	p.data("vda", 3, 1) // data over a spilled zero run
	p.commit()
	checkPoint(t, s, "sp", 1, m)
	bm, err := s.BlockMap("sp", "vda", 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int64{0, 1, 3, 5, 6, 7, 8, 9, 20}; !slices.Equal(slices.Sorted(maps.Keys(bm)), want) {
		t.Errorf("block map %v, want %v", slices.Sorted(maps.Keys(bm)), want)
	}
	if st := recordStat(t, s, "sp", 1); st.ZeroRuns != 2 {
		t.Errorf("record %+v, want the zero run split in two by block 3", st)
	}
}

// TestWriterCopiesReadOnce: many copies of one source read it back once
// (the writer keeps it), every copy lands whole; a source rewritten with
// other data is read again for a copy of its new content, never served from
// what was kept; and a full cache starts over without losing a copy.
func TestWriterCopiesReadOnce(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "cp", 1, m, DiskSpec{Name: "vda", Size: 64 << 20}, DiskSpec{Name: "vdb", Size: 64 << 20})
	p.data("vda", 0, 1)
	h0 := lifeboat.HashBlock(m["vda"][:B])
	copyOf := func(disk string, dst int64, srcDisk string, src int64, h lifeboat.Hash) {
		t.Helper()
		if err := p.w.CopyBlock(testCtx(t), disk, dst*B, srcDisk, src*B, B, h); err != nil {
			t.Fatalf("copy of %s block %d to %s block %d: %v", srcDisk, src, disk, dst, err)
		}
		copy(m[disk][dst*B:(dst+1)*B], m[srcDisk][src*B:(src+1)*B])
	}
	for i := range int64(50) {
		copyOf("vdb", 10+i, "vda", 0, h0)
	}
	if n := len(p.w.copies); n != 1 {
		t.Errorf("after 50 copies of one source the writer keeps %d blocks read back, want 1", n)
	}
	// The source gets other data: a copy of its new content reads it again.
	p.data("vda", 0, 1)
	h1 := lifeboat.HashBlock(m["vda"][:B])
	copyOf("vdb", 100, "vda", 0, h1)
	if c := p.w.copies[copySource{"vda", 0, B}]; c.h != h1 {
		t.Errorf("the block kept for vda block 0 has hash %x, want the new content's %x", c.h[:4], h1[:4])
	}
	// More sources than the writer keeps: it starts over, and copies land.
	p.data("vda", 1, copiesKept+10)
	for i := range int64(copiesKept + 10) {
		copyOf("vdb", 200+i, "vda", 1+i, lifeboat.HashBlock(m["vda"][(1+i)*B:(2+i)*B]))
	}
	if n := len(p.w.copies); n > copiesKept {
		t.Errorf("the writer keeps %d blocks read back, at most %d", n, copiesKept)
	}
	p.commit()
	checkPoint(t, s, "cp", 1, m)
}

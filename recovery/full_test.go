package recovery

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A store whose file system fills up (a real 64 MiB ext4, filled by a
// neighbour) loses nothing:
//   - a point whose writes find no room fails, with an error that says so
//     (ErrStoreFull),
//     and is not listed; the points before it read as they did;
//   - a retention merge that finds no room (it must allocate clusters in the
//     older image) fails and leaves every listed point readable and
//     verifiable, the dropped one hidden; once there is room it finishes;
//   - export and verify work while it is full (their daemons' sockets go
//     elsewhere when the store has no room for them);
//   - once there is room, the next point is written and reads right.
func TestStoreFullLosesNothing(t *testing.T) {
	requireQEMU(t)
	fs := testenv.SmallFS(t, "ext4", 64)
	neighbour := filepath.Join(fs, "neighbour")
	s := openStore(t, filepath.Join(fs, "store"), 1)
	const size = 16 << 20
	m := model{}

	// Point 1 holds data in the first half only: the second half of its
	// image is unallocated, so a merge of later data into it needs room.
	p := begin(t, s, "vm1", 1, m, DiskSpec{Name: "vda", Size: size, Resync: true})
	p.data("vda", 0, 128)
	p.commit()
	checkPoint(t, s, "vm1", 1, m)

	// A neighbour takes all but 1 MiB; point 2 writes 6 MiB.
	leaveFree(t, neighbour, 1)
	w2 := m.clone()
	p = begin(t, s, "vm1", 2, w2, DiskSpec{Name: "vda", Size: size})
	buf := make([]byte, 6<<20)
	for i := range buf {
		buf[i] = byte(p.rng.Uint32())
	}
	err := p.w.WriteBlocks(testCtx(t), "vda", 8<<20, buf, hashes(buf))
	if err == nil {
		_, err = p.w.Commit(testCtx(t), lifeboat.CycleStats{BytesData: 1})
	}
	if err == nil {
		t.Fatal("point 2 committed 6 MiB into a file system with 1 MiB free")
	}
	t.Logf("point 2 on a full file system: %v", err)
	if !errors.Is(err, ErrStoreFull) {
		t.Errorf("point 2 failed with %q: it does not say the store is full", err)
	}
	p.w.Abort(testCtx(t))
	if got := pointIDs(t, s, "vm1"); !slices.Equal(got, []uint64{1}) {
		t.Fatalf("points after a point failed for room: %v, want [1]", got)
	}
	checkPoint(t, s, "vm1", 1, m)

	// With 4 MiB free, point 2 writes 2 MiB into the second half and
	// commits; merging it into point 1's image needs 2 MiB more.
	leaveFree(t, neighbour, 4)
	p = begin(t, s, "vm1", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 128, 32)
	if _, err := p.w.Commit(testCtx(t), lifeboat.CycleStats{BytesData: 1}); err != nil {
		t.Fatalf("point 2, 2 MiB with 4 MiB free: %v", err)
	}
	s.SettleRetention()
	leaveFree(t, neighbour, 0)
	err = s.ApplyRetention(testCtx(t), "vm1")
	t.Logf("retention on a full file system: %v", err)
	if !errors.Is(err, ErrStoreFull) {
		t.Errorf("retention on a full file system: %v, want an error that says the store is full", err)
	}
	if got := pointIDs(t, s, "vm1"); !slices.Equal(got, []uint64{2}) {
		t.Fatalf("points after a merge on a full file system: %v, want [2] (point 1 is being dropped)", got)
	}
	checkPoint(t, s, "vm1", 2, m)

	// Room again: the merge finishes, and point 3 is written.
	if err := os.Remove(neighbour); err != nil {
		t.Fatal(err)
	}
	if err := s.ApplyRetention(testCtx(t), "vm1"); err != nil {
		t.Fatalf("retention with room again: %v", err)
	}
	checkPoint(t, s, "vm1", 2, m)
	if files := imageFiles(t, s, "vm1"); len(files) != 1 {
		t.Errorf("images after the merge: %v, want 1", files)
	}
	p = begin(t, s, "vm1", 3, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 100, 60)
	p.commit()
	checkPoint(t, s, "vm1", 3, m)
}

// leaveFree makes the file neighbour fill its file system but for mib MiB.
func leaveFree(t *testing.T, neighbour string, mib int64) {
	t.Helper()
	os.Remove(neighbour)
	testenv.FillUp(t, neighbour, 128)
	fi, err := os.Stat(neighbour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(neighbour, max(fi.Size()-mib<<20, 0)); err != nil {
		t.Fatal(err)
	}
}

// A patch whose sub-blocks do not match their hash, or do not fill them, is
// refused and writes nothing: the point, committed without it, reads as the
// one below. A good patch writes only its sub-blocks over the point below.
func TestWritePatchChecksItsBytes(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "vm1", 1, m, DiskSpec{Name: "vda", Size: 1 << 20, Resync: true})
	p.data("vda", 0, 16)
	p.commit()

	block := bytes.Clone(m["vda"][:B])
	dirty := lifeboat.Dirty(0b1001)
	for _, r := range dirty.Ranges(B) {
		for i := r[0]; i < r[1]; i++ {
			block[i] = byte(p.rng.Uint32())
		}
	}
	parts := dirty.Gather(nil, block)
	bad := bytes.Clone(parts)
	bad[len(bad)-1] ^= 1
	p = begin(t, s, "vm1", 2, m, DiskSpec{Name: "vda", Size: 1 << 20})
	var mm *HashMismatchError
	if err := p.w.WritePatch(testCtx(t), "vda", 0, dirty, bad, lifeboat.HashBlock(parts), lifeboat.HashBlock(block)); !errors.As(err, &mm) {
		t.Fatalf("a corrupted patch: %v, want a HashMismatchError", err)
	}
	if err := p.w.WritePatch(testCtx(t), "vda", 0, dirty, parts[:len(parts)-1], lifeboat.HashBlock(parts[:len(parts)-1]), lifeboat.HashBlock(block)); err == nil {
		t.Fatal("a patch a byte short of its sub-blocks was taken")
	}
	p.commit()
	checkPoint(t, s, "vm1", 2, m) // as point 1: nothing of the refused patches

	p = begin(t, s, "vm1", 3, m, DiskSpec{Name: "vda", Size: 1 << 20})
	if err := p.w.WritePatch(testCtx(t), "vda", 0, dirty, parts, lifeboat.HashBlock(parts), lifeboat.HashBlock(block)); err != nil {
		t.Fatal(err)
	}
	copy(m["vda"], block)
	p.commit()
	checkPoint(t, s, "vm1", 3, m)
}

// A merge that failed because the store is full stays recorded; a site
// restarted while the store is still full opens it all the same (its points
// listed, readable, the dropped one hidden), says why retention is stuck
// (RetentionFailure, what `lifeboat status` shows), and retention finishes
// the merge once there is room.
func TestOpenFullStoreWithAFailedMerge(t *testing.T) {
	requireQEMU(t)
	fs := testenv.SmallFS(t, "ext4", 64)
	neighbour := filepath.Join(fs, "neighbour")
	dir := filepath.Join(fs, "store")
	s := openStore(t, dir, 1)
	const size = 16 << 20
	m := model{}
	p := begin(t, s, "vm1", 1, m, DiskSpec{Name: "vda", Size: size, Resync: true})
	p.data("vda", 0, 128)
	p.commit()
	leaveFree(t, neighbour, 4)
	p = begin(t, s, "vm1", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 128, 32)
	if _, err := p.w.Commit(testCtx(t), lifeboat.CycleStats{BytesData: 1}); err != nil {
		t.Fatal(err)
	}
	s.SettleRetention()
	leaveFree(t, neighbour, 0)
	if err := s.ApplyRetention(testCtx(t), "vm1"); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("retention on a full store: %v, want ErrStoreFull", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := openStore(t, dir, 1) // Open must not fail
	if got := pointIDs(t, s2, "vm1"); !slices.Equal(got, []uint64{2}) {
		t.Fatalf("points after Open: %v, want [2] (point 1 is being dropped)", got)
	}
	checkPoint(t, s2, "vm1", 2, m)
	f, ok := s2.RetentionFailure("vm1")
	if !ok || !strings.Contains(f.Err, "free space") || !strings.Contains(f.Err, "point 1 into 2") {
		t.Errorf("retention failure after Open: %+v %v, want the merge named and told to free space", f, ok)
	}

	if err := os.Remove(neighbour); err != nil {
		t.Fatal(err)
	}
	if err := s2.ApplyRetention(testCtx(t), "vm1"); err != nil {
		t.Fatalf("retention with room again: %v", err)
	}
	if f, ok := s2.RetentionFailure("vm1"); ok {
		t.Errorf("retention ran through, but its failure is still reported: %+v", f)
	}
	if files := imageFiles(t, s2, "vm1"); len(files) != 1 {
		t.Errorf("images after the merge: %v, want 1", files)
	}
	checkPoint(t, s2, "vm1", 2, m)
}

package recovery

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// A replica whose oldest image went bad (a failing disk under the store) is
// repaired by a point sent whole (`lifeboat sync --whole`). The merge of the
// damaged points trips on the damage and never finishes, so before, the VM's
// points grew past keep without bound. A point that wrote every block of its
// disks is recorded whole, and retention drops the points below it without a
// merge once keep allows: the points above read as they were written.
func TestRetentionDropsDamagedPointsBelowAWholePoint(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "rp", 3)
	// Blocks of point 1 that point 2 does not write go bad.
	own := map[int64]bool{}
	if err := s.db.View(func(tx *bolt.Tx) error {
		rec, _ := openRecord(sub(vmBucket(tx, "rp"), bucketRecs), recKey(2, "vda"))
		return rec.eachData(0, func(b int64, _ lifeboat.Hash) error { own[b] = true; return nil })
	}); err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < 64; b++ {
		if !own[b] {
			damage(t, filepath.Join(s.Dir(), imageRel("rp", "vda", 1)), b)
		}
	}
	s.keep = 2
	if err := s.ApplyRetention(testCtx(t), "rp"); err == nil {
		t.Fatal("retention over a damaged base succeeded: the test damaged nothing it reads")
	}
	// The repair: every block sent, data and zeros (long zero runs are
	// written only where the chain below holds data). Retention waits
	// meanwhile, to look at the points first.
	s.keep = 100
	m := models[len(models)-1].clone()
	p := begin(t, s, "rp", 4, m, DiskSpec{Name: "vda", Size: 4 << 20, Resync: true})
	p.data("vda", 0, 40)
	p.zeros("vda", 40, 24)
	p.commit()
	repaired := m.clone()
	// An ordinary point after it: not whole.
	p = begin(t, s, "rp", 5, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 7, 2)
	p.commit()

	whole := func(id uint64) bool {
		pt, err := s.Point("rp", id)
		if err != nil {
			t.Fatal(err)
		}
		return pt.Disks[0].Whole
	}
	if !whole(4) || whole(5) || whole(3) {
		t.Errorf("whole: point 3 %v, 4 %v, 5 %v; want only point 4, which wrote every block", whole(3), whole(4), whole(5))
	}
	s.keep = 2
	if err := s.ApplyRetention(testCtx(t), "rp"); err != nil {
		t.Fatalf("retention after the repair: %v", err)
	}
	if got := pointIDs(t, s, "rp"); !slices.Equal(got, []uint64{4, 5}) {
		t.Fatalf("points after retention: %v, want [4 5]", got)
	}
	if f, ok := s.RetentionFailure("rp"); ok {
		t.Errorf("retention still reports a failure: %+v", f)
	}
	checkPoint(t, s, "rp", 4, repaired)
	checkPoint(t, s, "rp", 5, m)
	for id := uint64(1); id <= 3; id++ {
		if _, err := os.Stat(filepath.Join(s.Dir(), imageRel("rp", "vda", id))); !os.IsNotExist(err) {
			t.Errorf("point %d's image is left: %v", id, err)
		}
	}
	// And on from there: the next points merge as always.
	for id := uint64(6); id <= 7; id++ {
		p = begin(t, s, "rp", id, m, DiskSpec{Name: "vda", Size: 4 << 20})
		p.data("vda", int64(id), 1)
		p.commit()
	}
	if got := pointIDs(t, s, "rp"); !slices.Equal(got, []uint64{6, 7}) {
		t.Fatalf("points after two more: %v, want [6 7]", got)
	}
	checkPoint(t, s, "rp", 7, m)
}

// A VM protected in reverse: its first point's image is an overlay over the
// old production disk, moved into the store (failback.Reverse). Once a
// later point holds the disk whole, retention drops that point without a
// merge, and the disk under it with it: nothing reads it any more. Before,
// the overlay went and the disk stayed, a whole disk's size that only a
// forget of the VM would free.
func TestRetentionDropsTheSeedBelowAWholePoint(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	in := filepath.Join(s.Dir(), "vms", "rs", "vda")
	if err := os.MkdirAll(in, 0o750); err != nil {
		t.Fatal(err)
	}
	seed, m := adoptSeed(t, s, in, "rs")
	p := begin(t, s, "rs", 2, m, DiskSpec{Name: "vda", Size: 4 << 20, Resync: true})
	p.data("vda", 0, 20)
	p.zeros("vda", 20, 44)
	p.commit()
	p = begin(t, s, "rs", 3, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 30, 2)
	p.commit()
	s.keep = 2
	if err := s.ApplyRetention(testCtx(t), "rs"); err != nil {
		t.Fatalf("retention: %v", err)
	}
	if got := pointIDs(t, s, "rs"); !slices.Equal(got, []uint64{2, 3}) {
		t.Fatalf("points after retention: %v, want [2 3]", got)
	}
	checkPoint(t, s, "rs", 3, m)
	if _, err := os.Stat(seed); !os.IsNotExist(err) {
		t.Errorf("the adopted disk under the dropped point is left: %v", err)
	}
}

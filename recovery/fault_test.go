package recovery

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// The store's file system fails (ext4 shut down as on a fatal disk error:
// every I/O fails with EIO) while a point is written: the point is not
// committed, and once the file system is back (mounted again) the store
// opens with the points it had, each reading as written, and takes the
// point again.
func TestStoreFailsMidPoint(t *testing.T) {
	requireQEMU(t)
	fs := testenv.NewFaultyFS(t, 128)
	dir := filepath.Join(fs.Dir, "store")
	s, err := Open(testCtx(t), dir, Options{Keep: 100, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	const size = 4 << 20
	m := model{}
	p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 0, 32)
	p.commit()
	want := m.clone()

	p = begin(t, s, "vv", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 4, 8)
	fs.Fail()
	buf := make([]byte, 4*B)
	werr := p.w.WriteBlocks(testCtx(t), "vda", 20*B, buf, hashes(buf))
	_, cerr := p.w.Commit(testCtx(t), lifeboat.CycleStats{})
	t.Logf("after the failure: write %v; commit %v", werr, cerr)
	if cerr == nil {
		t.Fatal("a point committed while its file system failed")
	}
	aerr := p.w.Abort(context.Background())
	t.Logf("abort: %v", aerr)
	pts, perr := s.Points("vv")
	t.Logf("points while failed: %d %v", len(pts), perr)
	t.Logf("close: %v", s.Close())
	fs.Clear()

	s = openStore(t, dir, 100)
	if ids := pointIDs(t, s, "vv"); !slices.Equal(ids, []uint64{1}) {
		t.Fatalf("points after the file system came back: %v, want [1]", ids)
	}
	checkPoint(t, s, "vv", 1, want)
	if files := imageFiles(t, s, "vv"); len(files) != 1 {
		t.Errorf("images after the file system came back: %v", files)
	}
	m = want.clone()
	p = begin(t, s, "vv", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 4, 8)
	p.commit()
	checkPoint(t, s, "vv", 2, m)
}

// The store's file system fails at each step of a retention merge, and at
// a point's commit after its writes (its images' sync, its catalog
// transaction): the points listed read as written once it is back, and
// retention and the next point go on.
func TestStoreFailsMidMerge(t *testing.T) {
	requireQEMU(t)
	for _, at := range []string{"sync", "catalog", stepRecorded, stepCommitted, stepResized, stepRebased, stepCataloged} {
		t.Run(at, func(t *testing.T) {
			fs := testenv.NewFaultyFS(t, 128)
			dir := filepath.Join(fs.Dir, "store")
			s, err := Open(testCtx(t), dir, Options{Keep: 2, Logger: quietLogger()})
			if err != nil {
				t.Fatal(err)
			}
			const size = 4 << 20
			m := model{}
			models := map[uint64]model{}
			for id := uint64(1); id <= 2; id++ {
				p := begin(t, s, "vv", id, m, DiskSpec{Name: "vda", Size: size})
				p.data("vda", int64(id)*3, 6)
				p.commit()
				models[id] = m.clone()
			}
			failed := false
			fail := func(step string) error {
				if step == at && !failed {
					failed = true
					fs.Fail()
				}
				return nil
			}
			s.testMergeHook = fail
			// The hooks only time the fault: the file system fails for real.
			switch at {
			case "sync":
				testHookSync = func(string) error { return fail("sync") }
				t.Cleanup(func() { testHookSync = nil })
			case "catalog":
				testHookCatalog = func() { fail("catalog") }
				t.Cleanup(func() { testHookCatalog = nil })
			}
			p := begin(t, s, "vv", 3, m, DiskSpec{Name: "vda", Size: size})
			p.data("vda", 1, 5)
			_, cerr := p.w.Commit(testCtx(t), lifeboat.CycleStats{})
			s.SettleRetention()
			if !failed {
				t.Fatalf("the file system was not failed at %s", at)
			}
			if cerr == nil {
				models[3] = m.clone()
			}
			rf, _ := s.RetentionFailure("vv")
			t.Logf("commit: %v; retention: %+v", cerr, rf)
			p.w.Abort(context.Background())
			s.Close()
			testHookSync, testHookCatalog = nil, nil
			fs.Clear()

			s = openStore(t, dir, 2)
			s.SettleRetention()
			ids := pointIDs(t, s, "vv")
			t.Logf("points after the file system came back: %v", ids)
			if len(ids) == 0 || len(ids) > 3 {
				t.Fatalf("points %v", ids)
			}
			for _, id := range ids {
				checkPoint(t, s, "vv", id, models[id])
			}
			next := ids[len(ids)-1] + 1
			m = models[next-1].clone()
			p = begin(t, s, "vv", next, m, DiskSpec{Name: "vda", Size: size})
			p.data("vda", 30, 2)
			p.commit()
			models[next] = m.clone()
			ids = pointIDs(t, s, "vv")
			if len(ids) != 2 || ids[1] != next {
				t.Errorf("points after the next one: %v, want 2 ending with %d", ids, next)
			}
			for _, id := range ids {
				checkPoint(t, s, "vv", id, models[id])
			}
			if f, failing := s.RetentionFailure("vv"); failing {
				t.Errorf("retention still failing: %v", f.Err)
			}
			if files := imageFiles(t, s, "vv"); len(files) != 2 {
				t.Errorf("images: %v", files)
			}
		})
	}
}

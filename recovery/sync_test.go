package recovery

import (
	"errors"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
)

// A point's images are written without flushes and made durable by the
// commit's own fdatasync: a commit whose fdatasync fails lists nothing, says
// which image, and the point is sent again after an abort. The failure is
// injected (testHookSync): a real fdatasync cannot be made to fail here.
func TestCommitThatCannotSyncListsNothing(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 24)
	const size = 4 << 20
	m := model{}
	p := begin(t, s, "vm1", 1, m, DiskSpec{Name: "vda", Size: size, Resync: true})
	p.data("vda", 0, 8)
	p.commit()

	before := model{"vda": append([]byte(nil), m["vda"]...)}
	p = begin(t, s, "vm1", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", p.rng.Int64N(60), 3)
	t.Cleanup(func() { testHookSync = nil })
	testHookSync = func(rel string) error { return errors.New("injected: fdatasync failed") }
	_, err := p.w.Commit(testCtx(t), lifeboat.CycleStats{BytesData: 1})
	testHookSync = nil
	if err == nil || !strings.Contains(err.Error(), "injected") || !strings.Contains(err.Error(), imageRel("vm1", "vda", 2)) {
		t.Fatalf("Commit with a failing fdatasync: %v; want the injected error naming %s", err, imageRel("vm1", "vda", 2))
	}
	if ids := pointIDs(t, s, "vm1"); len(ids) != 1 || ids[0] != 1 {
		t.Fatalf("points after the failed commit: %v, want only 1", ids)
	}
	if err := p.w.Abort(testCtx(t)); err != nil {
		t.Fatalf("Abort after the failed commit: %v", err)
	}
	checkPoint(t, s, "vm1", 1, before)

	m = before
	p = begin(t, s, "vm1", 2, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", p.rng.Int64N(60), 3)
	p.commit()
	checkPoint(t, s, "vm1", 2, m)
}

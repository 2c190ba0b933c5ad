package recovery

import (
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A point's image has subclusters (pointImageOpts), and a store whose older
// points were written as plain qcow2 (before they were) goes on: patches
// above plain images and merges of subclustered images into the plain base
// (keep 2: every commit from point 3 on merges) read back byte-exact and
// verify. No writer is made ahead of point 2 (points come often only from
// its commit on), so points 1 and 2 are plain.
func TestPointImagesHaveSubclusters(t *testing.T) {
	requireQEMU(t)
	saved := pointImageOpts
	t.Cleanup(func() { pointImageOpts = saved })
	s := openStore(t, t.TempDir(), 2)
	const size = 4 << 20
	m := model{}
	for id := uint64(1); id <= 6; id++ {
		plain := id <= 2
		pointImageOpts = saved
		if plain {
			pointImageOpts = nil
		}
		spareOf(s, "vm1") // a writer made ahead was made with the options of its time
		p := begin(t, s, "vm1", id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1})
		pointImageOpts = saved
		p.data("vda", p.rng.Int64N(60), 1+p.rng.Int64N(4))
		if id > 1 {
			p.patch("vda", p.rng.Int64N(60), lifeboat.Dirty(1+p.rng.Uint32N(0xfffe)))
			p.patch("vda", p.rng.Int64N(60), 0x8001)
		}
		file := p.w.disks["vda"].file
		p.commit()
		info, err := qemu.ReadImageInfo(testCtx(t), s.abs(file))
		if err != nil {
			t.Fatal(err)
		}
		if info.ExtendedL2 == plain {
			t.Errorf("point %d: image %s has extended L2 entries: %v, want %v", id, file, info.ExtendedL2, !plain)
		}
		s.SettleRetention()
		for _, pid := range pointIDs(t, s, "vm1") {
			if pid == id {
				checkPoint(t, s, "vm1", id, m)
			}
		}
	}
	if ids := pointIDs(t, s, "vm1"); len(ids) != 2 || ids[1] != 6 {
		t.Fatalf("points after retention: %v, want the last 2", ids)
	}
}

// A qemu-img that does not know extended_l2 (QEMU older than 5.2) refuses
// the option by name; the store then makes plain images from then on, and
// the points are whole. Simulated with an option this qemu-img refuses the
// same way ("Invalid parameter 'extended_l2_…'").
func TestPointImagesWithoutSubclusters(t *testing.T) {
	requireQEMU(t)
	saved := pointImageOpts
	t.Cleanup(func() { pointImageOpts = saved })
	pointImageOpts = []string{"extended_l2_older_qemu=on"}
	s := openStore(t, t.TempDir(), 24)
	writeThreePoints(t, s, func(id uint64, file string) {
		info, err := qemu.ReadImageInfo(testCtx(t), s.abs(file))
		if err != nil {
			t.Fatal(err)
		}
		if info.ExtendedL2 {
			t.Errorf("point %d: image %s has subclusters", id, file)
		}
	})
	if !s.plainImages.Load() {
		t.Error("the store did not note that this QEMU makes plain images only")
	}
}

// TestWriterWithoutNativeAIO: where the kernel refuses QEMU a Linux AIO
// context (fs.aio-max-nr reached), QEMU 7.2 fails the blockdev-add; the store
// must fall back to QEMU's thread pool rather than fail every point. The
// refusal is injected (testHookBlockdevAdd, with QEMU's own message): using
// up the machine's AIO events for real would fail every other test running
// beside this one.
func TestWriterWithoutNativeAIO(t *testing.T) {
	requireQEMU(t)
	var refused, native atomic.Int32
	testHookBlockdevAdd = func(spec map[string]any) error {
		for m := spec; m != nil; m, _ = m["file"].(map[string]any) {
			if m["aio"] == "native" {
				native.Add(1)
				if refused.Add(1) == 1 {
					return fmt.Errorf("Could not open '%v': Unable to use native AIO: failed to create linux AIO context: Resource temporarily unavailable", m["filename"])
				}
			}
		}
		return nil
	}
	t.Cleanup(func() { testHookBlockdevAdd = nil })
	s := openStore(t, t.TempDir(), 24)
	if !s.direct {
		t.Skip("the test directory's file system has no O_DIRECT: the writer uses no native AIO there")
	}
	writeThreePoints(t, s, func(uint64, string) {})
	if refused.Load() == 0 {
		t.Fatal("no blockdev-add asked for native AIO: the test tests nothing")
	}
	if !s.noNativeAIO.Load() {
		t.Error("the store did not note that native AIO is refused")
	}
	if n := native.Load(); n != 1 {
		t.Errorf("%d blockdev-adds asked for native AIO; after the first refusal none should", n)
	}
}

// writeThreePoints writes points 1–3 of vm1 (a resync, then blocks and a
// patch each), calls check with each point's image of vda once committed,
// and checks that every point reads back byte-exact.
func writeThreePoints(t *testing.T, s *Store, check func(id uint64, file string)) {
	t.Helper()
	const size = 4 << 20
	m := model{}
	for id := uint64(1); id <= 3; id++ {
		spareOf(s, "vm1")
		p := begin(t, s, "vm1", id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1})
		p.data("vda", p.rng.Int64N(60), 2)
		if id > 1 {
			p.patch("vda", p.rng.Int64N(60), 0x00f0)
		}
		file := p.w.disks["vda"].file
		p.commit()
		check(id, file)
		checkPoint(t, s, "vm1", id, m)
	}
}

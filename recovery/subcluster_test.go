package recovery

import (
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
		info, err := qemu.ReadImageInfo(testCtx(t), s.abs(file))
		if err != nil {
			t.Fatal(err)
		}
		if info.ExtendedL2 {
			t.Errorf("point %d: image %s has subclusters", id, file)
		}
		checkPoint(t, s, "vm1", id, m)
	}
	if !s.plainImages.Load() {
		t.Error("the store did not note that this QEMU makes plain images only")
	}
}

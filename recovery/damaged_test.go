package recovery

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// An image of the latest point cut short outside lifeboat (a file system
// that lost its tail, a careless copy): the next incremental point, an
// overlay above it, would read zeros where it was cut, and every later
// point after it. Before, it committed without a word, and export wrote the
// zeros out as the disk. Now the point is refused, naming the file and the
// repair (a whole send), which commits and reads right; export refuses the
// damaged point.
func TestPointAboveATruncatedImageIsRefused(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	const size = 4 << 20
	m := model{}
	p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vda", 0, 60)
	p.data("vdb", 0, 4)
	p.commit()
	img, err := s.ImagePath("vv", 1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, fi.Size()/2); err != nil {
		t.Fatal(err)
	}

	p = begin(t, s, "vv", 2, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vda", 1, 1)
	_, err = p.w.Commit(testCtx(t), lifeboat.CycleStats{})
	if err == nil {
		t.Fatalf("a point above a truncated image committed: points %v", pointIDs(t, s, "vv"))
	}
	if !errors.Is(err, qemu.ErrTruncated) || !strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), img) || !strings.Contains(err.Error(), "sync vv --whole") {
		t.Errorf("commit above a truncated image: %v; want it to name the disk, the file and the repair", err)
	}
	if err := p.w.Abort(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ids := pointIDs(t, s, "vv"); !slices.Equal(ids, []uint64{1}) {
		t.Errorf("points %v, want [1]", ids)
	}
	out := filepath.Join(t.TempDir(), "vda.raw")
	if err := s.Export(testCtx(t), "vv", 1, "vda", out, "raw"); !errors.Is(err, qemu.ErrTruncated) || !strings.Contains(err.Error(), `point 1 disk "vda"`) {
		t.Errorf("export of the truncated point: %v", err)
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("the export of a truncated point left an image")
	}

	// The repair: every block of the damaged disk sent again.
	p = begin(t, s, "vv", 3, model{"vda": m["vda"], "vdb": m["vdb"]}, DiskSpec{Name: "vda", Size: size, Resync: true}, DiskSpec{Name: "vdb", Size: size})
	p.data("vda", 0, size/B)
	p.commit()
	checkPoint(t, s, "vv", 3, p.m)
}

// An image of the latest point deleted, or overwritten with something that
// is no qcow2 image, outside lifeboat: the next point cannot be written
// above it. Before, every cycle failed on QEMU's words alone ("Could not
// open ...") and said nothing of what to do; now Begin names the VM, disk
// and file, writes nothing, and says how to go on.
func TestPointAboveAnUnreadableImageIsRefused(t *testing.T) {
	requireQEMU(t)
	for _, tc := range []struct {
		name   string
		damage func(img string) error
	}{
		{"deleted", os.Remove},
		{"header overwritten", func(img string) error {
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteAt(make([]byte, 512), 0)
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), 100)
			m := model{}
			p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: 1 << 20})
			p.data("vda", 0, 4)
			p.commit()
			img, err := s.ImagePath("vv", 1, "vda")
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.damage(img); err != nil {
				t.Fatal(err)
			}
			w, err := s.Begin(testCtx(t), BeginSpec{VM: "vv", ID: 2, Disks: follow(t, s, "vv", 2, []DiskSpec{{Name: "vda", Size: 1 << 20}})})
			if err == nil {
				w.Abort(context.Background())
				t.Fatal("Begin above an unreadable image: no error")
			}
			if !strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), img) || !strings.Contains(err.Error(), "forget vv --yes") {
				t.Errorf("Begin above an unreadable image: %v; want the disk, the file and what to do", err)
			}
			if files := imageFiles(t, s, "vv"); len(files) > 1 {
				t.Errorf("images left: %v", files)
			}
		})
	}
}

// Bytes changed inside a point's image outside lifeboat (a failing disk):
// only a verify can find them. Before, what it found was said once and
// forgotten: the point, and every point above it that reads the damaged
// block, were listed as good, a failover started from them, and each next
// incremental point read the damage on. Now verify marks every listed point
// that reads the damaged block (in the catalog: a restart keeps it), a new
// point above one inherits the mark unless it wrote that block, a failover
// or export refuses a marked point, a point above that wrote the block is
// not marked, and a verify that passes clears the mark.
func TestVerifiedDamageIsMarked(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	const size = 2 << 20
	m := model{}
	p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vda", 0, 32)
	p.data("vdb", 0, 2)
	p.commit()
	p = begin(t, s, "vv", 2, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vdb", 5, 1)
	p.commit()
	img, err := s.ImagePath("vv", 1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	host, guest := dataCluster(t, img)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	orig := make([]byte, 2)
	if _, err := f.ReadAt(orig, host+100); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{^orig[0], ^orig[1]}, host+100); err != nil {
		t.Fatal(err)
	}
	f.Close()

	var ve *VerifyError
	if _, err := s.Verify(testCtx(t), "vv", 2, nil); !errors.As(err, &ve) || ve.Offset != guest {
		t.Fatalf("Verify of point 2: %v", err)
	}
	damaged := func(s *Store, id uint64) *lifeboat.DamageMark {
		t.Helper()
		pt, err := s.Point("vv", id)
		if err != nil {
			t.Fatal(err)
		}
		return pt.Damaged
	}
	for _, id := range []uint64{1, 2} {
		if d := damaged(s, id); d == nil || d.Disk != "vda" || d.Offset != guest || d.Point != 2 {
			t.Errorf("point %d after verify found vda damaged at %d: mark %+v", id, guest, d)
		}
	}
	// A restart keeps the marks.
	s.Close()
	s = openStore(t, dir, 100)
	if d := damaged(s, 2); d == nil {
		t.Fatal("point 2's mark is gone after a restart")
	}
	if err := s.CheckImages("vv", 2); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), "--whole") {
		t.Errorf("CheckImages of the damaged point 2 (as a failover does): %v", err)
	}
	out := filepath.Join(t.TempDir(), "vda.raw")
	if err := s.Export(testCtx(t), "vv", 2, "vda", out, "raw"); !errors.Is(err, ErrDamaged) {
		t.Errorf("export of the damaged disk: %v", err)
	}
	if err := s.Export(testCtx(t), "vv", 2, "vdb", out, "raw"); err != nil {
		t.Errorf("export of the other disk: %v", err)
	}

	// The next incremental point reads the damaged block: it inherits the mark.
	p = begin(t, s, "vv", 3, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vdb", 6, 1)
	if pt := p.commit(); pt.Damaged == nil || pt.Damaged.Disk != "vda" {
		t.Errorf("point 3 above the damage: mark %+v", pt.Damaged)
	}
	// One that writes the damaged block does not.
	p = begin(t, s, "vv", 4, m, DiskSpec{Name: "vda", Size: size}, DiskSpec{Name: "vdb", Size: size})
	p.data("vda", guest/B, 1)
	if pt := p.commit(); pt.Damaged != nil {
		t.Errorf("point 4 wrote the damaged block: mark %+v", pt.Damaged)
	}
	checkPoint(t, s, "vv", 4, m)

	// The bytes put back as they were: a verify that passes clears the
	// marks of the points that read them.
	f, err = os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(orig, host+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := s.Verify(testCtx(t), "vv", 2, nil); err != nil {
		t.Fatalf("Verify of point 2 once repaired: %v", err)
	}
	for _, id := range []uint64{1, 2, 3} {
		if d := damaged(s, id); d != nil {
			t.Errorf("point %d after a verify passed: mark %+v", id, d)
		}
	}
}

// A retention merge into an image cut short outside lifeboat: qemu-img
// commit allocates clusters past the file's end, after which the cut is no
// longer seen (by Begin, a failover, an export), though the lost clusters
// still read as zeros. Before, the merge's read-back check caught the zeros
// only where its sample fell on them, and point 2 was then passed by
// CheckImages. Now the merge waits before touching an image, saying why
// (RetentionFailure, shown by status), the cut stays seen, and a whole send
// with keep points after it ends it.
func TestMergeRefusesATruncatedImage(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 3)
	const size = 4 << 20
	m := model{}
	for id := uint64(1); id <= 3; id++ {
		p := begin(t, s, "vv", id, m, DiskSpec{Name: "vda", Size: size})
		p.data("vda", int64(id-1)*20, 20)
		p.commit()
	}
	img, err := s.ImagePath("vv", 1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, fi.Size()/2); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// keep lowered: retention merges point 1 into point 2 as the store opens.
	s = openStore(t, dir, 2)
	s.SettleRetention()
	f, failing := s.RetentionFailure("vv")
	if !failing || !strings.Contains(f.Err, "truncated") || !strings.Contains(f.Err, img) || !strings.Contains(f.Err, "--whole") {
		t.Errorf("retention over a truncated image: failing %v: %q", failing, f.Err)
	}
	if err := s.CheckImages("vv", 2); !errors.Is(err, qemu.ErrTruncated) {
		t.Errorf("CheckImages of point 2 after retention: %v; its cut must still be seen", err)
	}

	// The repair: a whole send, and keep points from it on.
	p := begin(t, s, "vv", 4, m, DiskSpec{Name: "vda", Size: size, Resync: true})
	p.data("vda", 0, size/B)
	p.commit()
	p = begin(t, s, "vv", 5, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 3, 1)
	p.commit()
	if ids := pointIDs(t, s, "vv"); !slices.Equal(ids, []uint64{4, 5}) {
		t.Errorf("points after the whole send: %v, want [4 5]", ids)
	}
	if f, failing := s.RetentionFailure("vv"); failing {
		t.Errorf("retention still failing after the whole send: %s", f.Err)
	}
	checkPoint(t, s, "vv", 5, m)
}

// An image deleted outside lifeboat (or a store whose images were put back
// from an older backup than its catalog): before, every point that reads it
// was listed as good until a failover, export or the next point tried to
// open it. Now Open marks them (Point.Damaged.Missing, shown by points and
// status; failover and export refuse them), and clears the marks once the
// file is back.
func TestOpenMarksPointsWithAMissingImage(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	m := model{}
	for id := uint64(1); id <= 3; id++ {
		p := begin(t, s, "vv", id, m, DiskSpec{Name: "vda", Size: 1 << 20}, DiskSpec{Name: "vdb", Size: 1 << 20})
		p.data("vda", int64(id), 1)
		p.commit()
	}
	img, err := s.ImagePath("vv", 2, "vda")
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	aside := filepath.Join(t.TempDir(), "aside.qcow2")
	if err := os.Rename(img, aside); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, 100)
	for id, want := range map[uint64]bool{1: false, 2: true, 3: true} {
		pt, err := s.Point("vv", id)
		if err != nil {
			t.Fatal(err)
		}
		if got := pt.Damaged != nil && pt.Damaged.Disk == "vda" && pt.Damaged.Missing == img; got != want {
			t.Errorf("point %d with %s gone: mark %+v, want marked %v", id, img, pt.Damaged, want)
		}
	}
	if err := s.CheckImages("vv", 3); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), img) {
		t.Errorf("CheckImages of point 3, whose chain lost %s: %v", img, err)
	}
	s.Close()
	if err := os.Rename(aside, img); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, 100)
	for id := uint64(1); id <= 3; id++ {
		if pt, err := s.Point("vv", id); err != nil || pt.Damaged != nil {
			t.Errorf("point %d once the image is back: %+v, %v", id, pt.Damaged, err)
		}
	}
	checkPoint(t, s, "vv", 3, m)
}

// A damaged L2 entry (a cluster offset no longer aligned): QEMU answers the
// block's reads, and block status over the image, with EIO. Before, verify
// stopped at the block status with "can't get block status", naming no
// block and no repair, and marked nothing; now it reads every block
// instead, names the first it cannot read, says what to do and marks the
// point.
func TestVerifyFindsAnUnreadableBlock(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 0, 60)
	p.commit()
	img, err := s.ImagePath("vv", 1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	be := binary.BigEndian
	var h [48]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(be.Uint64(h[40:]))); err != nil { // the L1 table's first entry
		t.Fatal(err)
	}
	l2 := int64(be.Uint64(e[:]) &^ (1 << 63))
	// Block 3's L2 entry (16 bytes each: the store's images have subclusters).
	if _, err := f.ReadAt(e[:], l2+3*16); err != nil {
		t.Fatal(err)
	}
	be.PutUint64(e[:], be.Uint64(e[:])|0x200)
	if _, err := f.WriteAt(e[:], l2+3*16); err != nil {
		t.Fatal(err)
	}
	_, err = s.Verify(testCtx(t), "vv", 1, nil)
	var ve *VerifyError
	if !errors.As(err, &ve) || ve.Offset != 3*B || ve.Unreadable == nil || !strings.Contains(err.Error(), "--whole") {
		t.Fatalf("Verify with block 3's L2 entry damaged: %v", err)
	}
	if pt, err := s.Point("vv", 1); err != nil || pt.Damaged == nil || pt.Damaged.Offset != 3*B {
		t.Errorf("point 1 after verify found block 3 unreadable: %+v (%v)", pt.Damaged, err)
	}
}

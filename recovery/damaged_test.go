package recovery

import (
	"context"
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

package recovery

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A catalog damaged outside lifeboat (a file system that lost its tail, a
// disk that flipped bits, a file emptied) is refused by Open with an error
// that names it and says what to do: bbolt panicked on it before, taking
// the whole site down at every start, and an emptied catalog opened as a
// new one, listing none of the VMs whose images lay beside it (the next
// point of such a VM would have been written over them).
func TestOpenRefusesADamagedCatalog(t *testing.T) {
	requireQEMU(t)
	for _, tc := range []struct {
		name   string
		damage func(f *os.File, size int64) error
		want   string
	}{
		{"truncated", func(f *os.File, size int64) error { return f.Truncate(size / 2) }, "damaged"},
		{"pages overwritten", func(f *os.File, size int64) error {
			for off := int64(2 * 4096); off < size; off += 4096 {
				if _, err := f.WriteAt([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, off); err != nil {
					return err
				}
			}
			return nil
		}, "damaged"},
		{"emptied", func(f *os.File, size int64) error { return f.Truncate(0) }, `knows no VM "vv"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, 100)
			writeSeries(t, s, "vv", 3)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			cat := filepath.Join(dir, "catalog.db")
			f, err := os.OpenFile(cat, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			fi, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.damage(f, fi.Size()); err != nil {
				t.Fatal(err)
			}
			f.Close()
			var s2 *Store
			func() {
				defer func() {
					if r := recover(); r != nil {
						err = errors.New("Open panicked")
						t.Errorf("Open of a catalog %s panicked: %v", tc.name, r)
					}
				}()
				s2, err = Open(context.Background(), dir, Options{Keep: 100, Logger: quietLogger()})
			}()
			if err == nil {
				pts, _ := s2.Points("vv")
				s2.Close()
				t.Fatalf("Open of a catalog %s: no error, %d points of vv listed", tc.name, len(pts))
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), cat) || !strings.Contains(err.Error(), "backup") {
				t.Errorf("Open of a catalog %s: %v; want it to say %q, name %s and what to do", tc.name, err, tc.want, cat)
			}
			// The images are still there, for a catalog restored from a backup.
			if len(imageFiles(t, &Store{dir: dir}, "vv")) != 3 {
				t.Errorf("the images of vv were touched: %v", imageFiles(t, &Store{dir: dir}, "vv"))
			}
		})
	}
}

// A catalog put back from a backup older than the images: retention merged
// points since, so the images it names now hold later data, or are gone,
// and later points' images lie beside it. Before, Open listed the old
// points as they were (point 1 exported what a later point held); now it
// refuses, naming the VM and the images it does not know.
func TestOpenRefusesACatalogOlderThanItsImages(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 2)
	const size = 1 << 20
	m := model{}
	write := func(s *Store, id uint64) {
		p := begin(t, s, "vv", id, m, DiskSpec{Name: "vda", Size: size})
		p.data("vda", int64(id%16), 2)
		p.commit()
	}
	write(s, 1)
	write(s, 2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	cat := filepath.Join(dir, "catalog.db")
	old, err := os.ReadFile(cat)
	if err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, 2)
	for id := uint64(3); id <= 5; id++ {
		write(s, id)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cat, old, 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(context.Background(), dir, Options{Keep: 2, Logger: quietLogger()})
	if err == nil {
		ids := pointIDs(t, s2, "vv")
		s2.Close()
		t.Fatalf("Open of a catalog older than its images: no error, points %v listed", ids)
	}
	img := imageRel("vv", "vda", 5)
	if !strings.Contains(err.Error(), `"vv"`) || !strings.Contains(err.Error(), img) || !strings.Contains(err.Error(), "backup") {
		t.Errorf("Open of a catalog older than its images: %v; want it to name the VM, %s and what to do", err, img)
	}
}

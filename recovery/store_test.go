package recovery

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

const B = lifeboat.BlockSize

// requireQEMU skips (or fails under CI) without the tools the store drives.
func requireQEMU(t *testing.T) {
	t.Helper()
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon")
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// openStore opens a store in dir and closes it when the test ends.
func openStore(t *testing.T, dir string, keep int) *Store {
	t.Helper()
	s, err := Open(testCtx(t), dir, Options{Keep: keep, Logger: quietLogger()})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// model is what a VM's disks must read as: disk name → contents.
type model map[string][]byte

func (m model) clone() model {
	c := model{}
	for k, v := range m {
		c[k] = bytes.Clone(v)
	}
	return c
}

// resize gives a modelled disk a new size: a grown tail reads as zeros.
func (m model) resize(disk string, size int64) {
	old := m[disk]
	n := make([]byte, size)
	copy(n, old)
	m[disk] = n
}

// pointWriter writes one point and keeps the model in step.
type pointWriter struct {
	t   *testing.T
	w   *Writer
	m   model
	rng *rand.Rand
}

func begin(t *testing.T, s *Store, vm string, id uint64, m model, disks ...DiskSpec) *pointWriter {
	t.Helper()
	return beginAs(t, s, "", vm, id, m, disks...)
}

// data writes n random blocks from block first (the last one short when the disk ends there).
func (p *pointWriter) data(disk string, first, n int64) {
	p.t.Helper()
	off := first * B
	end := min(off+n*B, int64(len(p.m[disk])))
	buf := make([]byte, end-off)
	for i := range buf {
		buf[i] = byte(p.rng.Uint32())
	}
	if err := p.w.WriteBlocks(testCtx(p.t), disk, off, buf, hashes(buf)); err != nil {
		p.t.Fatalf("WriteBlocks %s at %d: %v", disk, off, err)
	}
	copy(p.m[disk][off:], buf)
}

func (p *pointWriter) zeros(disk string, first, n int64) {
	p.t.Helper()
	off := first * B
	end := min(off+n*B, int64(len(p.m[disk])))
	if err := p.w.WriteZeroes(testCtx(p.t), disk, off, end-off); err != nil {
		p.t.Fatalf("WriteZeroes %s at %d: %v", disk, off, err)
	}
	clear(p.m[disk][off:end])
}

func (p *pointWriter) commit() lifeboat.Point {
	p.t.Helper()
	pt, err := p.w.Commit(testCtx(p.t), lifeboat.CycleStats{BytesData: 1})
	if err != nil {
		p.t.Fatalf("Commit: %v", err)
	}
	p.w.s.SettleRetention() // the tests look at the chain as retention leaves it
	return pt
}

func hashes(data []byte) []lifeboat.Hash {
	var hs []lifeboat.Hash
	for off := 0; off < len(data); off += B {
		hs = append(hs, lifeboat.HashBlock(data[off:min(off+B, len(data))]))
	}
	return hs
}

// exportSum exports a point's disk as raw and returns its SHA-256 and size.
func exportSum(t *testing.T, s *Store, vm string, id uint64, disk string) ([32]byte, int64) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export.raw")
	if err := s.Export(testCtx(t), vm, id, disk, out, "raw"); err != nil {
		t.Fatalf("Export %s point %d disk %s: %v", vm, id, disk, err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b), int64(len(b))
}

// checkPoint exports every disk of the model and compares, and verifies the point.
func checkPoint(t *testing.T, s *Store, vm string, id uint64, m model) {
	t.Helper()
	for disk, want := range m {
		sum, size := exportSum(t, s, vm, id, disk)
		if size != int64(len(want)) {
			t.Errorf("point %d disk %s: export is %d bytes, want %d", id, disk, size, len(want))
		} else if sum != sha256.Sum256(want) {
			t.Errorf("point %d disk %s: export differs from what was written", id, disk)
		}
	}
	if _, err := s.Verify(testCtx(t), vm, id, nil); err != nil {
		t.Errorf("Verify point %d: %v", id, err)
	}
}

func pointIDs(t *testing.T, s *Store, vm string) []uint64 {
	t.Helper()
	pts, err := s.Points(vm)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, p := range pts {
		ids = append(ids, p.ID)
	}
	return ids
}

// imageFiles lists the qcow2 images under the store for a VM.
func imageFiles(t *testing.T, s *Store, vm string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(s.Dir(), "vms", vm, "*", "*.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// crash drops the store as a killed lifeboat would: no abort, no cleanup,
// only the catalog's file lock released (the kernel would do that).
func crash(t *testing.T, s *Store) {
	t.Helper()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
}

// writeSeries writes n points of random data and zero ranges to disk vda (4 MiB)
// and returns the model at each point.
func writeSeries(t *testing.T, s *Store, vm string, n int) []model {
	t.Helper()
	const size = 4 << 20
	m := model{}
	var out []model
	for id := uint64(1); id <= uint64(n); id++ {
		p := begin(t, s, vm, id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1})
		if id == 1 {
			p.data("vda", 0, 64)
			p.zeros("vda", 10, 3)
		} else {
			for range 4 {
				p.data("vda", p.rng.Int64N(60), 1+p.rng.Int64N(4))
			}
			p.zeros("vda", p.rng.Int64N(60), 1+p.rng.Int64N(3))
		}
		p.commit()
		out = append(out, m.clone())
	}
	return out
}

func TestPointsWrittenExportAndVerify(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "web1", 4)
	if got := pointIDs(t, s, "web1"); !slices.Equal(got, []uint64{1, 2, 3, 4}) {
		t.Fatalf("points %v, want 1..4", got)
	}
	for i, m := range models {
		checkPoint(t, s, "web1", uint64(i+1), m)
	}
	// The block map at each point is the fold of what was written.
	for i, m := range models {
		bm, err := s.BlockMap("web1", "vda", uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		// Every block of the model that is not zeros is in the map, with its
		// hash; zeroed blocks are not (they read as zeros, like unwritten ones).
		for b := range int64(64) {
			blk := m["vda"][b*B : (b+1)*B]
			h, ok := bm[b]
			if lifeboat.AllZero(blk) && ok || !lifeboat.AllZero(blk) && h != lifeboat.HashBlock(blk) {
				t.Fatalf("point %d block %d: map says %s (present %v), model disagrees", i+1, b, h, ok)
			}
		}
		for b := range bm {
			if b >= 64 {
				t.Errorf("point %d: block map has block %d, never written", i+1, b)
			}
		}
	}
	p, err := s.Point("web1", 0)
	if err != nil || p.ID != 4 || p.Consistency != lifeboat.Filesystem || len(p.Disks) != 1 || !filepath.IsAbs(p.Disks[0].File) {
		t.Errorf("latest point = %+v, %v", p, err)
	}
	if _, err := s.Point("web1", 9); !errors.Is(err, ErrNoPoint) {
		t.Errorf("Point 9: %v, want ErrNoPoint", err)
	}
	if vms, _ := s.VMs(); len(vms) != 1 || vms[0] != "web1" {
		t.Errorf("VMs = %v", vms)
	}
}

func TestPointListedOnlyAfterCommit(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	m := model{}
	p := begin(t, s, "db1", 5, m, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 0, 4)
	if _, ok, err := s.Latest("db1"); ok || err != nil {
		t.Fatalf("a point in progress is listed (ok=%v, err=%v)", ok, err)
	}
	if vms, _ := s.VMs(); len(vms) != 0 {
		t.Errorf("VMs lists %v before any commit", vms)
	}
	p.commit()
	if got := pointIDs(t, s, "db1"); !slices.Equal(got, []uint64{5}) {
		t.Fatalf("after commit points = %v, want [5]", got)
	}
	// Ids must grow.
	if _, err := s.Begin(testCtx(t), BeginSpec{VM: "db1", ID: 5, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}); err == nil {
		t.Error("Begin accepted a point id that is not after the latest")
	}
	// The catalog survives a reopen.
	s.Close()
	s2 := openStore(t, dir, 100)
	checkPoint(t, s2, "db1", 5, m)
}

func TestBeginRejectsBadSpecs(t *testing.T) {
	s := openStore(t, t.TempDir(), 0)
	tests := []struct {
		name string
		spec BeginSpec
	}{
		{"vm name with a slash", BeginSpec{VM: "a/b", ID: 1, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}},
		{"vm name ..", BeginSpec{VM: "..", ID: 1, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}},
		{"id 0", BeginSpec{VM: "x", ID: 0, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}},
		{"no disks", BeginSpec{VM: "x", ID: 1}},
		{"disk twice", BeginSpec{VM: "x", ID: 1, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}, {Name: "vda", Size: 1 << 20}}}},
		{"odd size", BeginSpec{VM: "x", ID: 1, Disks: []DiskSpec{{Name: "vda", Size: 1000}}}},
		{"disk name with a comma", BeginSpec{VM: "x", ID: 1, Disks: []DiskSpec{{Name: "a,b", Size: 1 << 20}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if w, err := s.Begin(testCtx(t), tt.spec); err == nil {
				w.Abort(context.Background())
				t.Error("Begin accepted it")
			}
		})
	}
}

func TestWriteChecksRangesAndHashes(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	size := int64(1<<20 + 512) // a short last block
	p := begin(t, s, "app", 1, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", 0, 4)
	ctx := testCtx(t)

	// A bad hash in the third block of four: nothing of the call is written.
	buf := bytes.Repeat([]byte{0xee}, 4*B)
	hs := hashes(buf)
	hs[2][0] ^= 1
	err := p.w.WriteBlocks(ctx, "vda", 0, buf, hs)
	var hm *HashMismatchError
	if !errors.As(err, &hm) || hm.VM != "app" || hm.Disk != "vda" || hm.Offset != 2*B {
		t.Fatalf("WriteBlocks with a bad hash: %v, want HashMismatchError at offset %d", err, 2*B)
	}
	bad := []struct {
		name string
		off  int64
		data []byte
	}{
		{"unaligned offset", 512, make([]byte, B)},
		{"partial block mid-disk", B, make([]byte, B/2)},
		{"past the end", 16 * B, make([]byte, B)},
		{"negative offset", -B, make([]byte, B)},
	}
	for _, tt := range bad {
		if err := p.w.WriteBlocks(ctx, "vda", tt.off, tt.data, hashes(tt.data)); err == nil {
			t.Errorf("%s: WriteBlocks accepted it", tt.name)
		}
	}
	if err := p.w.WriteBlocks(ctx, "vdz", 0, buf[:B], hs[:1]); !errors.Is(err, ErrNoDisk) {
		t.Errorf("unknown disk: %v, want ErrNoDisk", err)
	}
	if err := p.w.WriteZeroes(ctx, "vda", 100, B); err == nil {
		t.Error("WriteZeroes accepted an unaligned offset")
	}
	// The short last block.
	p.data("vda", 16, 1)
	if len(m["vda"])-16*B != 512 {
		t.Fatalf("model's last block is %d bytes", len(m["vda"])-16*B)
	}
	p.commit()
	checkPoint(t, s, "app", 1, m)
	bm, err := s.BlockMap("app", "vda", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(bm) != 5 {
		t.Errorf("block map has %d blocks, want 5 (0-3 and the short 16)", len(bm))
	}
}

func TestConcurrentWrites(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "par", 1, m, DiskSpec{Name: "vda", Size: 8 << 20}, DiskSpec{Name: "vdb", Size: 2 << 20})
	// Build the data up front, write it from many goroutines.
	type job struct {
		disk string
		off  int64
		buf  []byte
		zero bool
	}
	var jobs []job
	for b := int64(0); b < 128; b += 2 {
		buf := make([]byte, 2*B)
		for i := range buf {
			buf[i] = byte(p.rng.Uint32())
		}
		jobs = append(jobs, job{"vda", b * B, buf, b%16 == 6})
	}
	for b := int64(0); b < 32; b++ {
		jobs = append(jobs, job{"vdb", b * B, bytes.Repeat([]byte{byte(b + 1)}, B), false})
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(jobs))
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if j.zero {
				errs <- p.w.WriteZeroes(testCtx(t), j.disk, j.off, int64(len(j.buf)))
			} else {
				errs <- p.w.WriteBlocks(testCtx(t), j.disk, j.off, j.buf, hashes(j.buf))
			}
		}()
		if j.zero {
			clear(m[j.disk][j.off : j.off+int64(len(j.buf))])
		} else {
			copy(m[j.disk][j.off:], j.buf)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	p.commit()
	checkPoint(t, s, "par", 1, m)
}

func TestInterruptedPointDiscardedOnOpen(t *testing.T) {
	requireQEMU(t)
	tests := []struct {
		name string
		// interrupt does what happens to the writer before the site "crashes".
		interrupt func(t *testing.T, w *Writer)
	}{
		{"daemon killed mid-point", func(t *testing.T, w *Writer) {
			if err := w.daemon.Kill(); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, B)
			if err := w.WriteBlocks(testCtx(t), "vda", 0, buf, hashes(buf)); err == nil {
				t.Error("a write to a killed daemon succeeded")
			}
			if _, err := w.Commit(testCtx(t), lifeboat.CycleStats{}); err == nil {
				t.Error("Commit of a point whose daemon died succeeded")
			}
		}},
		// The daemon keeps running: Open must kill it by its pid file.
		{"lifeboat killed with its daemon left running", func(t *testing.T, w *Writer) {}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(testCtx(t), dir, Options{Keep: 100, Logger: quietLogger()})
			if err != nil {
				t.Fatal(err)
			}
			models := writeSeries(t, s, "vm1", 2)
			m := models[1].clone()
			p := begin(t, s, "vm1", 3, m, DiskSpec{Name: "vda", Size: 4 << 20}, DiskSpec{Name: "vdb", Size: 1 << 20})
			p.data("vda", 0, 8)
			p.data("vdb", 0, 8)
			daemon := p.w.daemon
			t.Cleanup(func() { daemon.Kill() })
			pendingFiles := []string{s.abs(p.w.disks["vda"].file), s.abs(p.w.disks["vdb"].file)}
			tt.interrupt(t, p.w)
			crash(t, s)

			s2 := openStore(t, dir, 100)
			select {
			case <-daemon.Exited():
			case <-time.After(5 * time.Second):
				t.Error("the interrupted point's daemon is still running after Open")
			}
			if got := pointIDs(t, s2, "vm1"); !slices.Equal(got, []uint64{1, 2}) {
				t.Fatalf("points after reopen = %v, want [1 2]", got)
			}
			for _, f := range pendingFiles {
				if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("image %s of the interrupted point still exists (%v)", f, err)
				}
			}
			for i, m := range models {
				checkPoint(t, s2, "vm1", uint64(i+1), m)
			}
			// The next point continues the chain.
			m = models[1].clone()
			p = begin(t, s2, "vm1", 3, m, DiskSpec{Name: "vda", Size: 4 << 20})
			p.data("vda", 3, 2)
			p.commit()
			checkPoint(t, s2, "vm1", 3, m)
		})
	}
}

func TestAbortIsIdempotent(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	p := begin(t, s, "ab", 1, model{}, DiskSpec{Name: "vda", Size: 1 << 20})
	p.data("vda", 0, 2)
	for range 2 {
		if err := p.w.Abort(testCtx(t)); err != nil {
			t.Fatal(err)
		}
	}
	if files := imageFiles(t, s, "ab"); len(files) != 0 {
		t.Errorf("images left after Abort: %v", files)
	}
	if _, err := p.w.Commit(testCtx(t), lifeboat.CycleStats{}); err == nil {
		t.Error("Commit after Abort succeeded")
	}
	// Close aborts what is still being written.
	p2 := begin(t, s, "ab2", 1, model{}, DiskSpec{Name: "vda", Size: 1 << 20})
	p2.data("vda", 0, 1)
	file := s.abs(p2.w.disks["vda"].file)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Close left the image of a point in progress: %v", err)
	}
	s = openStore(t, s.Dir(), 100)
	// The VM is free for the next writer at once.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := s.Begin(ctx, BeginSpec{VM: "ab", ID: 1, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20, Lineage: "l", Resync: true}}})
	if err != nil {
		t.Fatal(err)
	}
	w.Abort(ctx)
}

// dataCluster finds, with qemu-img map, the host offset of a data cluster that
// an image holds itself (not its backing), and the guest offset it maps.
func dataCluster(t *testing.T, image string) (host, guest int64) {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "--output=json", "-U", image).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var extents []struct {
		Start  int64 `json:"start"`
		Depth  int   `json:"depth"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
		Offset *int64
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatal(err)
	}
	for _, e := range extents {
		if e.Depth == 0 && e.Data && !e.Zero && e.Offset != nil {
			return *e.Offset, e.Start
		}
	}
	t.Fatalf("no data cluster in %s: %s", image, out)
	return 0, 0
}

func TestVerifyFindsCorruption(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	p := begin(t, s, "vv", 1, m, DiskSpec{Name: "vda", Size: 2 << 20}, DiskSpec{Name: "vdb", Size: 2 << 20})
	p.data("vda", 0, 32)
	p.data("vdb", 0, 32)
	p.commit()
	p = begin(t, s, "vv", 2, m, DiskSpec{Name: "vda", Size: 2 << 20}, DiskSpec{Name: "vdb", Size: 2 << 20})
	p.data("vdb", 20, 2)
	p.zeros("vdb", 5, 1)
	p.commit()
	var calls int
	var last, total int64
	rep, err := s.Verify(testCtx(t), "vv", 2, func(d, tot int64) { calls++; last, total = d, tot })
	if err != nil {
		t.Fatal(err)
	}
	// vdb: 31 data blocks; the zeroed one reads as zeros without being read.
	if len(rep.Disks) != 2 || rep.Disks[1].Blocks != 31 || rep.Disks[1].Bytes != 31*B || calls == 0 || last != total || total != 63*B {
		t.Errorf("report %+v, progress calls %d last %d/%d", rep, calls, last, total)
	}

	img, err := s.ImagePath("vv", 2, "vdb")
	if err != nil {
		t.Fatal(err)
	}
	// A replica is readable by its owner only.
	if fi, err := os.Stat(img); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Errorf("point 2's image %s: mode %v, want 0600", img, fi.Mode().Perm())
	}
	host, guest := dataCluster(t, img)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xde, 0xad}, host+100); err != nil {
		t.Fatal(err)
	}
	f.Close()

	_, err = s.Verify(testCtx(t), "vv", 2, nil)
	var ve *VerifyError
	if !errors.As(err, &ve) || ve.VM != "vv" || ve.Point != 2 || ve.Disk != "vdb" || ve.Offset != guest {
		t.Fatalf("Verify after corrupting vdb at %d: %v", guest, err)
	}
	// Point 1 does not read point 2's image.
	if _, err := s.Verify(testCtx(t), "vv", 1, nil); err != nil {
		t.Errorf("Verify of the untouched point 1: %v", err)
	}
}

func TestRetentionKeepsNewestPointsIntact(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	models := writeSeries(t, s, "r1", 6)
	s.Close()

	s = openStore(t, dir, 3)
	if err := s.ApplyRetention(testCtx(t), "r1"); err != nil {
		t.Fatal(err)
	}
	if got := pointIDs(t, s, "r1"); !slices.Equal(got, []uint64{4, 5, 6}) {
		t.Fatalf("points after retention = %v, want [4 5 6]", got)
	}
	for i := 3; i < 6; i++ {
		checkPoint(t, s, "r1", uint64(i+1), models[i])
	}
	if files := imageFiles(t, s, "r1"); len(files) != 3 {
		t.Errorf("images after retention: %v, want 3", files)
	}
	// Commit applies retention by itself.
	m := models[5].clone()
	p := begin(t, s, "r1", 7, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 1, 1)
	p.commit()
	if got := pointIDs(t, s, "r1"); !slices.Equal(got, []uint64{5, 6, 7}) {
		t.Fatalf("points after commit = %v, want [5 6 7]", got)
	}
	checkPoint(t, s, "r1", 5, models[4])
	checkPoint(t, s, "r1", 7, m)
}

// A commit answers without waiting for the retention it starts (the
// protected site's RPO does not pay for a merge), the next point's writer
// waits for the merge instead of writing beside it, and the merge then
// leaves the newest points as they were.
func TestCommitAnswersBeforeRetention(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "a1", 3)
	s.keep = 2
	started, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	// The hook holds the merge at its first step (a slow merge, on demand).
	s.testMergeHook = func(step string) error {
		if step == stepRecorded {
			once.Do(func() { close(started) })
			<-release
		}
		return nil
	}
	m := models[2].clone()
	p := begin(t, s, "a1", 4, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 5, 2)
	committed := make(chan error, 1)
	go func() {
		_, err := p.w.Commit(testCtx(t), lifeboat.CycleStats{BytesData: 1})
		committed <- err
	}()
	select {
	case err := <-committed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		close(release)
		t.Fatal("Commit waited for the retention merge it started")
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		close(release)
		t.Fatal("no retention merge started after the commit")
	}
	// The next point is written beside the merge: it begins while the merge
	// is held before its data is committed, and goes on writing while the
	// merge commits, rewrites headers and deletes point 2's image.
	bctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	w5, err := s.Begin(bctx, BeginSpec{VM: "a1", ID: 5, Instant: time.Unix(1005, 0).UTC(),
		Disks: follow(t, s, "a1", 5, []DiskSpec{{Name: "vda", Size: 4 << 20}})})
	cancel()
	if err != nil {
		close(release)
		t.Fatalf("a point could not begin beside a merge of older points: %v", err)
	}
	m5 := m.clone()
	t.Cleanup(func() { w5.Abort(context.Background()) })
	p5 := &pointWriter{t: t, w: w5, m: m5, rng: rand.New(rand.NewPCG(testenv.Seed(t), 5))}
	p5.data("vda", 7, 3)
	close(release)
	p5.zeros("vda", 40, 2)
	p5.zeros("vda", 24, zeroProbe/B+4) // long: asks the chain which blocks hold data, mid-merge
	s.SettleRetention()                // 1 into 2, then 2 into 3, beside the writer
	if got := pointIDs(t, s, "a1"); !slices.Equal(got, []uint64{3, 4}) {
		t.Fatalf("points after the background retention = %v, want [3 4]", got)
	}
	p5.data("vda", 1, 2) // reads back nothing, but the writer's chain was merged under it
	p5.commit()          // and 3 into 4
	if got := pointIDs(t, s, "a1"); !slices.Equal(got, []uint64{4, 5}) {
		t.Fatalf("points after the next commit's retention = %v, want [4 5]", got)
	}
	checkPoint(t, s, "a1", 4, m)
	checkPoint(t, s, "a1", 5, m5)
}

// TestMergeIntoLatestWaitsForWriter: with keep 1 the merge's Keep is the
// latest point, whose image a writer's new image names as its backing; the
// merge deletes that image. So such a merge and a writer exclude each other,
// and a point committed while the merge waited is rebased before the image
// goes.
func TestMergeIntoLatestWaitsForWriter(t *testing.T) {
	requireQEMU(t)
	hold := func(s *Store) (started, release chan struct{}) {
		started, release = make(chan struct{}), make(chan struct{})
		var once sync.Once
		s.testMergeHook = func(step string) error {
			if step == stepRecorded {
				once.Do(func() { close(started); <-release })
			}
			return nil
		}
		return started, release
	}
	t.Run("a point waits for the merge", func(t *testing.T) {
		s := openStore(t, t.TempDir(), 100)
		models := writeSeries(t, s, "a1", 2)
		s.keep = 1
		started, release := hold(s)
		s.retainLater("a1")
		<-started
		ctx, cancel := context.WithTimeout(testCtx(t), 300*time.Millisecond)
		_, err := s.Begin(ctx, BeginSpec{VM: "a1", ID: 3, Instant: time.Unix(1003, 0).UTC(),
			Disks: follow(t, s, "a1", 3, []DiskSpec{{Name: "vda", Size: 4 << 20}})})
		cancel()
		close(release)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a point began while the latest point's image was being merged (Begin: %v)", err)
		}
		s.SettleRetention()
		if got := pointIDs(t, s, "a1"); !slices.Equal(got, []uint64{2}) {
			t.Fatalf("points = %v, want [2]", got)
		}
		checkPoint(t, s, "a1", 2, models[1])
	})
	t.Run("the merge waits for the point", func(t *testing.T) {
		s := openStore(t, t.TempDir(), 100)
		models := writeSeries(t, s, "a1", 2)
		s.keep = 1
		started, release := hold(s)
		close(release)
		m3 := models[1].clone()
		p3 := begin(t, s, "a1", 3, m3, DiskSpec{Name: "vda", Size: 4 << 20}) // its image's backing is point 2's
		p3.data("vda", 2, 2)
		s.retainLater("a1") // plans 1 into 2, 2 being the latest
		select {
		case <-started:
			t.Fatal("a merge into the latest point ran while a point was written on it")
		case <-time.After(300 * time.Millisecond):
		}
		p3.commit() // the merge runs now, and finds point 3 above point 2
		<-started
		if got := pointIDs(t, s, "a1"); !slices.Equal(got, []uint64{3}) {
			t.Fatalf("points = %v, want [3]", got)
		}
		checkPoint(t, s, "a1", 3, m3)
		if fs := imageFiles(t, s, "a1"); len(fs) != 1 {
			t.Errorf("images left: %v, want one", fs)
		}
	})
}

func TestRetentionCrashFinishedOnOpen(t *testing.T) {
	requireQEMU(t)
	for _, step := range []string{stepRecorded, stepCommitted, stepResized, stepRebased, stepCataloged} {
		t.Run("after "+step, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(testCtx(t), dir, Options{Keep: 100, Logger: quietLogger()})
			if err != nil {
				t.Fatal(err)
			}
			models := writeSeries(t, s, "c1", 5)
			s.keep = 3
			// The hook stands in for a crash at an exact step, which the real
			// processes cannot be made to do.
			s.testMergeHook = func(got string) error {
				if got == step {
					return errMergeStopped
				}
				return nil
			}
			if err := s.ApplyRetention(testCtx(t), "c1"); !errors.Is(err, errMergeStopped) {
				t.Fatalf("ApplyRetention: %v, want it stopped", err)
			}
			// The point being merged away is no longer listed.
			if got := pointIDs(t, s, "c1"); !slices.Equal(got, []uint64{2, 3, 4, 5}) {
				t.Errorf("points during the merge = %v, want [2 3 4 5]", got)
			}
			crash(t, s)

			// keep 100 at the reopen: Open finishes the recorded merge
			// whatever keep is, and would catch up on keep 3 at once.
			s2 := openStore(t, dir, 100)
			if got := pointIDs(t, s2, "c1"); !slices.Equal(got, []uint64{2, 3, 4, 5}) {
				t.Fatalf("points after reopen = %v, want [2 3 4 5]", got)
			}
			for i := 1; i < 5; i++ {
				checkPoint(t, s2, "c1", uint64(i+1), models[i])
			}
			if files := imageFiles(t, s2, "c1"); len(files) != 4 {
				t.Errorf("images after the finished merge: %v, want 4", files)
			}
			s2.keep = 3
			if err := s2.ApplyRetention(testCtx(t), "c1"); err != nil {
				t.Fatal(err)
			}
			for i := 2; i < 5; i++ {
				checkPoint(t, s2, "c1", uint64(i+1), models[i])
			}
		})
	}
}

func TestDiskGrowsShrinksAndIsAdded(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	var models []model
	p := begin(t, s, "g1", 1, m, DiskSpec{Name: "vda", Size: 1<<20 + 512})
	p.data("vda", 0, 17)
	p.commit()
	models = append(models, m.clone())

	// vda grows (its short last block gets a zero tail), vdb appears.
	p = begin(t, s, "g1", 2, m, DiskSpec{Name: "vda", Size: 2 << 20}, DiskSpec{Name: "vdb", Size: 1 << 20})
	p.data("vda", 20, 3)
	p.data("vdb", 0, 16)
	p.commit()
	models = append(models, m.clone())
	bm, err := s.BlockMap("g1", "vda", 2)
	if err != nil {
		t.Fatal(err)
	}
	if h := bm[16]; h != lifeboat.UnknownHash {
		t.Errorf("the block whose size changed with the disk: the block map says %s, want unknown", h)
	}

	// vda shrinks to a short last block; vdb stays.
	p = begin(t, s, "g1", 3, m, DiskSpec{Name: "vda", Size: 1<<20 - 1024}, DiskSpec{Name: "vdb", Size: 1 << 20})
	p.data("vdb", 2, 1)
	p.commit()
	models = append(models, m.clone())

	// vda goes away.
	p = begin(t, s, "g1", 4, m, DiskSpec{Name: "vdb", Size: 1 << 20})
	delete(m, "vda")
	p.data("vdb", 3, 1)
	p.commit()
	models = append(models, m.clone())

	for i, m := range models {
		checkPoint(t, s, "g1", uint64(i+1), m)
	}
	if _, err := s.ImagePath("g1", 4, "vda"); !errors.Is(err, ErrNoDisk) {
		t.Errorf("ImagePath of a removed disk: %v, want ErrNoDisk", err)
	}

	// Merging across every size change keeps what each point reads.
	for _, r := range []struct{ keep, first int }{{3, 1}, {2, 2}, {1, 3}} {
		keep, first := r.keep, r.first
		s.keep = keep
		if err := s.ApplyRetention(testCtx(t), "g1"); err != nil {
			t.Fatal(err)
		}
		for i := first; i < len(models); i++ {
			checkPoint(t, s, "g1", uint64(i+1), models[i])
		}
	}
}

func TestExportFormats(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "ex", 2)
	raw := filepath.Join(t.TempDir(), "vda.raw")
	if err := s.Export(testCtx(t), "ex", 2, "vda", raw, "raw"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(raw); !bytes.Equal(b, models[1]["vda"]) {
		t.Fatal("raw export differs from what was written")
	}
	for _, format := range []string{"qcow2", "vmdk"} {
		t.Run(format, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "vda."+format)
			if err := s.Export(testCtx(t), "ex", 2, "vda", out, format); err != nil {
				t.Fatal(err)
			}
			info, err := qemu.ReadImageInfo(testCtx(t), out)
			if err != nil {
				t.Fatal(err)
			}
			if info.Format != format || info.BackingFile != "" {
				t.Errorf("exported image: format %q backing %q", info.Format, info.BackingFile)
			}
			same, err := qemu.Compare(testCtx(t), out, raw)
			if err != nil || !same {
				t.Errorf("%s export compares %v to the raw one (%v)", format, same, err)
			}
		})
	}
	if err := s.Export(testCtx(t), "ex", 2, "vda", filepath.Join(t.TempDir(), "x"), "no-such-format"); err == nil {
		t.Error("Export to an unknown format succeeded")
	}
	if err := s.Export(testCtx(t), "ex", 7, "vda", filepath.Join(t.TempDir(), "x"), "raw"); !errors.Is(err, ErrNoPoint) {
		t.Errorf("Export of a missing point: %v, want ErrNoPoint", err)
	}
}

// An export that fails leaves a file already at its path as it was (before,
// it was deleted), and one into a missing directory says so.
func TestExportFailureKeepsAnExistingFile(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "ex", 2)
	dir := t.TempDir()
	out := filepath.Join(dir, "vda.raw")
	old := []byte("an earlier export the user keeps")
	if err := os.WriteFile(out, old, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		point  uint64
		format string
	}{{2, "no-such-format"}, {7, "raw"}} {
		if err := s.Export(testCtx(t), "ex", c.point, "vda", out, c.format); err == nil {
			t.Errorf("export of point %d as %s succeeded", c.point, c.format)
		}
		if b, err := os.ReadFile(out); err != nil || !bytes.Equal(b, old) {
			t.Errorf("after a failed export of point %d as %s, the file there reads %q (%v), want it as it was", c.point, c.format, b, err)
		}
	}
	if err := s.Export(testCtx(t), "ex", 2, "vda", out, "raw"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, models[1]["vda"]) {
		t.Error("an export over an existing file differs from what was written")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("files beside the export: %v, want only it", ents)
	}
	missing := filepath.Join(dir, "no-such-dir", "vda.raw")
	if err := s.Export(testCtx(t), "ex", 2, "vda", missing, "raw"); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("export into a missing directory: %v, want it said", err)
	}
}

func TestReadersWhileAPointIsWritten(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "rw", 2)
	m := models[1].clone()
	p := begin(t, s, "rw", 3, m, DiskSpec{Name: "vda", Size: 4 << 20})
	p.data("vda", 0, 8)

	// Committed points stay readable while the next one is written over them.
	checkPoint(t, s, "rw", 2, models[1])
	checkPoint(t, s, "rw", 1, models[0])

	// A second writer for the VM waits, bounded by its context.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if w, err := s.Begin(ctx, BeginSpec{VM: "rw", ID: 4, Disks: []DiskSpec{{Name: "vda", Size: 4 << 20}}}); !errors.Is(err, context.DeadlineExceeded) {
		if err == nil {
			w.Abort(context.Background())
		}
		t.Fatalf("a second writer while the first was writing: %v, want it to wait until its deadline", err)
	}
	// Retention waits for the writer too.
	s.keep = 1
	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := s.ApplyRetention(ctx, "rw"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal("retention ran while a point was being written over the chain")
	}
	s.keep = 100
	p.commit()
	checkPoint(t, s, "rw", 3, m)
}

// A disk's size changes from point to point, to sizes off the block grid, and
// its block map still describes every block: a block's hash, absent when it
// reads as zeros, or lifeboat.UnknownHash where a size change altered the
// block without a write (the short last block of the smaller size: no record
// holds its content). Left out, such a block read as zeros to a hash resync,
// which then skipped it when the source had zeroed it, and the point kept the
// replica's old bytes while `verify` said OK.
func TestBlockMapAcrossResizes(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	m := model{}
	steps := []struct {
		size    int64
		write   []int64 // blocks written whole (the last one short when the disk ends there)
		unknown []int64 // blocks the map must report as unknown
	}{
		{20*B + B/2, []int64{0, 5, 19, 20}, nil},
		{40 * B, []int64{3}, []int64{20}},       // grew from a short last block, not written since
		{12*B + 3*B/4, []int64{1}, []int64{12}}, // shrank into block 12
		{30 * B, nil, []int64{12}},              // grew again: block 12 still holds only its first 48 KiB
		{30 * B, []int64{12, 25}, nil},          // written: known again
		{30*B + B/4, []int64{3}, nil},           // a grow from the grid: the new short block reads as zeros
	}
	for i, st := range steps {
		id := uint64(i + 1)
		p := begin(t, s, "rs", id, m, DiskSpec{Name: "vda", Size: st.size})
		for _, b := range st.write {
			p.data("vda", b, 1)
		}
		p.commit()
		checkPoint(t, s, "rs", id, m)
		bm, err := s.BlockMap("rs", "vda", id)
		if err != nil {
			t.Fatal(err)
		}
		var unknown []int64
		for b := range blockCount(st.size) {
			blk := m["vda"][b*B : min((b+1)*B, st.size)]
			h, ok := bm[b]
			switch {
			case h == lifeboat.UnknownHash:
				unknown = append(unknown, b)
			case lifeboat.AllZero(blk) && ok, !lifeboat.AllZero(blk) && h != lifeboat.HashBlock(blk):
				t.Errorf("point %d (size %d) block %d: map says %s (present %v), the disk holds %s", id, st.size, b, h, ok, lifeboat.HashBlock(blk))
			}
		}
		for b := range bm {
			if b >= blockCount(st.size) {
				t.Errorf("point %d: block map has block %d, past the disk's end", id, b)
			}
		}
		if !slices.Equal(unknown, st.unknown) {
			t.Errorf("point %d (size %d): unknown blocks %v, want %v", id, st.size, unknown, st.unknown)
		}
	}
}

package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// servers are the real NBD servers every round-trip test runs against. Each
// returns a writable 64 MiB export.
var servers = []struct {
	name             string
	start            func(t *testing.T) string
	wantMin, wantMax uint32 // advertised block sizes, when the test pins them
}{
	{"nbdkit-memory", func(t *testing.T) string { return startNbdkit(t, "memory", "64M") }, 0, 0},
	{"qemu-nbd-qcow2", func(t *testing.T) string { return startQemuNbd(t, qcow2(t, "64M"), "qcow2") }, 0, 0},
	{"qsd-qcow2", func(t *testing.T) string { return startQSD(t, qcow2(t, "64M"), `"writable":true`) }, 0, 0},
	// 512-byte minimum and 64 KiB maximum block size, enforced with EINVAL:
	// exercises splitting and the unaligned edge handling.
	{"nbdkit-strict-blocksize", func(t *testing.T) string {
		return startNbdkit(t, "--filter=blocksize-policy", "memory", "64M",
			"blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=64K", "blocksize-error-policy=error")
	}, 512, 64 << 10},
	// No write-zeroes: WriteZeroes writes zero buffers.
	{"nbdkit-nozero", func(t *testing.T) string {
		return startNbdkit(t, "--filter=nozero", "memory", "64M", "zeromode=none")
	}, 0, 0},
}

func ctx10s(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRoundTrip(t *testing.T) {
	for _, s := range servers {
		t.Run(s.name, func(t *testing.T) {
			addr := s.start(t)
			c := dial(t, addr, Options{})
			ctx := ctx10s(t)
			if c.Size() != 64<<20 {
				t.Fatalf("Size = %d, want %d", c.Size(), 64<<20)
			}
			if c.ReadOnly() {
				t.Fatal("writable export reported read-only")
			}
			if mn, _, mx := c.BlockSizes(); s.wantMin != 0 && (mn != s.wantMin || mx != s.wantMax) {
				t.Fatalf("BlockSizes min %d max %d; want %d, %d", mn, mx, s.wantMin, s.wantMax)
			}
			rng := rand.NewChaCha8(seedKey(testenv.Seed(t), 0))
			shadow := make([]byte, c.Size()) // what the export must hold
			// Unaligned offsets and lengths, some larger than the max block size.
			for _, w := range []struct{ off, n int64 }{
				{0, 1}, {1, 4095}, {4097, 70000}, {1<<20 + 3, 3 << 20}, {c.Size() - 777, 777}, {5 << 20, 33 << 20},
			} {
				p := make([]byte, w.n)
				rng.Read(p)
				if err := c.Write(ctx, p, w.off, false); err != nil {
					t.Fatalf("Write(off %d, len %d): %v", w.off, w.n, err)
				}
				copy(shadow[w.off:], p)
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatalf("Flush: %v", err)
			}
			// Zero an unaligned range inside data, and trim (contents undefined after).
			if err := c.WriteZeroes(ctx, 4097+100, 50000, 0); err != nil {
				t.Fatalf("WriteZeroes: %v", err)
			}
			clear(shadow[4097+100 : 4097+100+50000])
			if err := c.WriteZeroes(ctx, 8<<20+1, 1<<20, ZeroNoHole); err != nil {
				t.Fatalf("WriteZeroes(NoHole): %v", err)
			}
			clear(shadow[8<<20+1 : 9<<20+1])
			if err := c.Trim(ctx, 50<<20, 1<<20); err != nil {
				t.Fatalf("Trim: %v", err)
			}
			if err := c.Write(ctx, shadow[50<<20:51<<20], 50<<20, true); err != nil {
				t.Fatalf("Write(fua) after trim: %v", err)
			}

			got := make([]byte, c.Size())
			if err := c.Read(ctx, got, 0); err != nil {
				t.Fatalf("Read whole export: %v", err)
			}
			if i := firstDiff(got, shadow); i >= 0 {
				t.Fatalf("export differs from what was written at offset %d: got %#x want %#x", i, got[i], shadow[i])
			}
			// Unaligned small reads through io.ReaderAt.
			for _, r := range []struct{ off, n int64 }{{3, 5}, {4095, 2}, {c.Size() - 10, 10}} {
				p := make([]byte, r.n)
				if n, err := c.ReadAt(p, r.off); err != nil || n != len(p) {
					t.Fatalf("ReadAt(off %d, len %d) = %d, %v", r.off, r.n, n, err)
				}
				if !bytes.Equal(p, shadow[r.off:r.off+r.n]) {
					t.Fatalf("ReadAt(off %d, len %d) wrong data", r.off, r.n)
				}
			}
			// Block status at unaligned bounds (the strict server refuses
			// unaligned requests): nbdkit memory reports written data as allocated.
			bc := dial(t, addr, Options{MetaContexts: []string{ContextBaseAllocation}})
			var ext []Extent
			if err := bc.BlockStatus(ctx, ContextBaseAllocation, 4097, 70001, func(e Extent) error {
				ext = append(ext, e)
				return nil
			}); err != nil {
				t.Fatalf("BlockStatus at unaligned bounds: %v", err)
			}
			if len(ext) == 0 || ext[0].Offset != 4097 || ext[len(ext)-1].End() != 4097+70001 {
				t.Fatalf("BlockStatus(4097, 70001) = %v; want the range covered exactly", ext)
			}
			// Past the end: io.ReaderAt semantics.
			p := make([]byte, 20)
			if n, err := c.ReadAt(p, c.Size()-10); n != 10 || err != io.EOF {
				t.Fatalf("ReadAt across the end = %d, %v; want 10, io.EOF", n, err)
			}
			if err := c.Read(ctx, p, c.Size()-10); err == nil {
				t.Fatal("Read across the end succeeded")
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// seedKey is a ChaCha8 key for stream n of a test's seed.
func seedKey(seed uint64, n int) (k [32]byte) {
	binary.LittleEndian.PutUint64(k[:], seed)
	binary.LittleEndian.PutUint64(k[8:], uint64(n))
	return k
}

// TestConcurrent hammers one client from many goroutines, each owning a region,
// over several connections: run with -race.
func TestConcurrent(t *testing.T) {
	c := dial(t, startNbdkit(t, "memory", "64M"), Options{Connections: 4, MaxInFlight: 4})
	if !c.CanMultiConn() || c.Connections() != 4 {
		t.Fatalf("nbdkit memory: CanMultiConn %v, Connections %d; want true, 4", c.CanMultiConn(), c.Connections())
	}
	ctx := ctx10s(t)
	seed := testenv.Seed(t)
	const workers, region = 32, 1 << 20
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			fill := rand.NewChaCha8(seedKey(seed, w))
			base := int64(w) * region
			want := make([]byte, region)
			for i := range 20 {
				off := rng.Int64N(region - 1)
				n := 1 + rng.Int64N(region-off)
				p := make([]byte, n)
				fill.Read(p)
				if err := c.Write(ctx, p, base+off, false); err != nil {
					errs <- err
					return
				}
				copy(want[off:], p)
				if i%5 == 0 {
					if err := c.WriteZeroes(ctx, base+off, n/2, 0); err != nil {
						errs <- err
						return
					}
					clear(want[off : off+n/2])
				}
			}
			got := make([]byte, region)
			if err := c.Read(ctx, got, base); err != nil {
				errs <- err
				return
			}
			if i := firstDiff(got, want); i >= 0 {
				errs <- fmt.Errorf("worker %d: region differs at %d", w, i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestServerErrors checks that error replies from a real server become *Error
// with the errno, and that the connection stays usable after them.
func TestServerErrors(t *testing.T) {
	for _, tc := range []struct {
		errno string
		want  syscall.Errno
	}{
		{"EIO", syscall.EIO},
		{"ENOSPC", syscall.ENOSPC},
		{"EPERM", syscall.EPERM},
	} {
		t.Run(tc.errno, func(t *testing.T) {
			// The error filter fails every pread; writes go through.
			addr := startNbdkit(t, "--filter=error", "memory", "1M", "error-pread="+tc.errno, "error-pread-rate=100%")
			c := dial(t, addr, Options{})
			ctx := ctx10s(t)
			err := c.Read(ctx, make([]byte, 4096), 8192)
			var nerr *Error
			if !errors.As(err, &nerr) || !errors.Is(err, tc.want) {
				t.Fatalf("Read = %v; want *Error wrapping %v", err, tc.want)
			}
			if nerr.Op != "read" || nerr.Offset != 8192 || nerr.Length != 4096 {
				t.Errorf("Error = %+v; want read at 8192 length 4096", nerr)
			}
			if err := c.Write(ctx, []byte("still alive"), 0, false); err != nil {
				t.Fatalf("Write after an error reply: %v", err)
			}
		})
	}
}

func TestReadOnly(t *testing.T) {
	c := dial(t, startQemuNbd(t, qcow2(t, "1M"), "qcow2", "--read-only"), Options{})
	if !c.ReadOnly() {
		t.Fatal("qemu-nbd --read-only: ReadOnly() = false")
	}
	ctx := ctx10s(t)
	for name, err := range map[string]error{
		"write":        c.Write(ctx, []byte{1}, 0, false),
		"write-zeroes": c.WriteZeroes(ctx, 0, 512, 0),
		"trim":         c.Trim(ctx, 0, 65536),
	} {
		if !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s on a read-only export = %v; want EPERM", name, err)
		}
	}
	if err := c.Read(ctx, make([]byte, 512), 0); err != nil {
		t.Fatalf("Read: %v", err)
	}
}

// TestWriteZeroesModes: ZeroFast is refused at once where the server cannot
// zero fast, and zeroes where it can; the fallback really writes zeros.
func TestWriteZeroesModes(t *testing.T) {
	for _, tc := range []struct {
		name          string
		args          []string
		canZero, fast bool
	}{
		{"memory", []string{"memory", "4M"}, true, true},
		{"nozero", []string{"--filter=nozero", "memory", "4M", "zeromode=none"}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, startNbdkit(t, tc.args...), Options{})
			ctx := ctx10s(t)
			if c.CanWriteZeroes() != tc.canZero || c.CanFastZero() != tc.fast {
				t.Fatalf("CanWriteZeroes %v CanFastZero %v; want %v %v", c.CanWriteZeroes(), c.CanFastZero(), tc.canZero, tc.fast)
			}
			if err := c.Write(ctx, bytes.Repeat([]byte{0xff}, 3<<20), 0, false); err != nil {
				t.Fatal(err)
			}
			err := c.WriteZeroes(ctx, 1, 1<<20, ZeroFast)
			if tc.fast != (err == nil) || (!tc.fast && !errors.Is(err, syscall.ENOTSUP)) {
				t.Fatalf("WriteZeroes(ZeroFast) = %v; fast zero supported: %v", err, tc.fast)
			}
			if err := c.WriteZeroes(ctx, 1<<20+7, 2<<20-7, 0); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 3<<20)
			if err := c.Read(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			want := bytes.Repeat([]byte{0xff}, 3<<20)
			if tc.fast {
				clear(want[1 : 1+1<<20])
			}
			clear(want[1<<20+7:])
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("after WriteZeroes, byte %d is %#x, want %#x", i, got[i], want[i])
			}
		})
	}
}

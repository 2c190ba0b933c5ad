package nbd

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

const benchSize = 512 << 20

// benchImage writes a 512 MiB raw image full of non-zero data, so no server can
// answer with holes.
func benchImage(b *testing.B) string {
	b.Helper()
	img := filepath.Join(b.TempDir(), "bench.raw")
	f, err := os.Create(img)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(testenv.Seed(b), 4))
	buf := make([]byte, 1<<20)
	for range benchSize / len(buf) {
		for i := 0; i < len(buf); i += 8 {
			v := rng.Uint64() | 1
			for k := range 8 {
				buf[i+k] = byte(v >> (8 * k))
			}
		}
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	return img
}

// BenchmarkRead512MiB reads a whole 512 MiB export with 1 MiB requests from 8
// goroutines, and reports nbdcopy's speed on the same export as nbdcopy-MB/s
// (with its defaults, and matched to 1 MiB requests, 8 in flight, 1 connection).
func BenchmarkRead512MiB(b *testing.B) {
	img := benchImage(b)
	for _, srv := range []struct {
		name  string
		start func(b *testing.B) string
	}{
		{"qemu-nbd-raw", func(b *testing.B) string { return startQemuNbd(b, img, "raw") }},
		{"nbdkit-pattern", func(b *testing.B) string { return uri(startNbdkit(b, "pattern", "512M"), "") }},
	} {
		for _, conns := range []int{1, 4} {
			b.Run(srv.name+"/conns="+string(rune('0'+conns)), func(b *testing.B) {
				addr := srv.start(b)
				c := dial(b, addr, Options{Connections: conns, MaxInFlight: 8})
				b.SetBytes(benchSize)
				b.ResetTimer()
				for range b.N {
					readAll(b, c)
				}
				b.StopTimer()
				b.ReportMetric(float64(c.Connections()), "conns")
				if conns == 1 {
					b.ReportMetric(nbdcopyMBps(b, addr), "nbdcopy-MB/s")
					b.ReportMetric(nbdcopyMBps(b, addr, "--connections=1", "--requests=8", "--request-size=1048576"), "nbdcopy-matched-MB/s")
				}
			})
		}
	}
}

func readAll(b *testing.B, c *Client) {
	const workers, req = 8, 1 << 20
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, req)
			for {
				off := next.Add(req) - req
				if off >= c.Size() {
					return
				}
				if err := c.Read(context.Background(), p, off); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func nbdcopyMBps(b *testing.B, addr string, args ...string) float64 {
	start := time.Now()
	run(b, "nbdcopy", append(args, addr, "null:")...)
	return benchSize / 1e6 / time.Since(start).Seconds()
}

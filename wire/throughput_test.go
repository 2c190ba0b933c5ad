package wire_test

import (
	"context"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// discardStore takes points and drops their data: it isolates the wire's own
// cost (TLS, HTTP/2, protobuf, zstd) in BenchmarkWire. Not used by any test.
type discardStore struct{}

func (discardStore) Authorize(string, string) error              { return nil }
func (discardStore) Latest(string) (lifeboat.Point, bool, error) { return lifeboat.Point{}, false, nil }
func (discardStore) Points(string) ([]lifeboat.Point, error)     { return nil, nil }
func (discardStore) EachBlock(string, string, uint64, func(int64, lifeboat.Hash) error) error {
	return nil
}
func (discardStore) BeginPoint(_ context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	return &discardWriter{p: p}, nil
}

type discardWriter struct{ p lifeboat.Point }

func (w *discardWriter) WriteBlocks(_ context.Context, _ string, _ int64, data []byte, hs []lifeboat.Hash) error {
	for i := range hs {
		lifeboat.HashBlock(data[i*lifeboat.BlockSize : min(len(data), (i+1)*lifeboat.BlockSize)])
	}
	return nil
}
func (w *discardWriter) WritePatch(_ context.Context, _ string, _ int64, _ lifeboat.Dirty, data []byte, _, _ lifeboat.Hash) error {
	lifeboat.HashBlock(data)
	return nil
}
func (w *discardWriter) WriteZeroes(context.Context, string, int64, int64) error { return nil }
func (w *discardWriter) CopyBlock(context.Context, string, int64, string, int64, int, lifeboat.Hash) error {
	return nil
}
func (w *discardWriter) Commit(context.Context, lifeboat.CycleStats) (lifeboat.Point, error) {
	return w.p, nil
}
func (w *discardWriter) Abort(context.Context) error { return nil }

// serveStore serves store on loopback mutual TLS, as the recovery site "dr",
// and dials it.
func serveStore(t testing.TB, store wire.Store) *wire.Client {
	site := testsite.Start(t, recovery.Options{})
	srvTLS, err := pki.ServerTLS(pki.SiteFiles(site.PKI, "dr"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &wire.Server{Site: "dr", Store: store}
	go srv.Serve(l, srvTLS)
	t.Cleanup(srv.Stop)
	site.Addr = l.Addr().String()
	return site.Dial(t, wire.CompressionZstd)
}

// BenchmarkWire sends 1 MiB chunks of random data through one point stream over
// loopback mutual TLS, from 8 goroutines, receiver hashing as the real one does.
func BenchmarkWire(b *testing.B) {
	c := serveStore(b, discardStore{})
	data := make([]byte, 1<<20)
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(b), 2)), data)
	hs := make([]lifeboat.Hash, 16)
	for i := range hs {
		hs[i] = lifeboat.HashBlock(data[i*lifeboat.BlockSize : (i+1)*lifeboat.BlockSize])
	}
	b.SetBytes(int64(len(data)))
	st, err := c.Begin(context.Background(), lifeboat.Point{VM: "x", ID: 1, Instant: time.Now(), Consistency: lifeboat.Crash})
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := st.SendBlocks("vda", 0, data, hs); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
		b.Fatal(err)
	}
}

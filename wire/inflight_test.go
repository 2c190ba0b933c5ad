package wire_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// gateStore's writers hold each write until `want` writes are under way at
// once (or hold passes), and record the most bytes under way at once.
type gateStore struct {
	discardStore
	want int
	hold time.Duration

	mu       sync.Mutex
	now, max int
	bytes    int64
	maxBytes int64
	writes   int
}

func (s *gateStore) BeginPoint(_ context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	return &gateWriter{discardWriter{p: p}, s}, nil
}

type gateWriter struct {
	discardWriter
	s *gateStore
}

func (w *gateWriter) WriteBlocks(ctx context.Context, disk string, off int64, data []byte, hs []lifeboat.Hash) error {
	s := w.s
	s.mu.Lock()
	s.now++
	s.bytes += int64(len(data))
	s.max, s.maxBytes = max(s.max, s.now), max(s.maxBytes, s.bytes)
	deadline := time.Now().Add(s.hold)
	for s.now < s.want && time.Now().Before(deadline) {
		s.mu.Unlock()
		time.Sleep(time.Millisecond)
		s.mu.Lock()
	}
	s.now--
	s.bytes -= int64(len(data))
	s.writes++
	s.mu.Unlock()
	return w.discardWriter.WriteBlocks(ctx, disk, off, data, hs)
}

// TestReceiveWritesAtOnceWithinBytes: a point's small frames are written
// many at once (wire.DefaultWriters), its large ones only as many as the
// byte bound lets be in flight, and every frame is written.
func TestReceiveWritesAtOnceWithinBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 3))
	for _, tc := range []struct {
		name   string
		size   int // bytes per frame (random data: zstd leaves it as is)
		frames int
		want   int           // writes the store waits for at once
		hold   time.Duration // or this long
	}{
		{"64KiB", 64 << 10, 64, wire.DefaultWriters, 3 * time.Second},
		{"4MiB", 4 << 20, 24, 8, 200 * time.Millisecond}, // never reached: the bound allows 7
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := &gateStore{want: tc.want, hold: tc.hold}
			c := serveStore(t, store)
			data := make([]byte, tc.size)
			workload.Random(rng, data)
			hs := make([]lifeboat.Hash, tc.size/lifeboat.BlockSize)
			for i := range hs {
				hs[i] = lifeboat.HashBlock(data[i*lifeboat.BlockSize : (i+1)*lifeboat.BlockSize])
			}
			st, err := c.Begin(context.Background(), lifeboat.Point{VM: "x", ID: 1, Instant: time.Now(), Consistency: lifeboat.Crash})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			for i := range tc.frames {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if _, err := st.SendBlocks("vda", int64(i*tc.size), data, hs); err != nil {
						t.Error(err)
					}
				}()
			}
			wg.Wait()
			if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
				t.Fatal(err)
			}
			store.mu.Lock()
			defer store.mu.Unlock()
			t.Logf("%d frames of %d bytes: at most %d written at once, %d bytes", tc.frames, tc.size, store.max, store.maxBytes)
			if store.writes != tc.frames {
				t.Errorf("%d frames written, want %d", store.writes, tc.frames)
			}
			if tc.size < 1<<20 && store.max < wire.DefaultWriters {
				t.Errorf("at most %d small frames written at once, want %d", store.max, wire.DefaultWriters)
			}
			if store.maxBytes > wire.InflightBytes {
				t.Errorf("%d bytes of frames written at once, want at most %d", store.maxBytes, wire.InflightBytes)
			}
		})
	}
}

package recovery

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
)

// BenchmarkWriteBlocks writes 1 MiB chunks into a new point from 4 goroutines,
// as the wire receiver does, then commits: the recovery side's own throughput.
func BenchmarkWriteBlocks(b *testing.B) {
	s, err := Open(context.Background(), b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	size := int64(b.N+1) << 20
	w, err := s.Begin(context.Background(), BeginSpec{VM: "vm1", ID: 1, Instant: time.Now(), Consistency: lifeboat.Crash,
		Disks: []DiskSpec{{Name: "vda", Size: size, Lineage: "bench", Resync: true}}})
	if err != nil {
		b.Fatal(err)
	}
	data := make([]byte, 1<<20)
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(b), 2)), data)
	hs := make([]lifeboat.Hash, 16)
	for i := range hs {
		hs[i] = lifeboat.HashBlock(data[i*lifeboat.BlockSize : (i+1)*lifeboat.BlockSize])
	}
	b.SetBytes(1 << 20)
	b.ResetTimer()
	var wg sync.WaitGroup
	next := make(chan int64)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := range next {
				if err := w.WriteBlocks(context.Background(), "vda", off, data, hs); err != nil {
					b.Error(err)
				}
			}
		}()
	}
	for i := 0; i < b.N; i++ {
		next <- int64(i) << 20
	}
	close(next)
	wg.Wait()
	if _, err := w.Commit(context.Background(), lifeboat.CycleStats{}); err != nil {
		b.Fatal(err)
	}
}

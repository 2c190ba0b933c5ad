package wire_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// hungStore stands in for a recovery site whose store's disk hangs: every
// write blocks until the test ends. A real hung disk cannot be made on
// demand, and a SIGSTOP would stop the test's own process (the server runs in
// it), so this is a stand-in for that one fault.
type hungStore struct {
	discardStore
	release chan struct{}
}

func (s hungStore) BeginPoint(_ context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	return &hungWriter{discardWriter: discardWriter{p: p}, release: s.release}, nil
}

type hungWriter struct {
	discardWriter
	release chan struct{}
}

func (w *hungWriter) WriteBlocks(ctx context.Context, _ string, _ int64, _ []byte, _ []lifeboat.Hash) error {
	select {
	case <-w.release:
	case <-ctx.Done():
	}
	return context.Canceled
}

// A recovery site that takes in nothing more (its store's disk hung, or it
// was stopped) fails the point once a frame's write has made no progress for
// the stall bound, naming the site and the likely cause; before, the cycle
// waited for its own bound (hours) with its fleece in the guest's write path.
func TestStalledRecoverySiteFailsThePoint(t *testing.T) {
	defer wire.SetStreamStall(time.Second)()
	release := make(chan struct{})
	c := serveStore(t, hungStore{release: release})
	t.Cleanup(func() { close(release) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := c.Begin(ctx, lifeboat.Point{VM: "vm1", ID: 1, Instant: time.Now().UTC(), Consistency: lifeboat.Crash,
		Disks: []lifeboat.PointDisk{{Name: "vda", Size: 1 << 30, Lineage: "0123456789abcdef", Resync: true, Generation: "g1"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Abort()
	chunk := make([]byte, 1<<20) // incompressible: its bytes must fill the buffers
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(t), 1)), chunk)
	var hs []lifeboat.Hash
	for b := 0; b < len(chunk); b += lifeboat.BlockSize {
		hs = append(hs, lifeboat.HashBlock(chunk[b:b+lifeboat.BlockSize]))
	}
	start := time.Now()
	for off := int64(0); off < 1<<30; off += 1 << 20 {
		if _, err = st.SendBlocks("vda", off, chunk, hs); err != nil {
			break
		}
	}
	took := time.Since(start)
	if err == nil {
		t.Fatal("1 GiB went to a recovery site that writes nothing")
	}
	if !strings.Contains(err.Error(), "took in nothing") || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the stalled send failed with %v; want the stall named", err)
	}
	if took > 30*time.Second {
		t.Errorf("the stall was noticed after %v, with a 1 s bound", took)
	}
	t.Logf("after %v: %v", took.Round(time.Millisecond), err)
}

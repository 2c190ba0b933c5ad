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
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/recovery"
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

// A protected site that sends a point's Begin and then nothing (its cycle
// hung, or its host stopped while its kernel still answers) held the point,
// its writer daemon and the VM's one writer slot until the recovery site
// restarted. The wait for each frame is bounded: the point is discarded,
// saying why, and the next point of the VM is taken.
func TestSilentProtectedSiteFreesThePoint(t *testing.T) {
	defer wire.SetStreamIdle(time.Second)()
	site := testsite.Start(t, recovery.Options{})
	c := site.Dial(t, wire.CompressionNone)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := lifeboat.Point{VM: "vm1", ID: 1, Instant: time.Now().UTC(), Consistency: lifeboat.Crash,
		Disks: []lifeboat.PointDisk{{Name: "vda", Size: 1 << 20, Lineage: "0123456789abcdef", Resync: true, Generation: "g1"}}}
	silent, err := c.Begin(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // sends nothing more
	_, err = silent.Commit(lifeboat.CycleStats{})
	if err == nil || !strings.Contains(err.Error(), "sent nothing for 1s") {
		t.Errorf("the silent stream's commit: %v, want the recovery site's reason (it sent nothing)", err)
	}
	// The writer slot is free: the same point is taken now.
	st, err := c.Begin(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	workload.Random(rand.New(rand.NewPCG(testenv.Seed(t), 2)), data)
	var hs []lifeboat.Hash
	for b := 0; b < len(data); b += lifeboat.BlockSize {
		hs = append(hs, lifeboat.HashBlock(data[b:b+lifeboat.BlockSize]))
	}
	if _, err := st.SendBlocks("vda", 0, data, hs); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
		t.Fatalf("the next point after a silent one: %v", err)
	}
}

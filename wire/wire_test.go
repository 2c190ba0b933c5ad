package wire_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// point is point id of a one-disk VM, each sent whole onto the one before it
// (a resync, so no generation needs to match).
func point(id uint64) lifeboat.Point {
	return lifeboat.Point{VM: "vm1", ID: id, Instant: time.Now().UTC(), Consistency: lifeboat.Crash,
		Disks: []lifeboat.PointDisk{{Name: "vda", Size: 4 << 20, Lineage: "0123456789abcdef", Resync: true, Base: id - 1}}}
}

// Every block is checked against its hash at the recovery site: a chunk whose
// hash does not match fails the point, and nothing of it is listed.
func TestHashMismatchFailsThePoint(t *testing.T) {
	for _, comp := range []wire.Compression{wire.CompressionZstd, wire.CompressionNone} {
		t.Run(string(comp), func(t *testing.T) {
			site := testsite.Start(t, recovery.Options{})
			c := site.Dial(t, comp)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			good := make([]byte, 2*lifeboat.BlockSize)
			for i := range good {
				good[i] = byte(i * 7)
			}
			st, err := c.Begin(ctx, point(1))
			if err != nil {
				t.Fatal(err)
			}
			hs := []lifeboat.Hash{lifeboat.HashBlock(good[:lifeboat.BlockSize]), lifeboat.HashBlock(good[lifeboat.BlockSize:])}
			if _, err := st.SendBlocks("vda", 0, good, hs); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
				t.Fatalf("good point: %v", err)
			}

			st, err = c.Begin(ctx, point(2))
			if err != nil {
				t.Fatal(err)
			}
			bad := append([]byte(nil), good...)
			bad[lifeboat.BlockSize+100] ^= 0xff // corrupted in flight, after hashing
			st.SendBlocks("vda", lifeboat.BlockSize*4, bad, hs)
			_, err = st.Commit(lifeboat.CycleStats{})
			if err == nil || !strings.Contains(err.Error(), "hash") {
				t.Fatalf("corrupted chunk: commit error %v, want a hash mismatch", err)
			}
			pts, err := site.Store.Points("vm1")
			if err != nil {
				t.Fatal(err)
			}
			if len(pts) != 1 {
				t.Fatalf("%d points listed after a rejected point, want 1", len(pts))
			}
			if _, err := site.Store.Verify(ctx, "vm1", 0, nil); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A stream that ends without Commit leaves no point.
func TestStreamWithoutCommitLeavesNoPoint(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	c := site.Dial(t, wire.CompressionZstd)
	st, err := c.Begin(context.Background(), point(1))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SendZeroes("vda", 0, lifeboat.BlockSize); err != nil {
		t.Fatal(err)
	}
	st.Abort()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if _, ok, _ := site.Store.Latest("vm1"); ok {
			t.Fatal("an aborted point is listed")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A reference to a block the point never sent fails the point (within a bound),
// and a reference to one it did send is copied and hash-checked.
func TestCopyReferences(t *testing.T) {
	defer wire.SetCopySourceWait(500 * time.Millisecond)()
	site := testsite.Start(t, recovery.Options{})
	c := site.Dial(t, wire.CompressionNone)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	blk := make([]byte, lifeboat.BlockSize)
	for i := range blk {
		blk[i] = byte(i * 13)
	}
	h := lifeboat.HashBlock(blk)

	st, err := c.Begin(ctx, point(1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.SendBlocks("vda", 0, blk, []lifeboat.Hash{h}); err != nil {
		t.Fatal(err)
	}
	if err := st.SendCopy("vda", 3*lifeboat.BlockSize, "vda", 0, lifeboat.BlockSize, h); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
	m, err := site.Store.BlockMap("vm1", "vda", 1)
	if err != nil || m[3] != h || m[0] != h {
		t.Fatalf("block map after a copy: %v %v", m, err)
	}
	if _, err := site.Store.Verify(ctx, "vm1", 1, nil); err != nil {
		t.Fatal(err)
	}

	st, err = c.Begin(ctx, point(2))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	st.SendCopy("vda", 0, "vda", 5*lifeboat.BlockSize, lifeboat.BlockSize, h)
	if _, err := st.Commit(lifeboat.CycleStats{}); err == nil || !strings.Contains(err.Error(), "never wrote") {
		t.Fatalf("copy of an unsent block: %v", err)
	}
	t.Logf("dangling reference refused after %v", time.Since(start).Round(time.Millisecond))
	if pts, _ := site.Store.Points("vm1"); len(pts) != 1 {
		t.Fatalf("%d points after a refused point", len(pts))
	}
}

// A point the recovery site fails early (here: the first chunk's hash does
// not match) reaches a sender that goes on sending: its next sends fail with
// the site's reason, not with a reset connection, and nothing is listed.
func TestEarlyFailureReachesTheSender(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	c := site.Dial(t, wire.CompressionNone)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := point(1)
	p.Disks[0].Size = 64 << 20
	st, err := c.Begin(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 31)
	}
	hs := make([]lifeboat.Hash, len(chunk)/lifeboat.BlockSize)
	for i := range hs {
		hs[i] = lifeboat.HashBlock(chunk[i*lifeboat.BlockSize : (i+1)*lifeboat.BlockSize])
	}
	bad := append([]byte(nil), chunk...)
	bad[7] ^= 1
	if _, err := st.SendBlocks("vda", 0, bad, hs); err != nil {
		t.Fatalf("the first send failed before the site could look at it: %v", err)
	}
	var sendErr error
	for off := int64(1 << 20); off < p.Disks[0].Size && sendErr == nil; off += 1 << 20 {
		_, sendErr = st.SendBlocks("vda", off, chunk, hs)
	}
	if sendErr == nil {
		_, sendErr = st.Commit(lifeboat.CycleStats{})
	}
	if sendErr == nil || !strings.Contains(sendErr.Error(), "hash") {
		t.Fatalf("after a corrupt first chunk: %v, want the site's hash mismatch", sendErr)
	}
	t.Logf("the sender learnt: %v", sendErr)
	if pts, _ := site.Store.Points("vm1"); len(pts) != 0 {
		t.Fatalf("%d points listed after a failed point", len(pts))
	}
}

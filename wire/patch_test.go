package wire_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
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

// A block changed in part crosses as its changed sub-blocks (a Patch frame)
// and the recovery site's point reads as the whole new block: the rest of it
// comes from the point below. To a recovery site of protocol version 3, and
// from a client of version 3, the same call sends the whole block, and the
// point is the same. Random blocks and random sets of sub-blocks, the disk's
// short last block among them.
func TestPatchesReachTheChain(t *testing.T) {
	const size = 4<<20 - 5120 // a short last block, its last sub-block short too
	seed := testenv.Seed(t)
	for _, tc := range []struct {
		name               string
		serverV3, clientV3 bool
	}{{"v4", false, false}, {"server v3", true, false}, {"client v3", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 1))
			site := testsite.Start(t, recovery.Options{})
			srvTLS, err := pki.ServerTLS(pki.SiteFiles(site.PKI, "dr"))
			if err != nil {
				t.Fatal(err)
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := &wire.Server{Site: "dr", Store: wire.RecoveryStore(site.Store)}
			if tc.serverV3 {
				srv.SpeakV3()
			}
			go srv.Serve(l, srvTLS)
			t.Cleanup(srv.Stop)
			site.Addr = l.Addr().String()
			c := site.Dial(t, wire.CompressionNone) // so that bytes sent are bytes of data
			if tc.clientV3 {
				c.SpeakV3()
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			disk := make([]byte, size)
			workload.Random(r, disk)
			p1 := lifeboat.Point{VM: "vm1", ID: 1, Instant: time.Now().UTC(), Consistency: lifeboat.Crash,
				Disks: []lifeboat.PointDisk{{Name: "vda", Size: size, Lineage: "0123456789abcdef", Resync: true, Generation: "g1"}}}
			st, err := c.Begin(ctx, p1)
			if err != nil {
				t.Fatal(err)
			}
			for off := int64(0); off < size; off += 1 << 20 {
				chunk := disk[off:min(off+1<<20, size)]
				var hs []lifeboat.Hash
				for b := 0; b < len(chunk); b += lifeboat.BlockSize {
					hs = append(hs, lifeboat.HashBlock(chunk[b:min(b+lifeboat.BlockSize, len(chunk))]))
				}
				if _, err := st.SendBlocks("vda", off, chunk, hs); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
				t.Fatal(err)
			}

			p2 := p1
			p2.ID, p2.Instant = 2, time.Now().UTC()
			p2.Disks = []lifeboat.PointDisk{{Name: "vda", Size: size, Lineage: "0123456789abcdef", Base: 1, BaseGeneration: "g1", Generation: "g2"}}
			st, err = c.Begin(ctx, p2)
			if err != nil {
				t.Fatal(err)
			}
			nb := int64((size + lifeboat.BlockSize - 1) / lifeboat.BlockSize)
			// 20 distinct blocks before the last: a point sends a block
			// once at most (PointStream).
			blocks := append(r.Perm(int(nb) - 1)[:20], int(nb-1))
			var sent, changed int64
			for _, b := range blocks {
				off := int64(b) * lifeboat.BlockSize
				blk := disk[off:min(off+lifeboat.BlockSize, size)]
				dirty := lifeboat.Dirty(r.Uint32()) & lifeboat.AllDirty
				if b == int(nb-1) {
					dirty = 1 | 1<<14 // the short block's first sub-block and its short last one
				}
				if dirty.Bytes(len(blk)) == 0 {
					dirty = 1
				}
				for _, rg := range dirty.Ranges(len(blk)) {
					workload.Random(r, blk[rg[0]:rg[1]])
				}
				n, err := st.SendPatch("vda", off, blk, lifeboat.HashBlock(blk), dirty)
				if err != nil {
					t.Fatal(err)
				}
				sent += n
				changed += int64(dirty.Bytes(len(blk)))
			}
			if _, err := st.Commit(lifeboat.CycleStats{}); err != nil {
				t.Fatalf("point of patches: %v", err)
			}
			t.Logf("%d blocks, %d bytes changed, %d bytes sent", len(blocks), changed, sent)
			if patched := !tc.serverV3 && !tc.clientV3; patched != (sent < changed+int64(len(blocks))*100) {
				t.Errorf("%d bytes sent for %d changed in %d blocks: patches sent %v, want %v", sent, changed, len(blocks), !patched, patched)
			}
			out := filepath.Join(t.TempDir(), "vda.raw")
			if err := site.Store.Export(ctx, "vm1", 2, "vda", out, "raw"); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, disk) {
				t.Fatalf("point 2 does not read as the disk after the patches")
			}
			if _, err := site.Store.Verify(ctx, "vm1", 2, nil); err != nil {
				t.Fatalf("verify: %v", err)
			}
		})
	}
}

// A point stream that names a block a second time (blocks, a patch, zeros or
// a copy over a block sent before) is refused: the recovery site applies a
// point's frames concurrently, so the two would race and the block could
// hold one frame's bytes under the other's record. Nothing is committed.
func TestBlockSentTwiceIsRefused(t *testing.T) {
	const size = 4 << 20
	seed := testenv.Seed(t)
	site := testsite.Start(t, recovery.Options{})
	c := site.Dial(t, wire.CompressionNone)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r := rand.New(rand.NewPCG(seed, 2))
	blk := make([]byte, lifeboat.BlockSize)
	workload.Random(r, blk)
	h := lifeboat.HashBlock(blk)
	for i, tc := range []struct {
		name  string
		again func(st lifeboat.PointSink) error
	}{
		{"blocks", func(st lifeboat.PointSink) error {
			_, err := st.SendBlocks("vda", 3*lifeboat.BlockSize, blk, []lifeboat.Hash{h})
			return err
		}},
		{"patch", func(st lifeboat.PointSink) error {
			_, err := st.SendPatch("vda", 3*lifeboat.BlockSize, blk, h, 0x00f0)
			return err
		}},
		{"zeroes", func(st lifeboat.PointSink) error { return st.SendZeroes("vda", 0, 8*lifeboat.BlockSize) }},
		{"copy", func(st lifeboat.PointSink) error {
			return st.SendCopy("vda", 3*lifeboat.BlockSize, "vda", 3*lifeboat.BlockSize, lifeboat.BlockSize, h)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := lifeboat.Point{VM: "vm1", ID: uint64(i + 1), Instant: time.Now().UTC(), Consistency: lifeboat.Crash,
				Disks: []lifeboat.PointDisk{{Name: "vda", Size: size, Lineage: "0123456789abcdef", Resync: true, Generation: "g1"}}}
			st, err := c.Begin(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.SendBlocks("vda", 3*lifeboat.BlockSize, blk, []lifeboat.Hash{h}); err != nil {
				t.Fatal(err)
			}
			err = tc.again(st)
			if err == nil {
				_, err = st.Commit(lifeboat.CycleStats{})
			}
			want := fmt.Sprintf(`vm "vm1" point %d: disk "vda": block at offset 196608 sent twice in one point`, p.ID)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("a block sent twice: %v; want it refused, naming the VM, the point, the disk and the block", err)
			}
			if _, ok, err := site.Store.Latest("vm1"); err != nil || ok {
				t.Fatalf("latest point after a refused stream: %v, %v; want none", ok, err)
			}
		})
	}
}

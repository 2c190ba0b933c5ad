package nbd

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// nbdinfoMap is the reference: `nbdinfo --map=CONTEXT --json URI`, merged the way
// BlockStatus merges (adjacent extents with equal flags).
func nbdinfoMap(t *testing.T, uri, metaContext string) []Extent {
	t.Helper()
	out := run(t, "nbdinfo", "--map="+metaContext, "--json", uri)
	var raw []struct {
		Offset, Length int64
		Type           uint32
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		t.Fatalf("nbdinfo --json output: %v: %s", err, out)
	}
	var ext []Extent
	for _, r := range raw {
		ext = appendMerged(ext, Extent{r.Offset, r.Length, r.Type})
	}
	return ext
}

func appendMerged(ext []Extent, e Extent) []Extent {
	if k := len(ext); k > 0 && ext[k-1].Flags == e.Flags && ext[k-1].End() == e.Offset {
		ext[k-1].Length += e.Length
		return ext
	}
	return append(ext, e)
}

// clip restricts a map to [off, off+length).
func clip(ext []Extent, off, length int64) []Extent {
	var out []Extent
	for _, e := range ext {
		s, end := max(e.Offset, off), min(e.End(), off+length)
		if s < end {
			out = append(out, Extent{s, end - s, e.Flags})
		}
	}
	return out
}

func blockStatus(t *testing.T, c *Client, metaContext string, off, length int64) []Extent {
	t.Helper()
	var ext []Extent
	err := c.BlockStatus(ctx10s(t), metaContext, off, length, func(e Extent) error {
		if k := len(ext); k > 0 && ext[k-1].End() != e.Offset {
			t.Errorf("extent %+v does not follow %+v", e, ext[k-1])
		}
		ext = append(ext, e)
		return nil
	})
	if err != nil {
		t.Fatalf("BlockStatus(%s, %d, %d): %v", metaContext, off, length, err)
	}
	return ext
}

// TestBlockStatusMatchesNbdinfo compares base:allocation, whole and in pieces,
// with libnbd's nbdinfo on the same export.
func TestBlockStatusMatchesNbdinfo(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start func(t *testing.T) (addr, uri string)
		// Whether sub-range queries must agree with the whole map. nbdkit's data
		// plugin answers at its page granularity relative to the query, qcow2
		// answers by cluster, whatever the query.
		stable bool
	}{
		{"nbdkit-data", func(t *testing.T) (string, string) {
			a := startNbdkit(t, "data", "1 @1048576 2 @4194303 3 4 @8388608 5", "size=16M")
			return a, uri(a, "")
		}, false},
		{"qsd-qcow2", func(t *testing.T) (string, string) {
			img := qcow2(t, "16M")
			run(t, "qemu-io", "-f", "qcow2",
				"-c", "write -P 0xaa 0 100k",
				"-c", "write -z 1M 256k",
				"-c", "write -P 0xbb 5M 64k",
				"-c", "write -P 0 7M 64k", img)
			a := startQSD(t, img, "")
			return a, a
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, u := tc.start(t)
			want := nbdinfoMap(t, u, ContextBaseAllocation)
			c := dial(t, addr, Options{MetaContexts: []string{ContextBaseAllocation}})
			if got := blockStatus(t, c, ContextBaseAllocation, 0, c.Size()); !slices.Equal(got, want) {
				t.Fatalf("BlockStatus:\n got %v\nwant %v (nbdinfo)", got, want)
			}
			if len(want) < 3 {
				t.Fatalf("reference map %v too plain to test anything", want)
			}
			if !tc.stable {
				return
			}
			for _, r := range []struct{ off, n int64 }{{1, 100}, {4194000, 5000}, {1 << 20, 7 << 20}, {c.Size() - 1, 1}} {
				if got, w := blockStatus(t, c, ContextBaseAllocation, r.off, r.n), clip(want, r.off, r.n); !slices.Equal(got, w) {
					t.Errorf("BlockStatus(%d, %d):\n got %v\nwant %v", r.off, r.n, got, w)
				}
			}
		})
	}
}

// TestBlockStatusShortReplies uses nbdkit's blocksize filter, which answers
// block-status for at most maxlen bytes, so BlockStatus must ask again.
func TestBlockStatusShortReplies(t *testing.T) {
	addr := startNbdkit(t, "--filter=blocksize", "data", "1 @1048576 2 @4194304 3", "size=16M", "maxlen=64k")
	c := dial(t, addr, Options{MetaContexts: []string{ContextBaseAllocation}})

	// One raw request shows the server really answers short.
	cn := c.conns[0]
	r := &request{cmd: cmdBlockStatus, off: 0, length: uint32(c.Size()), metaID: cn.metaIDs[ContextBaseAllocation], metaCtx: ContextBaseAllocation}
	if err := cn.do(ctx10s(t), r); err != nil {
		t.Fatal(err)
	}
	last := r.extents[len(r.extents)-1]
	if last.End() >= c.Size() {
		t.Fatalf("server answered the whole range (%v): the short-reply case is not exercised", r.extents)
	}

	want := nbdinfoMap(t, uri(addr, ""), ContextBaseAllocation)
	if got := blockStatus(t, c, ContextBaseAllocation, 0, c.Size()); !slices.Equal(got, want) {
		t.Fatalf("BlockStatus:\n got %v\nwant %v (nbdinfo)", got, want)
	}
}

// TestDirtyBitmap writes to a qcow2 after a persistent bitmap was added and checks
// that qemu:dirty-bitmap:NAME, exported by qemu-storage-daemon, reports exactly
// the 64 KiB clusters written, as nbdinfo does.
func TestDirtyBitmap(t *testing.T) {
	img := qcow2(t, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", img) // before the bitmap: not dirty
	run(t, "qemu-img", "bitmap", "--add", img, "bm0")
	run(t, "qemu-io", "-f", "qcow2",
		"-c", "write -P 2 3145733 100", // 3M+5: one cluster
		"-c", "write -P 3 10M 200k", // four clusters
		"-c", "write -z 20M 64k", // zero writes dirty too
		"-c", "write -P 4 67108863 1", // last byte: last cluster
		img)
	// A read-only export may only publish a disabled bitmap.
	run(t, "qemu-img", "bitmap", "--disable", img, "bm0")
	addr := startQSD(t, img, `"bitmaps":["bm0"]`)

	ctxName := ContextDirtyBitmap + "bm0"
	c := dial(t, addr, Options{MetaContexts: []string{ContextBaseAllocation, ctxName}})
	if !slices.Equal(c.MetaContexts(), []string{ContextBaseAllocation, ctxName}) {
		t.Fatalf("MetaContexts = %v", c.MetaContexts())
	}
	got := blockStatus(t, c, ctxName, 0, c.Size())
	var dirty []Extent
	for _, e := range got {
		if e.Flags&StateDirty != 0 {
			dirty = append(dirty, e)
		}
	}
	const M, K = 1 << 20, 1 << 10
	wantDirty := []Extent{{3 * M, 64 * K, 1}, {10 * M, 256 * K, 1}, {20 * M, 64 * K, 1}, {64*M - 64*K, 64 * K, 1}}
	if !slices.Equal(dirty, wantDirty) {
		t.Errorf("dirty extents %v; want %v", dirty, wantDirty)
	}
	if want := nbdinfoMap(t, addr, ctxName); !slices.Equal(got, want) {
		t.Errorf("BlockStatus(%s):\n got %v\nwant %v (nbdinfo)", ctxName, got, want)
	}
	// Both contexts are answered on each request; base:allocation still works.
	if alloc := blockStatus(t, c, ContextBaseAllocation, 0, 2*M); len(alloc) == 0 || alloc[0] != (Extent{0, M, 0}) {
		t.Errorf("base:allocation over [0, 2M) = %v; want data first", alloc)
	}

	// A bitmap the export does not publish is refused at Dial, by name.
	_, err := Dial(ctx10s(t), addr, "", Options{MetaContexts: []string{ContextDirtyBitmap + "nope"}})
	if err == nil || !strings.Contains(err.Error(), "qemu:dirty-bitmap:nope") {
		t.Fatalf("Dial with an unpublished bitmap = %v; want an error naming it", err)
	}
	// And a context that was not negotiated is refused by BlockStatus.
	c2 := dial(t, addr, Options{})
	if err := c2.BlockStatus(ctx10s(t), ctxName, 0, 4096, func(Extent) error { return nil }); err == nil {
		t.Fatal("BlockStatus on a context that was not negotiated succeeded")
	}
}

// TestBlockStatusCallbackError stops the walk at the callback's error.
func TestBlockStatusCallbackError(t *testing.T) {
	addr := startNbdkit(t, "data", "1 @1048576 2 @4194304 3", "size=16M")
	c := dial(t, addr, Options{MetaContexts: []string{ContextBaseAllocation}})
	stop := fmt.Errorf("enough")
	n := 0
	err := c.BlockStatus(context.Background(), ContextBaseAllocation, 0, c.Size(), func(Extent) error {
		n++
		return stop
	})
	if err != stop || n != 1 {
		t.Fatalf("BlockStatus = %v after %d calls; want the callback's error after 1", err, n)
	}
}

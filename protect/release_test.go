package protect_test

import (
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/wire"
)

// Release takes lifeboat's generations for its recovery site out of the VM,
// on every disk and below an external snapshot too, and leaves another
// recovery site's generation and another tool's bitmap recording; the next
// cycle is a hash resync and byte-exact.
func TestReleaseRemovesOnlyOurGenerations(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	m := r.vm.Monitor()
	other := "lifeboat." + diskNamed(t, pt, "vda").Lineage + ".1.00000000@elsewhere"
	for _, b := range []string{other, "users-own-backup"} {
		if err := m.AddBitmap(ctx(t), "vda", b, true, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	peer := r.p.Target.Peer()
	ours := func() []string {
		t.Helper()
		nodes, err := m.Nodes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, n := range nodes {
			for _, b := range n.Bitmaps {
				if strings.HasSuffix(b.Name, "@"+peer) {
					names = append(names, n.NodeName+":"+b.Name)
				}
			}
		}
		return names
	}
	before := ours()
	if len(before) != 2 { // one generation on each disk
		t.Fatalf("before release: generations for %s: %v, want one per disk", peer, before)
	}
	rel, err := r.p.Release(ctx(t), peer)
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	if len(rel.Removed) != 2 || len(rel.Left) != 0 {
		t.Errorf("release reported %+v, want the 2 generations %v removed", rel, before)
	}
	if left := ours(); len(left) > 0 {
		t.Fatalf("after release, generations for %s are left: %v", peer, left)
	}
	n, err := m.Node(ctx(t), "vda")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{other, "users-own-backup"} {
		if b, ok := n.Bitmap(name); !ok || !b.Recording {
			t.Errorf("bitmap %q not ours was removed or disabled by release: %+v", name, n.Bitmaps)
		}
	}
	// Released twice: nothing more to do, no error.
	if rel, err := r.p.Release(ctx(t), peer); err != nil || len(rel.Removed)+len(rel.Left) != 0 {
		t.Errorf("second release: %+v, %v; want nothing removed and no error", rel, err)
	}
	// Protected again: a hash resync, byte-exact.
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	for _, d := range r.cycle(t).Disks {
		if !d.Resync {
			t.Errorf("disk %s taken incrementally after its generations were released", d.Name)
		}
	}
}

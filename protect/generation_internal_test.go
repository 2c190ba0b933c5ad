package protect

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
)

// reconcile on a real disk, from each state a cycle can leave its generations
// in: the base is only ever the generation the latest point started, a
// disabled base is trusted only beside a newer generation of its lineage
// (merged back), and generations kept for another recovery site are never
// touched.
func TestReconcileStates(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	m := vm.Monitor()
	const lin, peer, size = "00112233aabbccdd", "dr", 16 << 20
	g1 := "lifeboat." + lin + ".1.aaaaaaaa@dr"
	g2 := "lifeboat." + lin + ".2.bbbbbbbb@dr"
	g2b := "lifeboat." + lin + ".2.cccccccc@dr" // another instant of point 2 (a failed cycle's)
	other := "lifeboat." + lin + ".1.dddddddd@elsewhere"
	orphan := "lifeboat.ffffffffffffffff.1.eeeeeeee@dr"
	type bm struct {
		name     string
		disabled bool
	}
	tests := []struct {
		name    string
		have    []bm
		h       history
		base    string // "" = resync
		why     string
		survive []string // bitmaps left, sorted
	}{
		{"the latest point's generation, recording", []bm{{g1, false}, {other, false}, {orphan, false}, {"lifeboat-1", false}},
			history{peer, lin, 1, g1, size}, g1, "", []string{g1, other}},
		{"a cycle cut off after its instant: merged back", []bm{{g1, true}, {g2, false}},
			history{peer, lin, 1, g1, size}, g1, "", []string{g1}},
		{"a commit that landed, its outcome unknown to the source", []bm{{g1, true}, {g2, false}},
			history{peer, lin, 2, g2, size}, g2, "", []string{g2}},
		{"another instant of the same point number", []bm{{g1, true}, {g2b, false}},
			history{peer, lin, 2, g2, size}, "", "is not on the disk", nil},
		{"disabled with nothing newer", []bm{{g1, true}},
			history{peer, lin, 1, g1, size}, "", "cannot prove it saw every write", nil},
		{"an older generation only (a restored copy)", []bm{{g1, false}},
			history{peer, lin, 2, g2, size}, "", "is not on the disk", nil},
		{"a point of an older lifeboat", []bm{{"lifeboat-1", false}},
			history{peer, lin, 1, "", size}, "", "records no change-tracking generation", nil},
		{"the disk grew since the point (it may have shrunk first)", []bm{{g1, false}, {other, false}},
			history{peer, lin, 1, g1, size - 64<<10}, "", "size changed from 16711680 to 16777216 bytes", []string{other}},
		{"the disk shrank since the point", []bm{{g1, false}},
			history{peer, lin, 1, g1, size + 512}, "", "size changed", nil},
		{"the first sync", []bm{{other, false}},
			history{peer, lin, 0, "", size}, "", "initial sync", []string{other}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			n, err := m.Node(ctx, "vda")
			if err != nil {
				t.Fatal(err)
			}
			for _, b := range n.Bitmaps {
				if err := m.RemoveBitmap(ctx, "vda", b.Name); err != nil {
					t.Fatal(err)
				}
			}
			for _, b := range tc.have {
				if err := m.AddBitmap(ctx, "vda", b.name, true, b.disabled); err != nil {
					t.Fatal(err)
				}
			}
			if n, err = m.Node(ctx, "vda"); err != nil {
				t.Fatal(err)
			}
			base, why, err := reconcile(ctx, m, "vda", n.Bitmaps, tc.h, resizedWhy(tc.h, n.Size))
			if err != nil {
				t.Fatal(err)
			}
			if base != tc.base || !strings.Contains(why, tc.why) || (tc.base == "") != (why != "") {
				t.Fatalf("reconcile: base %q why %q, want base %q why ~%q", base, why, tc.base, tc.why)
			}
			if n, err = m.Node(ctx, "vda"); err != nil {
				t.Fatal(err)
			}
			var left []string
			for _, b := range n.Bitmaps {
				left = append(left, b.Name)
				if b.Name == base && !b.Recording {
					t.Fatalf("the base %q is left disabled", base)
				}
			}
			slices.Sort(left)
			want := slices.Clone(tc.survive)
			slices.Sort(want)
			if !slices.Equal(left, want) {
				t.Fatalf("bitmaps left %v, want %v", left, want)
			}
		})
	}
}

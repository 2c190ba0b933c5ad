package wire

import "testing"

// A block set adds a range whole or not at all, finds a block named before
// in every kind of region (partial, whole, none), and a full region costs no
// bitmap of its own, however it was filled.
func TestBlockSet(t *testing.T) {
	s := blockSet{}
	add := func(first, end int64, wantOK bool, wantDup int64) {
		t.Helper()
		dup, ok := s.add(first, end)
		if ok != wantOK || !ok && dup != wantDup {
			t.Fatalf("add [%d, %d) = %d, %v; want %d, %v", first, end, dup, ok, wantDup, wantOK)
		}
	}
	add(10, 20, true, 0)
	add(20, 21, true, 0)
	add(0, 11, false, 10)
	for b := int64(0); b < 10; b++ { // the refused range added nothing
		add(b, b+1, true, 0)
	}
	add(19, 19+1, false, 19)
	// Two whole regions and part of a third, across the partial one.
	add(regionBlocks-5, 3*regionBlocks+7, true, 0)
	if s[1] != fullRegion || s[2] != fullRegion {
		t.Fatal("regions added whole do not share the full region")
	}
	add(2*regionBlocks+100, 2*regionBlocks+101, false, 2*regionBlocks+100)
	add(3*regionBlocks+6, 3*regionBlocks+8, false, 3*regionBlocks+6)
	add(3*regionBlocks+7, 3*regionBlocks+8, true, 0)
	add(regionBlocks-6, regionBlocks-5, true, 0)
	add(regionBlocks-7, regionBlocks+1, false, regionBlocks-6)
	// A region filled piece by piece gives its bitmap up too.
	for b := int64(4 * regionBlocks); b < 5*regionBlocks; b += 16 {
		add(b, b+16, true, 0)
	}
	if s[4] != fullRegion {
		t.Fatal("a region filled in pieces keeps a bitmap of its own")
	}
	add(5*regionBlocks-1, 5*regionBlocks, false, 5*regionBlocks-1)
	// A 16 TiB range of 64 KiB blocks: one map entry per region, no bitmaps.
	s = blockSet{}
	add(0, 16<<40/(64<<10), true, 0)
	for reg, r := range s {
		if r != fullRegion {
			t.Fatalf("region %d has a bitmap of its own", reg)
		}
	}
}

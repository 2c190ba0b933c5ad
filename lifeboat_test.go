package lifeboat

import (
	"slices"
	"testing"
)

// Mismatch finds the first block that differs from its hash, a short last
// block included, and only that one.
func TestMismatch(t *testing.T) {
	data := make([]byte, 2*BlockSize+100)
	for i := range data {
		data[i] = byte(i * 7)
	}
	hashes := []Hash{HashBlock(data[:BlockSize]), HashBlock(data[BlockSize : 2*BlockSize]), HashBlock(data[2*BlockSize:])}
	if got := Mismatch(data, hashes); got != -1 {
		t.Fatalf("every block matches, Mismatch says offset %d", got)
	}
	for i := range hashes {
		bad := append([]Hash(nil), hashes...)
		bad[i][31] ^= 0x80
		if got, want := Mismatch(data, bad), int64(i)*BlockSize; got != want {
			t.Errorf("block %d's hash wrong: Mismatch says %d, want %d", i, got, want)
		}
	}
}

func TestDirtyRanges(t *testing.T) {
	cases := []struct {
		d    Dirty
		n    int
		want [][2]int
	}{
		{0, BlockSize, nil},
		{AllDirty, BlockSize, [][2]int{{0, BlockSize}}},
		{0b1011, BlockSize, [][2]int{{0, 8192}, {12288, 16384}}},
		{1 << 15, BlockSize, [][2]int{{61440, 65536}}},
		{AllDirty, 10000, [][2]int{{0, 10000}}}, // a short last block
		{1 << 3, 10000, nil},                    // past its end
	}
	for _, c := range cases {
		if got := c.d.Ranges(c.n); !slices.Equal(got, c.want) {
			t.Errorf("Dirty(%016b).Ranges(%d) = %v, want %v", c.d, c.n, got, c.want)
		}
	}
	if got := DirtyOf(4095, 4097); got != 0b11 {
		t.Errorf("DirtyOf(4095, 4097) = %b, want 11", got)
	}
	if got := DirtyOf(0, 1<<20); got != AllDirty {
		t.Errorf("DirtyOf(0, 1 MiB) = %b, want all", got)
	}
	if got := DirtyOf(-5, 1); got != 1 {
		t.Errorf("DirtyOf(-5, 1) = %b, want 1", got)
	}
	if got := Dirty(0b101).Bytes(BlockSize); got != 8192 {
		t.Errorf("Bytes = %d, want 8192", got)
	}
	if got := Dirty(1 << 14).Bytes(10000 + 50000); got != 60000-57344 {
		t.Errorf("Bytes of a short last sub-block = %d, want %d", got, 60000-57344)
	}
	data := make([]byte, 8192)
	for i := range data {
		data[i] = byte(i / SubBlock)
	}
	parts, err := Dirty(0b101).Split(BlockSize, data)
	if err != nil || len(parts) != 2 || parts[0].Off != 0 || parts[1].Off != 2*SubBlock || parts[1].Data[0] != 1 || len(parts[1].Data) != SubBlock {
		t.Errorf("Split = %+v, %v: want parts at 0 and 8192 of 4 KiB each", parts, err)
	}
	for _, bad := range [][]byte{data[:8191], append(data, 0), nil} {
		if _, err := Dirty(0b101).Split(BlockSize, bad); err == nil {
			t.Errorf("Split took %d bytes for 8192 changed", len(bad))
		}
	}
}

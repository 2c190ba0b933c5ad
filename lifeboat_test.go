package lifeboat

import "testing"

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

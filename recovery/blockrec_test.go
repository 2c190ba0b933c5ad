package recovery

import (
	"maps"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
)

func hashOf(i int64) lifeboat.Hash {
	var b [8]byte
	for k := range b {
		b[k] = byte(i >> (8 * k))
	}
	return lifeboat.HashBlock(b[:])
}

func TestBlockRecordRoundTrip(t *testing.T) {
	dense := blockRecord{}
	for i := range int64(32768) { // an initial sync of 2 GiB
		dense[i] = hashOf(i)
	}
	zeros := blockRecord{}
	for i := range int64(32768) {
		zeros[i] = lifeboat.ZeroHash
	}
	tests := []struct {
		name    string
		rec     blockRecord
		maxSize int
	}{
		{"empty", blockRecord{}, 1},
		{"one zero at 0", blockRecord{0: lifeboat.ZeroHash}, 2},
		{"sparse and far", blockRecord{3: hashOf(3), 1 << 30: lifeboat.ZeroHash, 7: hashOf(7)}, 1 + 3 + 33*2 + 5},
		{"2 GiB dense", dense, 1 + 33*32768},
		{"2 GiB of zeros", zeros, 1 + 32768},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enc := encodeBlockRecord(tt.rec)
			if len(enc) > tt.maxSize {
				t.Errorf("encoded %d entries into %d bytes, want at most %d", len(tt.rec), len(enc), tt.maxSize)
			}
			got := blockRecord{}
			if err := decodeBlockRecord(enc, got); err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tt.rec) {
				t.Errorf("round trip changed the record: got %d entries, want %d", len(got), len(tt.rec))
			}
		})
	}
}

func TestDecodeBlockRecordRejectsCorruption(t *testing.T) {
	good := encodeBlockRecord(blockRecord{1: hashOf(1), 2: hashOf(2)})
	tests := []struct {
		name string
		b    []byte
	}{
		{"unknown version", append([]byte{9}, good[1:]...)},
		{"hash cut short", good[:len(good)-5]},
		{"bad varint", []byte{recordVersion, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{"impossible gap", []byte{recordVersion, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := decodeBlockRecord(tt.b, blockRecord{}); err == nil {
				t.Error("decoded a corrupt record without error")
			}
		})
	}
}

func TestKeepOnResize(t *testing.T) {
	const B = lifeboat.BlockSize
	tests := []struct {
		name      string
		old, size int64
		want      []int64 // surviving block indexes of {0, 1, 2, 3}
	}{
		{"same size", 4 * B, 4 * B, []int64{0, 1, 2, 3}},
		{"grown from whole blocks", 2 * B, 4 * B, []int64{0, 1}},
		{"grown from a short last block", 2*B + 512, 4 * B, []int64{0, 1}},
		{"shrunk to a short last block", 4 * B, 2*B + 512, []int64{0, 1}},
		{"shrunk to whole blocks", 4 * B, 3 * B, []int64{0, 1, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := blockRecord{0: hashOf(0), 1: hashOf(1), 2: hashOf(2), 3: hashOf(3)}
			keepOnResize(m, tt.old, tt.size)
			if len(m) != len(tt.want) {
				t.Fatalf("kept %d blocks, want %v", len(m), tt.want)
			}
			for _, i := range tt.want {
				if _, ok := m[i]; !ok {
					t.Errorf("block %d dropped", i)
				}
			}
		})
	}
}

package recovery

import (
	"encoding/binary"
	"maps"
	"path/filepath"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

func hashOf(i int64) lifeboat.Hash {
	var b [8]byte
	for k := range b {
		b[k] = byte(i >> (8 * k))
	}
	return lifeboat.HashBlock(b[:])
}

// encodeBlockRecordV1 packs a record in the old format (what lifeboat before
// bounded records wrote), for the migration's tests.
func encodeBlockRecordV1(r map[int64]lifeboat.Hash) []byte {
	idx := slices.Sorted(maps.Keys(r))
	out := []byte{recordVersion1}
	prev := int64(-1)
	for _, i := range idx {
		v := uint64(i-prev-1) << 1
		if r[i].IsZero() {
			v |= 1
		}
		out = binary.AppendUvarint(out, v)
		if h := r[i]; !h.IsZero() {
			out = append(out, h[:]...)
		}
		prev = i
	}
	return out
}

func TestBlockRecordV1RoundTrip(t *testing.T) {
	rec := map[int64]lifeboat.Hash{3: hashOf(3), 1 << 30: lifeboat.ZeroHash, 7: hashOf(7), 8: lifeboat.ZeroHash}
	got := map[int64]lifeboat.Hash{}
	if err := decodeBlockRecordV1(encodeBlockRecordV1(rec), func(i int64, h lifeboat.Hash) error { got[i] = h; return nil }); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, rec) {
		t.Errorf("round trip changed the record: %v", got)
	}
}

func TestDecodeBlockRecordV1RejectsCorruption(t *testing.T) {
	good := encodeBlockRecordV1(map[int64]lifeboat.Hash{1: hashOf(1), 2: hashOf(2)})
	tests := []struct {
		name string
		b    []byte
	}{
		{"unknown version", append([]byte{9}, good[1:]...)},
		{"hash cut short", good[:len(good)-5]},
		{"bad varint", []byte{recordVersion1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{"impossible gap", []byte{recordVersion1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
		{"zero marker as data", append([]byte{recordVersion1, 0}, make([]byte, 32)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := decodeBlockRecordV1(tt.b, func(int64, lifeboat.Hash) error { return nil }); err == nil {
				t.Error("decoded a corrupt record without error")
			}
		})
	}
}

// testRecord runs fn on a fresh record in a bbolt transaction.
func testRecord(t *testing.T, fn func(r record)) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(t.TempDir(), "c.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error {
		recs, err := tx.CreateBucket(bucketRecs)
		if err != nil {
			return err
		}
		r, err := createRecord(recs, recKey(1, "vda"))
		if err != nil {
			return err
		}
		fn(r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// contents lists a record's data blocks and zero runs.
func contents(t *testing.T, r record) (map[int64]lifeboat.Hash, [][2]int64) {
	t.Helper()
	data := map[int64]lifeboat.Hash{}
	var zeros [][2]int64
	if err := r.eachData(0, func(b int64, h lifeboat.Hash) error { data[b] = h; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := r.eachZeros(func(lo, hi int64) error { zeros = append(zeros, [2]int64{lo, hi}); return nil }); err != nil {
		t.Fatal(err)
	}
	return data, zeros
}

// TestRecordOpsKeepTheLastWrite checks the record's operations against a
// per-block model: data and zero writes in any order, runs that join and
// split, and a resize cut.
func TestRecordOpsKeepTheLastWrite(t *testing.T) {
	type op struct {
		kind   byte // 'd' data at lo, 'z' zeros [lo, hi), 'c' cut at lo
		lo, hi int64
	}
	tests := []struct {
		name  string
		ops   []op
		zeros [][2]int64 // the runs expected at the end
	}{
		{"runs join", []op{{'z', 0, 4}, {'z', 4, 8}, {'z', 10, 12}, {'z', 7, 10}}, [][2]int64{{0, 12}}},
		{"data splits a run", []op{{'z', 0, 10}, {'d', 5, 0}}, [][2]int64{{0, 5}, {6, 10}}},
		{"data at a run's ends", []op{{'z', 0, 10}, {'d', 0, 0}, {'d', 9, 0}}, [][2]int64{{1, 9}}},
		{"zeros replace data", []op{{'d', 3, 0}, {'d', 4, 0}, {'d', 20, 0}, {'z', 2, 10}}, [][2]int64{{2, 10}}},
		{"a huge run is one entry", []op{{'d', 1 << 20, 0}, {'z', 0, 1 << 36}}, [][2]int64{{0, 1 << 36}}},
		{"cut inside a run", []op{{'z', 0, 10}, {'d', 12, 0}, {'c', 5, 0}}, [][2]int64{{0, 5}}},
		{"cut between", []op{{'z', 0, 3}, {'z', 6, 9}, {'d', 4, 0}, {'c', 4, 0}}, [][2]int64{{0, 3}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The model: block -> hash (ZeroHash for zeros), small ranges only.
			model := map[int64]lifeboat.Hash{}
			testRecord(t, func(r record) {
				for i, o := range tt.ops {
					var err error
					switch o.kind {
					case 'd':
						h := hashOf(int64(i)*1000 + o.lo)
						err = r.putData(o.lo, h)
						model[o.lo] = h
					case 'z':
						err = r.putZeros(o.lo, o.hi)
						for b := range model {
							if o.lo <= b && b < o.hi {
								delete(model, b)
							}
						}
					case 'c':
						err = r.cut(o.lo)
						for b := range model {
							if b >= o.lo {
								delete(model, b)
							}
						}
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				data, zeros := contents(t, r)
				if !maps.Equal(data, model) {
					t.Errorf("data blocks %v, want %v", slices.Sorted(maps.Keys(data)), slices.Sorted(maps.Keys(model)))
				}
				if !slices.Equal(zeros, tt.zeros) {
					t.Errorf("zero runs %v, want %v", zeros, tt.zeros)
				}
				for _, z := range zeros {
					for b := z[0]; b < min(z[1], z[0]+64); b++ {
						if _, ok := data[b]; ok {
							t.Errorf("block %d is both data and zeros", b)
						}
					}
				}
			})
		})
	}
}

// TestPendingBatchKeepsTheLastWrite: a writer's batch applied to the catalog
// (zeros first, data after) gives what the writes in order give.
func TestPendingBatchKeepsTheLastWrite(t *testing.T) {
	testRecord(t, func(r record) {
		var p pendingBatch
		p.putData(5, hashOf(5))
		p.putZeros(0, 10) // hides 5
		p.putData(7, hashOf(7))
		p.putZeros(100, 1<<30)
		p.putData(200, hashOf(200))
		if err := p.apply(r); err != nil {
			t.Fatal(err)
		}
		if p.len() != 0 {
			t.Errorf("batch holds %d entries after apply", p.len())
		}
		data, zeros := contents(t, r)
		if want := map[int64]lifeboat.Hash{7: hashOf(7), 200: hashOf(200)}; !maps.Equal(data, want) {
			t.Errorf("data %v", slices.Sorted(maps.Keys(data)))
		}
		if want := [][2]int64{{0, 7}, {8, 10}, {100, 200}, {201, 1 << 30}}; !slices.Equal(zeros, want) {
			t.Errorf("zero runs %v, want %v", zeros, want)
		}
	})
}

func TestWholeBlocks(t *testing.T) {
	const B = lifeboat.BlockSize
	tests := []struct {
		name      string
		old, size int64
		want      int64
	}{
		{"same size", 4 * B, 4 * B, -1},
		{"grown from whole blocks", 2 * B, 4 * B, 2},
		{"grown from a short last block", 2*B + 512, 4 * B, 2},
		{"shrunk to a short last block", 4 * B, 2*B + 512, 2},
		{"shrunk to whole blocks", 4 * B, 3 * B, 3},
	}
	for _, tt := range tests {
		if got := wholeBlocks(tt.old, tt.size); got != tt.want {
			t.Errorf("%s: wholeBlocks = %d, want %d", tt.name, got, tt.want)
		}
	}
}

// FuzzRecordEntries feeds bytes as the catalog could hand them back (a
// damaged or hostile catalog.db) to every record decoder: none may panic, and
// what they accept is in range.
func FuzzRecordEntries(f *testing.F) {
	h := hashOf(1)
	f.Add(blockKey(3), h[:])
	f.Add(blockKey(0), blockKey(1<<36))
	f.Add(blockKey(maxBlock-1), blockKey(maxBlock))
	f.Add([]byte{1, 2, 3}, make([]byte, 32))
	f.Add([]byte{}, []byte{})
	f.Add(encodeBlockRecordV1(map[int64]lifeboat.Hash{1: h, 2: lifeboat.ZeroHash, 1 << 30: h}), blockKey(5))
	f.Add([]byte{recordVersion1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, []byte{recordVersion1, 1})
	f.Fuzz(func(t *testing.T, k, v []byte) {
		if b, _, err := decodeDataEntry(k, v); err == nil && (b < 0 || b >= maxBlock) {
			t.Fatalf("data entry decoded to block %d", b)
		}
		if lo, hi, err := decodeZeroEntry(k, v); err == nil && (lo < 0 || hi <= lo || hi >= maxBlock) {
			t.Fatalf("zero entry decoded to [%d, %d)", lo, hi)
		}
		prev := int64(-1)
		for _, b := range [][]byte{k, v} {
			prev = -1
			_ = decodeBlockRecordV1(b, func(i int64, h lifeboat.Hash) error {
				if i <= prev || i >= maxBlock {
					t.Fatalf("old record decoded block %d after %d", i, prev)
				}
				prev = i
				return nil
			})
		}
	})
}

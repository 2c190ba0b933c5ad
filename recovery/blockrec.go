package recovery

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/lifeboat-dr/lifeboat"
)

// blockRecord is what one point wrote to one disk: the content hash of every
// block it wrote, by block index (lifeboat.ZeroHash for blocks written as zeros).
type blockRecord map[int64]lifeboat.Hash

// recordVersion is the first byte of an encoded block record, so the format can
// change without guessing.
const recordVersion = 1

// encodeBlockRecord packs a record as sorted entries of
// uvarint((gap << 1) | zero) followed by the 32-byte hash unless zero, where gap
// is the distance to the previous index minus one. A zero block costs one byte,
// a run of consecutive data blocks 33 bytes each.
func encodeBlockRecord(r blockRecord) []byte {
	idx := make([]int64, 0, len(r))
	for i := range r {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	out := make([]byte, 0, 1+len(idx)*33)
	out = append(out, recordVersion)
	prev := int64(-1)
	for _, i := range idx {
		h := r[i]
		v := uint64(i-prev-1) << 1
		if h.IsZero() {
			v |= 1
		}
		out = binary.AppendUvarint(out, v)
		if !h.IsZero() {
			out = append(out, h[:]...)
		}
		prev = i
	}
	return out
}

// decodeBlockRecord unpacks what encodeBlockRecord packed into dst (later
// entries overwrite earlier ones, which is how a fold is built).
func decodeBlockRecord(b []byte, dst blockRecord) error {
	if len(b) == 0 {
		return nil
	}
	if b[0] != recordVersion {
		return fmt.Errorf("block record version %d is not known to this lifeboat (want %d): upgrade lifeboat", b[0], recordVersion)
	}
	b = b[1:]
	prev := int64(-1)
	for len(b) > 0 {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return fmt.Errorf("block record is corrupt after block %d: bad varint", prev)
		}
		b = b[n:]
		gap := v >> 1
		if gap > 1<<40 {
			return fmt.Errorf("block record is corrupt after block %d: gap %d is impossible", prev, gap)
		}
		i := prev + 1 + int64(gap)
		if v&1 == 1 {
			dst[i] = lifeboat.ZeroHash
		} else {
			if len(b) < len(lifeboat.Hash{}) {
				return fmt.Errorf("block record is corrupt at block %d: hash cut short", i)
			}
			var h lifeboat.Hash
			copy(h[:], b)
			b = b[len(h):]
			dst[i] = h
		}
		prev = i
	}
	return nil
}

// keepOnResize drops from m every block whose content a size change from old to
// size may have altered: a block survives only when it lies wholly inside both
// sizes (a short last block grows a zero tail, or loses bytes).
func keepOnResize(m blockRecord, old, size int64) {
	if old == size {
		return
	}
	whole := min(old, size) / lifeboat.BlockSize
	for i := range m {
		if i >= whole {
			delete(m, i)
		}
	}
}

// blockCount is the number of grid blocks of a disk of size bytes (the last one
// may be short).
func blockCount(size int64) int64 {
	return (size + lifeboat.BlockSize - 1) / lifeboat.BlockSize
}

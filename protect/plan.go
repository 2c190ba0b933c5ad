package protect

import (
	"context"
	"fmt"
	"math/bits"
	"sync"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
)

// bitset is one bit per block: a 64 GiB disk needs 128 KiB.
type bitset []uint64

func newBitset(n int64) bitset    { return make(bitset, (n+63)/64) }
func (b bitset) set(i int64)      { b[i/64] |= 1 << (i % 64) }
func (b bitset) has(i int64) bool { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) setRange(lo, hi int64) {
	for i := lo; i < hi; {
		if i%64 == 0 && hi-i >= 64 {
			b[i/64] = ^uint64(0)
			i += 64
			continue
		}
		b.set(i)
		i++
	}
}
func (b bitset) count() int64 {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return int64(n)
}

// diskPlan is which blocks of one disk a cycle must handle, and how.
type diskPlan struct {
	disk    *diskState
	client  *nbd.Client
	size    int64
	blocks  int64
	changed int64  // bytes of changed blocks
	dirty   bitset // blocks to handle
	data    bitset // blocks with any allocated, non-zero extent at the instant
	// partial holds the blocks of dirty that changed only in part, with the
	// sub-blocks that did (a block absent from it changed whole): a generation
	// finer than the block grid says so, and the block is sent as a patch.
	partial map[int64]lifeboat.Dirty
	// known is the recovery site's block map on a resync (nil otherwise); known0
	// says that a block absent from it reads as zeros there.
	known  map[int64]lifeboat.Hash
	known0 bool
}

// planDisk computes extents = dirty ∩ allocated on the block grid: dirty from the
// published generation, data from base:allocation, so that zero and
// unallocated blocks are never read. On a resync there is no generation: the
// blocks to handle are the allocated ones, and those the recovery site holds
// as non-zero (known, its block map), which must become zero there.
//
// more, when set, adds blocks to handle (addTargetChanges) before the
// allocation of an incremental plan's blocks is asked.
func planDisk(ctx context.Context, cl *nbd.Client, d *diskState, known map[int64]lifeboat.Hash, more func(*diskPlan) error) (*diskPlan, error) {
	size := cl.Size()
	nb := (size + lifeboat.BlockSize - 1) / lifeboat.BlockSize
	pl := &diskPlan{disk: d, client: cl, size: size, blocks: nb, dirty: newBitset(nb), data: newBitset(nb), known: known}
	if d.old == "" {
		if err := pl.allocation(ctx, [][2]int64{{0, nb}}); err != nil {
			return nil, err
		}
		copy(pl.dirty, pl.data)
		if d.whole {
			pl.dirty.setRange(0, nb) // the rest as zeros: whatever the replica held there
		}
		for b, h := range known {
			if b < nb && !h.IsZero() {
				pl.dirty.set(b)
			}
		}
	} else {
		err := cl.BlockStatus(ctx, d.dirtyContext(), 0, size, func(e nbd.Extent) error {
			if e.Flags&nbd.StateDirty != 0 {
				pl.markDirty(e.Offset, e.Length)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("dirty blocks of generation %q: %w", d.old, err)
		}
		if more != nil {
			if err := more(pl); err != nil {
				return nil, err
			}
		}
		// Only the dirty blocks' allocation matters. Asking for the whole
		// disk's costs the source QEMU a walk of every extent of it at every
		// cycle, which grows as the disk fragments (from 0.1 to 0.7 s within
		// 30 s of random writes into two 8 GiB disks, the RPO's largest part).
		if err := pl.allocation(ctx, pl.dirty.spans(nb, maxAllocationSpans)); err != nil {
			return nil, err
		}
	}
	pl.count()
	return pl, nil
}

// maxAllocationSpans bounds the block-status requests of one incremental
// plan: nearby dirty runs are asked for together.
const maxAllocationSpans = 1024

// allocationParallel is how many block-status requests are in flight.
const allocationParallel = 8

// maxPartial bounds the blocks a plan keeps as changed in part (about 40 MiB
// of map): past it, a block changed in part is sent whole.
const maxPartial = 1 << 20

// markDirty marks bytes [off, off+length) changed: the blocks it covers whole
// as whole, those it covers in part by their sub-blocks.
func (pl *diskPlan) markDirty(off, length int64) {
	end := min(off+length, pl.size)
	if off < 0 || end <= off {
		return
	}
	lo, hi := pl.blockRange(off, end-off)
	inLo, inHi := lo, hi
	if pl.markPart(lo, off, end) {
		inLo++
	}
	if hi-1 > lo && pl.markPart(hi-1, off, end) {
		inHi--
	}
	if inLo < inHi {
		pl.markWhole(inLo, inHi)
	}
}

// markPart marks the sub-blocks of block b that bytes [off, end) touch, and
// reports whether that is not the whole block.
func (pl *diskPlan) markPart(b, off, end int64) bool {
	bs := b * lifeboat.BlockSize
	n := int(min(lifeboat.BlockSize, pl.size-bs))
	d := lifeboat.DirtyOf(off-bs, end-bs)
	if d.Bytes(n) == n {
		return false
	}
	if !pl.dirty.has(b) {
		pl.dirty.set(b)
		if len(pl.partial) < maxPartial {
			if pl.partial == nil {
				pl.partial = make(map[int64]lifeboat.Dirty)
			}
			pl.partial[b] = d
		}
		return true
	}
	if old, ok := pl.partial[b]; ok { // else it changed whole already
		if d |= old; d.Bytes(n) == n {
			delete(pl.partial, b)
		} else {
			pl.partial[b] = d
		}
	}
	return true
}

// markWhole marks blocks [lo, hi) changed whole.
func (pl *diskPlan) markWhole(lo, hi int64) {
	pl.dirty.setRange(lo, hi)
	if len(pl.partial) == 0 {
		return
	}
	if hi-lo < int64(len(pl.partial)) {
		for b := lo; b < hi; b++ {
			delete(pl.partial, b)
		}
		return
	}
	for b := range pl.partial {
		if lo <= b && b < hi {
			delete(pl.partial, b)
		}
	}
}

func (pl *diskPlan) blockRange(off, length int64) (int64, int64) {
	return off / lifeboat.BlockSize, min((off+length+lifeboat.BlockSize-1)/lifeboat.BlockSize, pl.blocks)
}

// allocation marks as data the blocks of spans (block ranges [lo, hi)) with
// any allocated, non-zero extent, asking base:allocation for each span.
func (pl *diskPlan) allocation(ctx context.Context, spans [][2]int64) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
		next  = make(chan [2]int64)
	)
	for range min(allocationParallel, len(spans)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sp := range next {
				off := sp[0] * lifeboat.BlockSize
				length := min(sp[1]*lifeboat.BlockSize, pl.size) - off
				var data [][2]int64
				err := pl.client.BlockStatus(ctx, "base:allocation", off, length, func(e nbd.Extent) error {
					if e.Flags&nbd.StateZero == 0 {
						lo, hi := pl.blockRange(e.Offset, e.Length)
						data = append(data, [2]int64{lo, hi})
					}
					return nil
				})
				mu.Lock()
				if err != nil && first == nil {
					first = fmt.Errorf("allocation of the fleece at %d+%d: %w", off, length, err)
					cancel()
				}
				for _, r := range data {
					pl.data.setRange(r[0], r[1])
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for _, sp := range spans {
		select {
		case next <- sp:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		first = ctx.Err()
	}
	return first
}

// spans are the runs of set bits among the first n, as block ranges
// [lo, hi), runs less than a gap apart joined so that there are at most
// limit: the gap grows from 16 blocks (1 MiB) until they are.
func (b bitset) spans(n int64, limit int) [][2]int64 {
	var runs [][2]int64
	for i := int64(0); i < n; {
		w := b[i/64] >> (i % 64)
		if w == 0 {
			i = (i/64 + 1) * 64
			continue
		}
		i += int64(bits.TrailingZeros64(w))
		if i >= n {
			break
		}
		lo := i
		for i < n {
			w := ^b[i/64] >> (i % 64)
			if w == 0 {
				i = (i/64 + 1) * 64
				continue
			}
			i += int64(bits.TrailingZeros64(w))
			break
		}
		runs = append(runs, [2]int64{lo, min(i, n)})
	}
	for gap := int64(16); ; gap *= 4 {
		var out [][2]int64
		for _, r := range runs {
			if k := len(out) - 1; k >= 0 && r[0]-out[k][1] < gap {
				out[k][1] = r[1]
				continue
			}
			out = append(out, r)
		}
		if len(out) <= limit {
			return out
		}
		runs = out
	}
}

// count sets changed from the dirty blocks.
func (pl *diskPlan) count() {
	pl.changed = pl.dirty.count() * lifeboat.BlockSize
	if pl.blocks > 0 && pl.dirty.has(pl.blocks-1) {
		pl.changed -= pl.blocks*lifeboat.BlockSize - pl.size // the short last block
	}
}

// addTargetChanges adds to the blocks to handle those the target changed on
// its own (see ChangedTarget): each is sent as this site holds it, data or
// zeros, whatever the generation says of it.
func (pl *diskPlan) addTargetChanges(ctx context.Context, vm string, t ChangedTarget) error {
	err := t.TargetChanged(ctx, vm, pl.disk.name, func(off, length int64) error {
		if off < 0 || length <= 0 || off >= pl.size || length > pl.size-off {
			return fmt.Errorf("the target says it changed bytes %d+%d, outside the %d-byte disk", off, length, pl.size)
		}
		pl.markWhole(off/lifeboat.BlockSize, (off+length+lifeboat.BlockSize-1)/lifeboat.BlockSize)
		return nil
	})
	if err != nil {
		return fmt.Errorf("what %s changed on its own since its latest point: %w", t.Peer(), err)
	}
	pl.count()
	return nil
}

// run is a stretch of consecutive dirty blocks, all data or all zero.
type run struct {
	lo, hi int64
	zero   bool
}

// span is a run's byte range, clipped to the disk's end.
func (pl *diskPlan) span(r run) (int64, int64) {
	off := r.lo * lifeboat.BlockSize
	return off, min(r.hi*lifeboat.BlockSize, pl.size) - off
}

// runs walks the dirty blocks in order: data runs of at most chunk blocks (one read
// each), zero runs of any length (one message each).
func (pl *diskPlan) runs(chunk int) []run {
	var out []run
	cur := run{lo: -1}
	for i := int64(0); i < pl.blocks; i++ {
		if i%64 == 0 && pl.dirty[i/64] == 0 {
			if cur.lo >= 0 {
				out = append(out, cur)
				cur.lo = -1
			}
			i += 63
			continue
		}
		if !pl.dirty.has(i) {
			if cur.lo >= 0 {
				out = append(out, cur)
				cur.lo = -1
			}
			continue
		}
		z := !pl.data.has(i)
		if cur.lo >= 0 && (cur.zero != z || (!z && i-cur.lo >= int64(chunk))) {
			out = append(out, cur)
			cur.lo = -1
		}
		if cur.lo < 0 {
			cur = run{lo: i, hi: i, zero: z}
		}
		cur.hi = i + 1
	}
	if cur.lo >= 0 {
		out = append(out, cur)
	}
	return out
}

// knownZero reports whether the recovery site's copy of block i reads as zeros.
func (pl *diskPlan) knownZero(i int64) bool {
	h, ok := pl.known[i]
	return !ok || h.IsZero()
}

func (pl *diskPlan) allKnownZero(r run) bool {
	for i := r.lo; i < r.hi; i++ {
		if !pl.knownZero(i) {
			return false
		}
	}
	return true
}

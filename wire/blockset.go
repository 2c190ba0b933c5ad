package wire

import (
	"errors"
	"fmt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// errSentTwice marks a point stream that names a block a second time. A
// point's frames are applied concurrently and in no order, so the second one
// would race the first, and the block could end up with the bytes of one and
// the record of the other: the point is refused instead.
var errSentTwice = errors.New("sent twice in one point (a point names each block once at most)")

// blockSet is the set of blocks a point stream has named for one disk: one
// bit per block, in regions of 1 GiB allocated as they are touched (2 KiB
// each), and a region once full shares one full region whatever filled it.
// So it costs little on a sparse or a huge disk: an incremental point's
// scattered blocks a few regions, a 16 TiB disk sent whole its map entries
// only, where a bitmap of the whole disk (the protected site's plan) would
// be 32 MiB for every point.
type blockSet map[int64]*region

const (
	regionBlocks = 1 << 30 / lifeboat.BlockSize
	regionWords  = regionBlocks / 64
)

// region is the blocks of one region of the disk in the set.
type region struct {
	n    int64 // blocks set
	bits [regionWords]uint64
}

// fullRegion stands for every region whose blocks are all in the set. Its
// bits are not read (n says it is full) and it is never written.
var fullRegion = &region{n: regionBlocks}

// first is the first block of [lo, hi) in r, or -1.
func (r *region) first(lo, hi int64) int64 {
	if r.n == regionBlocks {
		return lo
	}
	for i := lo; i < hi; i++ {
		if r.bits[i/64]&(1<<(i%64)) != 0 {
			return i
		}
	}
	return -1
}

// spans calls fn with each region that blocks [first, end) touch and the
// part of them in it, while fn returns true.
func spans(first, end int64, fn func(reg, lo, hi int64) bool) {
	for b := first; b < end; {
		reg, lo := b/regionBlocks, b%regionBlocks
		hi := min(regionBlocks, lo+end-b)
		if !fn(reg, lo, hi) {
			return
		}
		b += hi - lo
	}
}

// add adds blocks [first, end) to the set, or, when one of them is in it
// already, adds none and returns the first such block and false.
func (s blockSet) add(first, end int64) (int64, bool) {
	dup := int64(-1)
	spans(first, end, func(reg, lo, hi int64) bool {
		if r := s[reg]; r != nil {
			if i := r.first(lo, hi); i >= 0 {
				dup = reg*regionBlocks + i
			}
		}
		return dup < 0
	})
	if dup >= 0 {
		return dup, false
	}
	spans(first, end, func(reg, lo, hi int64) bool {
		r := s[reg]
		if r == nil {
			if hi-lo == regionBlocks {
				s[reg] = fullRegion
				return true
			}
			r = new(region)
			s[reg] = r
		}
		for i := lo; i < hi; i++ {
			r.bits[i/64] |= 1 << (i % 64)
		}
		if r.n += hi - lo; r.n == regionBlocks {
			s[reg] = fullRegion // its bitmap goes
		}
		return true
	})
	return 0, true
}

// pointBlocks is what a point stream has named so far, per disk, within
// the disks' sizes as the point's Begin gives them.
type pointBlocks struct {
	size map[string]int64
	sets map[string]blockSet
}

func newPointBlocks(p lifeboat.Point) *pointBlocks {
	pb := &pointBlocks{size: map[string]int64{}, sets: map[string]blockSet{}}
	for _, d := range p.Disks {
		pb.size[d.Name] = d.Size
	}
	return pb
}

// claim records that frame f writes its blocks, before it is applied: a
// frame naming a block that an earlier frame of the point named is an
// error. A range outside the point's disks is left to the writer, which
// refuses it with its own error.
func (pb *pointBlocks) claim(f *wirepb.Frame) error {
	var (
		disk        string
		off, length int64
	)
	switch body := f.Body.(type) {
	case *wirepb.Frame_Blocks:
		disk, off, length = body.Blocks.Disk, body.Blocks.Offset, int64(body.Blocks.Length)
	case *wirepb.Frame_Patch:
		disk, off, length = body.Patch.Disk, body.Patch.Offset, 1
	case *wirepb.Frame_Zeroes:
		disk, off, length = body.Zeroes.Disk, body.Zeroes.Offset, body.Zeroes.Length
	case *wirepb.Frame_Copy:
		disk, off, length = body.Copy.Disk, body.Copy.Offset, 1
	default:
		return nil
	}
	size, ok := pb.size[disk]
	if !ok || off < 0 || off%lifeboat.BlockSize != 0 || length <= 0 || off >= size || length > size-off {
		return nil
	}
	s := pb.sets[disk]
	if s == nil {
		s = blockSet{}
		pb.sets[disk] = s
	}
	first := off / lifeboat.BlockSize
	end := (off + length + lifeboat.BlockSize - 1) / lifeboat.BlockSize
	if dup, ok := s.add(first, end); !ok {
		return fmt.Errorf("disk %q: block at offset %d %w", disk, dup*lifeboat.BlockSize, errSentTwice)
	}
	return nil
}

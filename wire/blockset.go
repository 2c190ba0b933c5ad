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

// blockSet is the set of blocks a point stream has named for one disk: one bit per
// block, in regions of 1 GiB allocated as they are touched (2 KiB each; a
// region written whole shares one full region), so that it stays small on a
// sparse or a huge disk: a 16 TiB disk written whole costs nothing beyond
// its full regions' map entries.
type blockSet map[int64]*[regionWords]uint64

const (
	regionBlocks = 1 << 30 / lifeboat.BlockSize
	regionWords  = regionBlocks / 64
)

// fullRegion stands for a region whose every block is in the set. It is
// never written.
var fullRegion = func() *[regionWords]uint64 {
	var r [regionWords]uint64
	for i := range r {
		r[i] = ^uint64(0)
	}
	return &r
}()

// add adds blocks [first, end) to the set, or, when one of them is in it
// already, adds none and returns the first such block and false.
func (s blockSet) add(first, end int64) (int64, bool) {
	for b := first; b < end; {
		reg, lo := b/regionBlocks, b%regionBlocks
		hi := min(regionBlocks, lo+end-b)
		if r := s[reg]; r != nil {
			if dup := firstSet(r, lo, hi); dup >= 0 {
				return reg*regionBlocks + dup, false
			}
		}
		b += hi - lo
	}
	for b := first; b < end; {
		reg, lo := b/regionBlocks, b%regionBlocks
		hi := min(regionBlocks, lo+end-b)
		r := s[reg]
		switch {
		case lo == 0 && hi == regionBlocks:
			s[reg] = fullRegion // it had none of them: now it has all
		case r == nil:
			r = new([regionWords]uint64)
			s[reg] = r
			fallthrough
		default:
			for i := lo; i < hi; i++ {
				r[i/64] |= 1 << (i % 64)
			}
		}
		b += hi - lo
	}
	return 0, true
}

// firstSet is the first block of [lo, hi) set in r, or -1.
func firstSet(r *[regionWords]uint64, lo, hi int64) int64 {
	if r == fullRegion {
		return lo
	}
	for i := lo; i < hi; i++ {
		if r[i/64]&(1<<(i%64)) != 0 {
			return i
		}
	}
	return -1
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

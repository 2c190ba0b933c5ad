package lifeboat

import "errors"

// ErrSourcePending is returned (wrapped) by a sink's copy whose source block
// has not been written in this point yet: its write may still be on its way
// (a receiver writes with several workers), so the copy is tried again.
var ErrSourcePending = errors.New("copy source not written yet in this point")

// ErrNoChangeRecord marks a disk whose own record of its writes since a point
// is gone or cannot be trusted (a bitmap lost or left inconsistent by a
// crash, a disk replaced): what it changed must be found by comparing hashes.
var ErrNoChangeRecord = errors.New("no trustworthy record of the disk's own writes")

// PointSink receives one point's blocks, whatever keeps them: the wire
// client that carries them to a recovery site's chain of points, or a writer
// into a disk (failback's target, the production disk itself). A cycle reads
// its source and calls these; it neither knows nor cares which one it has.
//
// SendBlocks, SendCopy and SendZeroes are safe for concurrent use. Commit
// returns the point as kept only once every byte of it is durable; after an
// error or Abort the sink holds nothing a caller may rely on.
type PointSink interface {
	// SendBlocks takes consecutive blocks of disk from off, hashes[i] the
	// hash of block i, and returns the bytes it put on its way (on the wire,
	// or written).
	SendBlocks(disk string, off int64, data []byte, hashes []Hash) (int64, error)
	// SendPatch takes one block of disk at off (block aligned), whose bytes
	// are block and hash h, of which only the sub-blocks in dirty changed
	// since the point the delta is computed from: a sink may send only
	// those, the rest being what the target holds already. It returns the
	// bytes it put on its way.
	SendPatch(disk string, off int64, block []byte, h Hash, dirty Dirty) (int64, error)
	// SendCopy says the block at (disk, off) holds the bytes already sent in
	// this point at (srcDisk, srcOff), of hash h: deduplication.
	SendCopy(disk string, off int64, srcDisk string, srcOff int64, length int, h Hash) error
	// SendZeroes says [off, off+length) of disk reads as zeros.
	SendZeroes(disk string, off, length int64) error
	Commit(stats CycleStats) (Point, error)
	Abort()
}

// Package bufpool is a pool of byte buffers in power-of-two tiers, for the
// block data that moves through a cycle: frames read from the point stream,
// decompressed chunks, blocks read back for a copy.
//
// Its buffers are not cleared: whoever takes one fills it before reading it
// (a frame is read into it whole, a chunk decompressed into it, a block read
// into it). Clearing would cost a memclr per byte moved; allocating instead
// costs the same and more GC (in `make bench`'s RPO run at 40 MB/s the
// recovery site spent 7% of its CPU zeroing fresh 4-5 MiB buffers).
package bufpool

import (
	"math/bits"
	"sync"
)

// The tiers: 256 B up to 8 MiB, which holds the largest frame of the point
// stream (a 4 MiB chunk, its hashes and header). Larger requests are
// allocated and not kept.
const (
	minTier = 8
	maxTier = 23
)

// Pool is a tiered pool; its zero value is ready. It meets gRPC's
// mem.BufferPool.
type Pool struct {
	tiers [maxTier + 1]sync.Pool
}

// Shared is the process's pool.
var Shared = &Pool{}

// tierFor is the smallest tier holding n bytes.
func tierFor(n int) int { return max(bits.Len(uint(n-1)), minTier) }

// Get is a buffer of length n (its contents are whatever it held last).
func (p *Pool) Get(n int) *[]byte {
	if n <= 0 {
		b := []byte{}
		return &b
	}
	t := tierFor(n)
	if t > maxTier {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.tiers[t].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<t)
	return &b
}

// Put gives b back; nothing may read or write it after.
func (p *Pool) Put(b *[]byte) {
	c := cap(*b)
	if c == 0 {
		return
	}
	t := bits.Len(uint(c)) - 1 // the largest tier that fits in c
	if t < minTier || t > maxTier {
		return
	}
	*b = (*b)[:0]
	p.tiers[t].Put(b)
}

package wire

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/experimental"
)

// gRPC's default buffer pool clears every buffer it hands out, and a buffer
// over 1 MiB (every full Blocks message) comes from a pool that clears it
// too: for a transfer that is one memclr per byte received and another per
// byte sent, 13% of an incremental cycle's CPU in `make bench`'s profile.
// Every buffer gRPC takes from the pool is filled before it is read (a
// message is encoded into it, or read into it whole), so the clearing
// protects nothing here. dirtyPool is the same tiered pool without it.
func init() { experimental.SetDefaultBufferPool(newDirtyPool()) }

// The pool's tiers: 256 B up to 8 MiB, which holds the largest message
// (MaxChunk plus its hashes and header, maxMessage).
const (
	minTier = 8
	maxTier = 23
)

type dirtyPool struct {
	tiers [maxTier + 1]sync.Pool
}

func newDirtyPool() *dirtyPool { return &dirtyPool{} }

// tierFor is the smallest tier holding n bytes.
func tierFor(n int) int { return max(bits.Len(uint(n-1)), minTier) }

func (p *dirtyPool) Get(n int) *[]byte {
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

func (p *dirtyPool) Put(b *[]byte) {
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

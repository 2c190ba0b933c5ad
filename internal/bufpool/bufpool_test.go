package bufpool

import "testing"

func TestGetSizes(t *testing.T) {
	var p Pool
	for _, n := range []int{1, 255, 256, 257, 4096, 64 << 10, 64<<10 + 1, 4 << 20, 5 << 20, 8 << 20} {
		b := p.Get(n)
		if len(*b) != n {
			t.Fatalf("Get(%d): length %d", n, len(*b))
		}
		if c := cap(*b); c < n || c&(c-1) != 0 || c < 1<<minTier {
			t.Fatalf("Get(%d): capacity %d, want a power of two of at least %d and %d", n, c, n, 1<<minTier)
		}
		p.Put(b)
		if len(*b) != 0 {
			t.Fatalf("Put left length %d", len(*b))
		}
	}
	// Beyond the largest tier: allocated to size, and not kept.
	big := p.Get(8<<20 + 1)
	if len(*big) != 8<<20+1 {
		t.Fatalf("Get(8 MiB + 1): length %d", len(*big))
	}
	p.Put(big)
	if b := p.Get(0); len(*b) != 0 {
		t.Fatalf("Get(0): length %d", len(*b))
	}
	// A buffer of a capacity between tiers goes to the tier it fills.
	odd := make([]byte, 0, 3000)
	p.Put(&odd)
	for range 10 {
		if b := p.Get(2048); cap(*b) < 2048 {
			t.Fatalf("Get(2048) after putting a 3000-byte buffer: capacity %d", cap(*b))
		}
	}
}

package wire

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestCompressRoundTrip(t *testing.T) {
	c := newCompressor()
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 2))
	random := make([]byte, 1<<20)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := bytes.Repeat([]byte("lifeboat keeps restore points; "), 1<<15)
	for _, tc := range []struct {
		name string
		data []byte
		zstd bool
	}{{"compressible", text, true}, {"random", random, false},
		// Random first, text after: the probe sees random and sends raw.
		{"random then text", append(append([]byte(nil), random[:probeSize]...), text[:1<<20-probeSize]...), false},
		// Text first, random after: the probe passes, the whole does not pay.
		{"text then random", append(append([]byte(nil), text[:probeSize]...), random[:1<<20-probeSize]...), false},
	} {
		out, z := c.compress(make([]byte, 0, MaxChunk), tc.data)
		if z != tc.zstd {
			t.Fatalf("%s: compressed=%v, want %v", tc.name, z, tc.zstd)
		}
		if !z {
			continue
		}
		back, err := decompress(nil, out, len(tc.data))
		if err != nil || !bytes.Equal(back, tc.data) {
			t.Fatalf("%s: round trip failed: %v", tc.name, err)
		}
		if _, err := decompress(nil, out, len(tc.data)-1); err == nil {
			t.Fatalf("%s: a wrong length was accepted", tc.name)
		}
	}
	if _, err := decompress(nil, []byte("not zstd at all"), 10); err == nil {
		t.Fatal("garbage decompressed")
	}
}

func BenchmarkCompress(b *testing.B) {
	c := newCompressor()
	rng := rand.New(rand.NewPCG(testenv.Seed(b), 2))
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	dst := make([]byte, 0, MaxChunk)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		c.compress(dst, data)
	}
}

// TestCompressHuffmanWherePays: the compressor drops zstd's Huffman stage on
// a link whose literals are random (a random write in a run of one byte) and
// takes it up again when they are text-like; every chunk round-trips.
func TestCompressHuffmanWherePays(t *testing.T) {
	c := newCompressor()
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 3))
	mixed := func() []byte { // the RPO bench's blocks: one random write in a block of 0x5a
		b := bytes.Repeat([]byte{0x5a}, 64<<10)
		off, n := rng.IntN(8)*4096, (1+rng.IntN(8))*4096
		for i := off; i < off+n; i++ {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	words := make([][]byte, 256)
	for i := range words {
		w := make([]byte, 3+rng.IntN(8))
		for j := range w {
			w[j] = 'a' + byte(rng.IntN(26))
		}
		words[i] = w
	}
	letters := func() []byte { // words of a vocabulary: matches, and literals Huffman shrinks
		var b []byte
		for len(b) < 64<<10 {
			b = append(append(b, words[rng.IntN(len(words))]...), ' ')
		}
		return b[:64<<10]
	}
	for _, phase := range []struct {
		name    string
		block   func() []byte
		entropy bool
	}{{"random literals", mixed, false}, {"text-like literals", letters, true}, {"random literals again", mixed, false}} {
		for k := range 2 * sampleEvery {
			b := phase.block()
			out, z := c.compress(make([]byte, 0, len(b)+1<<10), b)
			if !z {
				t.Fatalf("%s: block %d, a compressible block was sent raw (%q..., %d bytes: %d with Huffman, %d without)", phase.name, k, b[:20], len(b), len(c.enc.EncodeAll(b, nil)), len(c.raw.EncodeAll(b, nil)))
			}
			back, err := decompress(nil, out, len(b))
			if err != nil || !bytes.Equal(back, b) {
				t.Fatalf("%s: round trip failed: %v", phase.name, err)
			}
		}
		if got := c.entropy.Load(); got != phase.entropy {
			t.Errorf("%s: Huffman stage on = %v, want %v", phase.name, got, phase.entropy)
		}
	}
}

// A stream of small incompressible payloads (patches of random writes):
// what compressing where it pays costs per byte.
func BenchmarkCompressSmallRandom(b *testing.B) {
	c := newCompressor()
	rng := rand.New(rand.NewPCG(testenv.Seed(b), 2))
	data := make([]byte, 24<<10)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	dst := make([]byte, 0, MaxChunk)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		c.compress(dst, data)
	}
}

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

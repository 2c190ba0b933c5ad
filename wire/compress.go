package wire

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"

	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
)

// Compression is a per-link setting: off for a fast LAN, zstd for a WAN.
type Compression string

const (
	CompressionNone Compression = "none"
	CompressionZstd Compression = "zstd"
)

// ParseCompression checks a link's compression setting.
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case CompressionNone, CompressionZstd:
		return c, nil
	case "":
		return CompressionZstd, nil
	}
	return "", fmt.Errorf("unknown compression %q: use zstd (WAN) or none (fast LAN)", s)
}

// MaxChunk bounds one Blocks message's uncompressed data; the receiver refuses larger.
const MaxChunk = 4 << 20

// probeSize is how much of a chunk is compressed first to see whether the rest
// is worth it: zstd's fastest level runs at a few hundred MB/s per core, far
// below the rest of the pipeline, so random data must cost only the probe.
const probeSize = 64 << 10

// compressor compresses chunks where it pays. Safe for concurrent use.
//
// zstd codes a chunk's literals (what no match covers) with Huffman, which
// pays on text-like data and costs for nothing on literals that are random:
// a 64 KiB block holding a random write in a run of one byte compresses to
// the same 56% either way, at 2.2 GB/s with the Huffman stage and 9.2 GB/s
// without; source code, 35% with and 42% without, at 200 and 225 MB/s
// (one core here). So every sampleEvery-th chunk is compressed both ways,
// and until the next sample the link uses the way that paid: the Huffman
// stage when it saved at least a sixteenth of what the other made.
type compressor struct {
	enc     *zstd.Encoder // literals Huffman-coded
	raw     *zstd.Encoder // literals as they are
	chunks  atomic.Uint64
	entropy atomic.Bool // the last sample's verdict
}

// sampleEvery is how often the compressor checks whether the Huffman stage pays.
const sampleEvery = 32

func newCompressor() *compressor {
	opts := []zstd.EOption{zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false)}
	enc, err := zstd.NewWriter(nil, opts...)
	if err != nil {
		panic(err) // only for invalid options, which are constant here
	}
	raw, err := zstd.NewWriter(nil, append(opts, zstd.WithNoEntropyCompression(true))...)
	if err != nil {
		panic(err)
	}
	c := &compressor{enc: enc, raw: raw}
	c.entropy.Store(true)
	return c
}

// pays reports whether compressing n bytes into m saves at least an eighth.
func pays(m, n int) bool { return m <= n-n/8 }

// compress returns the compressed form of b into dst and true, or b and false when
// compressing would not save at least an eighth.
func (c *compressor) compress(dst, b []byte) ([]byte, bool) {
	if c.chunks.Add(1)%sampleEvery == 1 {
		out := c.sample(dst, b)
		if !pays(len(out), len(b)) {
			return b, false
		}
		return out, true
	}
	entropy := c.entropy.Load()
	out := c.encodeWith(dst, b, entropy)
	if out == nil && !entropy {
		// Matches alone do not pay; Huffman-coded literals might (text with
		// few repeats), and then they do from now on.
		if out = c.encodeWith(dst, b, true); out != nil {
			c.entropy.Store(true)
		}
	}
	if out == nil {
		return b, false
	}
	return out, true
}

// encodeWith compresses b into dst with the Huffman stage or without, a
// probe first, and returns nil when it does not pay.
func (c *compressor) encodeWith(dst, b []byte, entropy bool) []byte {
	enc := c.raw
	if entropy {
		enc = c.enc
	}
	if len(b) > probeSize {
		if probe := enc.EncodeAll(b[:probeSize], dst[:0]); !pays(len(probe), probeSize) {
			return nil
		}
	}
	if out := enc.EncodeAll(b, dst[:0]); pays(len(out), len(b)) {
		return out
	}
	return nil
}

// sample compresses b both ways into dst, keeps the smaller, and records
// whether the Huffman stage paid.
func (c *compressor) sample(dst, b []byte) []byte {
	out := c.raw.EncodeAll(b, dst[:0])
	buf := bufpool.Shared.Get(len(out) + 1<<10)
	defer bufpool.Shared.Put(buf)
	huff := c.enc.EncodeAll(b, (*buf)[:0])
	c.entropy.Store(len(huff) <= len(out)-len(out)/16)
	if len(huff) < len(out) {
		return append(dst[:0], huff...)
	}
	return out
}

var decoder = func() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxChunk+1<<16),
		zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)))
	if err != nil {
		panic(err)
	}
	return d
}()

// decodeSlack is room a decompression buffer has past the chunk's end: with
// less, zstd decodes the chunk's last block with byte-safe copies, which on
// 64 KiB chunks of source code here halved its speed (640 MB/s, 1.2 GB/s
// with the room).
const decodeSlack = 64

// decompress inflates a chunk that must come out exactly n bytes long.
func decompress(dst, b []byte, n int) ([]byte, error) {
	out, err := decoder.DecodeAll(b, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	if len(out) != n {
		return nil, fmt.Errorf("zstd: inflated to %d bytes, header said %d", len(out), n)
	}
	return out, nil
}

package wire

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
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

// incompressibleSkip is how many chunks are sent raw after one that did not pay:
// zstd's fastest level runs at a few hundred MB/s per core, far below the rest of
// the pipeline, so probing every chunk of random data would waste most of a core.
const incompressibleSkip = 16

// compressor compresses chunks where it pays. Safe for concurrent use.
type compressor struct {
	enc  *zstd.Encoder
	skip atomic.Int32
}

func newCompressor() *compressor {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false))
	if err != nil {
		panic(err) // only for invalid options, which are constant here
	}
	return &compressor{enc: enc}
}

// compress returns the compressed form of b into dst and true, or b and false when
// compressing would not save at least an eighth.
func (c *compressor) compress(dst, b []byte) ([]byte, bool) {
	if c.skip.Load() > 0 {
		c.skip.Add(-1)
		return b, false
	}
	out := c.enc.EncodeAll(b, dst[:0])
	if len(out) > len(b)-len(b)/8 {
		c.skip.Store(incompressibleSkip)
		return b, false
	}
	return out, true
}

var decoder = func() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxChunk+1<<16),
		zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)))
	if err != nil {
		panic(err)
	}
	return d
}()

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

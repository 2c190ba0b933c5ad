package wire

import (
	"fmt"
	"runtime"

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

// probeSize is how much of a chunk is compressed first to see whether the rest
// is worth it: zstd's fastest level runs at a few hundred MB/s per core, far
// below the rest of the pipeline, so random data must cost only the probe.
const probeSize = 64 << 10

// compressor compresses chunks where it pays. Safe for concurrent use.
type compressor struct {
	enc *zstd.Encoder
}

func newCompressor() *compressor {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false))
	if err != nil {
		panic(err) // only for invalid options, which are constant here
	}
	return &compressor{enc: enc}
}

// pays reports whether compressing n bytes into m saves at least an eighth.
func pays(m, n int) bool { return m <= n-n/8 }

// compress returns the compressed form of b into dst and true, or b and false when
// compressing would not save at least an eighth.
func (c *compressor) compress(dst, b []byte) ([]byte, bool) {
	if len(b) > probeSize {
		probe := c.enc.EncodeAll(b[:probeSize], dst[:0])
		if !pays(len(probe), probeSize) {
			return b, false
		}
	}
	out := c.enc.EncodeAll(b, dst[:0])
	if !pays(len(out), len(b)) {
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

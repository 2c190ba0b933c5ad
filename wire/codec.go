package wire

import (
	"fmt"
	"unicode/utf8"

	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// The recovery site's codec. protobuf's Unmarshal copies every bytes field
// out of the message, so each block's data was copied once more after gRPC
// had put the message in one buffer: 8% of `make bench`'s libvirt profile.
// frameCodec decodes a Blocks frame by hand instead, its hashes and data
// left in gRPC's buffer, which the frame holds until it is released. Every
// other message, and any Blocks frame it does not recognize exactly (a field
// it does not know, a field repeated as a merge, a wrong wire type), goes
// through protobuf as before.
type frameCodec struct{ std encoding.CodecV2 }

func newFrameCodec() frameCodec { return frameCodec{std: encoding.GetCodecV2(protocodec.Name)} }

func (c frameCodec) Name() string { return protocodec.Name }

func (c frameCodec) Marshal(v any) (mem.BufferSlice, error) { return c.std.Marshal(v) }

func (c frameCodec) Unmarshal(data mem.BufferSlice, v any) error {
	rf, ok := v.(*recvFrame)
	if !ok {
		return c.std.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	if b, ok := decodeBlocksFrame(buf.ReadOnlyData()); ok {
		rf.f.Body = &wirepb.Frame_Blocks{Blocks: b}
		rf.buf = buf
		return nil
	}
	defer buf.Free()
	if err := proto.Unmarshal(buf.ReadOnlyData(), &rf.f); err != nil {
		return fmt.Errorf("frame: %w", err)
	}
	return nil
}

// recvFrame is a received frame whose bytes may still live in gRPC's buffer:
// release it once nothing reads the frame any more.
type recvFrame struct {
	f   wirepb.Frame
	buf mem.Buffer
}

func (r *recvFrame) release() {
	if r.buf != nil {
		r.buf.Free()
		r.buf = nil
	}
}

// decodeBlocksFrame decodes a Frame holding a Blocks body, the slices of the
// result pointing into b. It reports false for anything else, and for any
// encoding it does not read exactly as protobuf would: the caller then
// decodes b with protobuf.
func decodeBlocksFrame(b []byte) (*wirepb.Blocks, bool) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 || num != 2 || typ != protowire.BytesType {
		return nil, false
	}
	v, m := protowire.ConsumeBytes(b[n:])
	if m < 0 || n+m != len(b) {
		return nil, false // malformed, or more fields after the body
	}
	out := &wirepb.Blocks{}
	for len(v) > 0 {
		num, typ, n := protowire.ConsumeTag(v)
		if n < 0 {
			return nil, false
		}
		v = v[n:]
		var (
			x uint64
			s []byte
		)
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(v)
		case protowire.BytesType:
			s, n = protowire.ConsumeBytes(v)
		default:
			return nil, false
		}
		if n < 0 {
			return nil, false
		}
		v = v[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			if !utf8.Valid(s) {
				return nil, false // protobuf refuses it: let it say so
			}
			out.Disk = string(s)
		case num == 2 && typ == protowire.VarintType:
			out.Offset = int64(x)
		case num == 3 && typ == protowire.BytesType:
			out.Hashes = s
		case num == 4 && typ == protowire.VarintType:
			out.Length = uint32(x)
		case num == 5 && typ == protowire.VarintType:
			out.Zstd = protowire.DecodeBool(x)
		case num == 6 && typ == protowire.BytesType:
			out.Data = s
		default:
			return nil, false
		}
	}
	return out, true
}

package wire

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// The point stream. A point's blocks are most of what crosses between sites,
// and through gRPC each byte of them was copied five times in user space
// (protobuf's marshal, gRPC's write buffer, HTTP/2 frames, gRPC's read
// buffers, one contiguous message) and cut into 16 KiB HTTP/2 frames: in
// `make bench` that was a third of lifeboat's CPU per GiB. So a point travels
// on a TLS connection of its own, to the same address and with the same
// mutual TLS as the gRPC calls: the server tells the two apart by the ALPN
// protocol the client asks for (streamProto, or gRPC's "h2").
//
// On the connection, each message is a frame: its type (one byte), the
// payload's length (4 bytes, big-endian) and the payload. The client sends a
// Begin, then blocks, zeroes and copies in any number, then a Commit; the
// server answers once, with a Reply (the committed point) or an Error (a gRPC
// status: its code and message), and an error may come at any time. A
// Message frame is a wirepb.Frame (Begin, Zeroes, Copy, Commit); a Blocks
// frame is the length of its header (4 bytes), the header (a wirepb.Blocks
// without data) and the data itself, which the receiver reads straight into
// the buffer it writes from. A Patch frame is laid out as a Blocks frame is,
// its header a wirepb.Patch without data: the changed parts of one block.
//
// Version 4 added the Patch frame. A client asks for both versions, and does
// not send patches to a server that chose streamProtoV3 (it sends their
// blocks whole).
const (
	streamProto   = "lifeboat-point/4"
	streamProtoV3 = "lifeboat-point/3"
)

// Frame types.
const (
	frameMessage byte = 'M' // wirepb.Frame: Begin, Zeroes, Copy or Commit
	frameBlocks  byte = 'D' // header length, wirepb.Blocks without data, data
	framePatch   byte = 'P' // header length, wirepb.Patch without data, data (version 4)
	frameReply   byte = 'R' // wirepb.ReplicateReply: the point is committed
	frameError   byte = 'E' // google.rpc.Status: the point is refused or failed
)

const (
	frameHead = 5 // type and length
	// maxFrame bounds a frame's payload: a whole chunk, its hashes and header.
	maxFrame = MaxChunk + 1<<20
)

// errFrameTooLarge marks a frame over maxFrame: the peer is not a lifeboat of
// this version, or the stream is corrupt.
var errFrameTooLarge = errors.New("frame too large")

// appendHead appends a frame's type and payload length to b.
func appendHead(b []byte, typ byte, n int) []byte {
	return binary.BigEndian.AppendUint32(append(b, typ), uint32(n))
}

// marshalFrame is a whole frame holding message m.
func marshalFrame(typ byte, m proto.Message) ([]byte, error) {
	body, err := proto.Marshal(m)
	if err != nil {
		return nil, err
	}
	return append(appendHead(make([]byte, 0, frameHead+len(body)), typ, len(body)), body...), nil
}

// dataHead is the start of a Blocks or Patch frame, up to its data: the
// frame's head, the header's length and the header (hdr, without data), for
// dataLen bytes of data.
func dataHead(typ byte, hdr proto.Message, dataLen int) ([]byte, error) {
	h, err := proto.Marshal(hdr)
	if err != nil {
		return nil, err
	}
	out := appendHead(make([]byte, 0, frameHead+4+len(h)), typ, 4+len(h)+dataLen)
	out = binary.BigEndian.AppendUint32(out, uint32(len(h)))
	return append(out, h...), nil
}

// splitData splits a Blocks or Patch frame's payload into its header, decoded
// into hdr, and its data (the payload's tail, not copied).
func splitData(payload []byte, hdr proto.Message) ([]byte, error) {
	if len(payload) < 4 {
		return nil, fmt.Errorf("data frame of %d bytes: no header", len(payload))
	}
	n := binary.BigEndian.Uint32(payload)
	if uint64(n) > uint64(len(payload)-4) {
		return nil, fmt.Errorf("data frame of %d bytes with a %d-byte header", len(payload), n)
	}
	if err := proto.Unmarshal(payload[4:4+n], hdr); err != nil {
		return nil, fmt.Errorf("data frame's header: %w", err)
	}
	return payload[4+n:], nil
}

// decodeBlocks decodes a Blocks frame's payload; the result's data is the
// payload's tail (not copied).
func decodeBlocks(payload []byte) (*wirepb.Blocks, error) {
	b := &wirepb.Blocks{}
	data, err := splitData(payload, b)
	if err != nil {
		return nil, err
	}
	if len(b.Data) != 0 {
		return nil, errors.New("blocks header carries data")
	}
	b.Data = data
	return b, nil
}

// decodePatch decodes a Patch frame's payload; the result's data is the
// payload's tail (not copied).
func decodePatch(payload []byte) (*wirepb.Patch, error) {
	p := &wirepb.Patch{}
	data, err := splitData(payload, p)
	if err != nil {
		return nil, err
	}
	if len(p.Data) != 0 {
		return nil, errors.New("patch header carries data")
	}
	p.Data = data
	return p, nil
}

// frameReader reads frames. Payloads are read into buffers of a pool, so that
// a Blocks frame's data is read once, straight from the TLS connection into
// the buffer the receiver hashes and writes from.
type frameReader struct {
	r *bufio.Reader
	// before, if set, is called before each frame is read (the point
	// stream's idle deadline).
	before func()
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 64<<10)}
}

// next reads one frame. Its payload is a pooled buffer: give it back with
// putPayload once nothing reads it.
func (fr *frameReader) next() (typ byte, payload []byte, err error) {
	if fr.before != nil {
		fr.before()
	}
	var head [frameHead]byte
	if _, err := io.ReadFull(fr.r, head[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(head[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("%w: frame %q of %d bytes, at most %d", errFrameTooLarge, head[0], n, maxFrame)
	}
	payload = getPayload(int(n))
	if _, err := io.ReadFull(fr.r, payload); err != nil {
		putPayload(payload)
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return head[0], payload, nil
}

// getPayload is a buffer of n bytes from the shared pool, for a frame's
// payload (read into it whole before anything reads it).
func getPayload(n int) []byte { return *bufpool.Shared.Get(n) }

func putPayload(b []byte) { bufpool.Shared.Put(&b) }

// statusFrame is an Error frame saying err: its gRPC status when it has one.
func statusFrame(err error) []byte {
	f, merr := marshalFrame(frameError, status.Convert(err).Proto())
	if merr != nil {
		f, _ = marshalFrame(frameError, status.New(codes.Internal, err.Error()).Proto())
	}
	return f
}

// statusFromFrame is the error an Error frame's payload says.
func statusFromFrame(payload []byte) error {
	var st spb.Status
	if err := proto.Unmarshal(payload, &st); err != nil {
		return fmt.Errorf("malformed error from the recovery site: %w", err)
	}
	if st.Code == int32(codes.OK) {
		return errors.New("the recovery site answered with an error frame saying OK")
	}
	return status.FromProto(&st).Err()
}

// tlsState is the TLS state of a connection made by Serve or the point
// stream's dial.
func tlsState(c net.Conn) (tls.ConnectionState, bool) {
	if f, ok := c.(*flushConn); ok {
		if t, ok := f.Conn.(*tls.Conn); ok {
			return t.ConnectionState(), true
		}
	}
	return tls.ConnectionState{}, false
}

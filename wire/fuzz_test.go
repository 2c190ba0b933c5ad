package wire

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// The fuzz targets feed arbitrary bytes to what decodes the site protocol: the
// recovery site's side of a point stream (frames -> decodeFrame ->
// pointFromPB, apply, statsFromPB, in Server.receive itself) and the
// protected site's side of the replies (Latest, Points, BlockMap). Every
// field of the messages is decoded by the generic protobuf path, so fields
// added to wire.proto are fuzzed without a change here. Properties: no panic,
// no hang, and what the server hands the store meets the PointWriter
// contract. The seeds run in every `go test`; `make fuzz` explores further.

// fuzzPoint is the point of the seed streams: two disks, one of them short of
// a whole last block.
func fuzzPoint() lifeboat.Point {
	return lifeboat.Point{VM: "vm1", ID: 7, Instant: time.Unix(1700000000, 5).UTC(), Consistency: lifeboat.Filesystem,
		Group: "g", Freeze: 3 * time.Millisecond, Note: "n",
		Disks: []lifeboat.PointDisk{{Name: "vda", Size: 4<<20 + 512, Resync: true}, {Name: "vdb", Size: 1<<20 + 512}}}
}

// captureConn is the client's end of a point stream with no TLS under it:
// it keeps the bytes the client writes, as they would be encrypted, and reads
// back one reply frame, the committed point.
type captureConn struct {
	net.Conn
	out   bytes.Buffer
	reply *bytes.Reader
}

func (c *captureConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *captureConn) Read(p []byte) (int, error)  { return c.reply.Read(p) }
func (c *captureConn) Close() error                { return nil }

func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// seedStream is the stream of one real point, produced by the client's own
// encoder (PointStream): Begin, compressed and raw blocks, a copy, zeroes,
// Commit. Each frame starts at the offset in frames.
func seedStream(t testing.TB, comp *compressor) (stream []byte, frames []int) {
	p := fuzzPoint()
	reply, err := marshalFrame(frameReply, &wirepb.ReplicateReply{Point: pointToPB(p)})
	if err != nil {
		t.Fatal(err)
	}
	cc := &captureConn{reply: bytes.NewReader(reply)}
	ps := &PointStream{c: &Client{comp: comp, peer: "dr"}, conn: &flushConn{Conn: cc, raw: newBatchConn(cc)},
		done: make(chan struct{}), stop: func() bool { return true }, patches: true}
	go ps.read()
	must := func(err error) {
		t.Helper()
		frames = append(frames, cc.out.Len())
		if err != nil {
			t.Fatal(err)
		}
	}
	frames = append(frames, 0)
	must(ps.writeMessage(&wirepb.Frame{Body: &wirepb.Frame_Begin{Begin: &wirepb.Begin{Point: pointToPB(p)}}}))
	text := bytes.Repeat([]byte("lifeboat "), 2*lifeboat.BlockSize/9+1)[:2*lifeboat.BlockSize]
	random := make([]byte, lifeboat.BlockSize)
	for i := range random {
		random[i] = byte(rand.Uint32())
	}
	hashes := func(b []byte) []lifeboat.Hash {
		var hs []lifeboat.Hash
		for len(b) > 0 {
			n := min(len(b), lifeboat.BlockSize)
			hs = append(hs, lifeboat.HashBlock(b[:n]))
			b = b[n:]
		}
		return hs
	}
	_, err = ps.SendBlocks("vda", 0, text, hashes(text))
	must(err)
	_, err = ps.SendBlocks("vda", 2*lifeboat.BlockSize, random, hashes(random))
	must(err)
	must(ps.SendCopy("vdb", 0, "vda", 0, lifeboat.BlockSize, lifeboat.HashBlock(text[:lifeboat.BlockSize])))
	tail := random[:512]
	_, err = ps.SendBlocks("vdb", 1<<20, tail, hashes(tail))
	must(err)
	must(ps.SendZeroes("vda", 3*lifeboat.BlockSize, 1<<20))
	_, err = ps.SendPatch("vda", 20*lifeboat.BlockSize, text[:lifeboat.BlockSize], lifeboat.HashBlock(text[:lifeboat.BlockSize]), 0b1000_0000_0000_0110)
	must(err)
	// A patch of a short last block (vda's: vdb's was sent whole above, and
	// a point names each block once).
	_, err = ps.SendPatch("vda", 4<<20, tail, lifeboat.HashBlock(tail), 1)
	must(err)
	_, err = ps.Commit(lifeboat.CycleStats{BytesChanged: 3 << 20, BytesZero: 1 << 20, BytesData: 3 * lifeboat.BlockSize, BytesSent: 1000, Duration: time.Second})
	must(err)
	return cc.out.Bytes(), frames[:len(frames)-1]
}

// fakeWriter stands in for a recovery.Writer. It is a fake on purpose: the
// target is the decoder and the server's checks, not storage (recovery's own
// tests drive the real writer). It checks what the server promises a
// PointWriter: whole decoded chunks within MaxChunk, one hash per block,
// copies of one block at most.
type fakeWriter struct {
	t       *testing.T
	p       lifeboat.Point
	written map[string]map[int64]lifeboat.Hash
}

func (w *fakeWriter) disk(name string) (lifeboat.PointDisk, error) {
	for _, d := range w.p.Disks {
		if d.Name == name {
			return d, nil
		}
	}
	return lifeboat.PointDisk{}, fmt.Errorf("no disk %q", name)
}

func (w *fakeWriter) WriteBlocks(_ context.Context, disk string, off int64, data []byte, hashes []lifeboat.Hash) error {
	if len(data) > MaxChunk {
		w.t.Errorf("apply passed %d bytes, over MaxChunk", len(data))
		return errors.New("over MaxChunk")
	}
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	if off < 0 || off%lifeboat.BlockSize != 0 || off > d.Size || int64(len(data)) > d.Size-off {
		return fmt.Errorf("range %d+%d outside disk %q", off, len(data), disk)
	}
	if want := (len(data) + lifeboat.BlockSize - 1) / lifeboat.BlockSize; len(hashes) != want {
		return fmt.Errorf("%d hashes for %d blocks", len(hashes), want)
	}
	for i, h := range hashes {
		lo := i * lifeboat.BlockSize
		if lifeboat.HashBlock(data[lo:min(lo+lifeboat.BlockSize, len(data))]) != h {
			return fmt.Errorf("hash mismatch at block %d", i)
		}
	}
	if w.written[disk] == nil {
		w.written[disk] = map[int64]lifeboat.Hash{}
	}
	for i, h := range hashes {
		w.written[disk][off/lifeboat.BlockSize+int64(i)] = h
	}
	return nil
}

func (w *fakeWriter) WritePatch(_ context.Context, disk string, off int64, dirty lifeboat.Dirty, data []byte, sum, h lifeboat.Hash) error {
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	if off < 0 || off%lifeboat.BlockSize != 0 || off >= d.Size {
		return fmt.Errorf("patch at %d outside disk %q", off, disk)
	}
	if _, err := dirty.Split(int(min(lifeboat.BlockSize, d.Size-off)), data); err != nil {
		return err
	}
	if lifeboat.HashBlock(data) != sum {
		return errors.New("patch hash mismatch")
	}
	if w.written[disk] == nil {
		w.written[disk] = map[int64]lifeboat.Hash{}
	}
	w.written[disk][off/lifeboat.BlockSize] = h
	return nil
}

func (w *fakeWriter) WriteZeroes(_ context.Context, disk string, off, length int64) error {
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	if off < 0 || length <= 0 || off > d.Size || length > d.Size-off {
		return fmt.Errorf("range %d+%d outside disk %q", off, length, disk)
	}
	return nil
}

func (w *fakeWriter) CopyBlock(_ context.Context, disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	if length <= 0 || length > lifeboat.BlockSize {
		w.t.Errorf("apply passed a copy of %d bytes", length)
		return errors.New("copy over a block")
	}
	if _, err := w.disk(disk); err != nil {
		return err
	}
	// Never ErrSourcePending: the server would wait for the source (bounded,
	// but seconds), which is not what this target explores.
	if got, ok := w.written[srcDisk][srcOff/lifeboat.BlockSize]; !ok || got != h {
		return fmt.Errorf("copy source %q offset %d not written with that hash", srcDisk, srcOff)
	}
	return nil
}

func (w *fakeWriter) Commit(_ context.Context, stats lifeboat.CycleStats) (lifeboat.Point, error) {
	p := w.p
	p.Stats = stats
	return p, nil
}

func (w *fakeWriter) Abort(context.Context) error { return nil }

// fakeStore hands the server a fakeWriter for the point it begins.
type fakeStore struct {
	t *testing.T
}

func (fakeStore) Authorize(string, string) error              { return nil }
func (fakeStore) Latest(string) (lifeboat.Point, bool, error) { return lifeboat.Point{}, false, nil }
func (fakeStore) Points(string) ([]lifeboat.Point, error)     { return nil, nil }
func (fakeStore) EachBlock(string, string, uint64, func(int64, lifeboat.Hash) error) error {
	return nil
}
func (s fakeStore) BeginPoint(_ context.Context, p lifeboat.Point) (PointWriter, error) {
	return &fakeWriter{t: s.t, p: p, written: map[string]map[int64]lifeboat.Hash{}}, nil
}

// receive is the recovery site's side of one point stream: Server.receive
// itself, with one writer so that a copy's source is written before it.
func receive(t *testing.T, in []byte) error {
	s := &Server{Site: "dr", Store: fakeStore{t}, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Writers: 1}
	_, err := s.receive(context.Background(), "prod", "fuzz", newFrameReader(bytes.NewReader(in)), nil, nil)
	return err
}

func FuzzReplicate(f *testing.F) {
	for _, comp := range []*compressor{newCompressor(), nil} {
		stream, at := seedStream(f, comp)
		f.Add(stream)
		f.Add(stream[:at[1]])                                                        // Begin only
		f.Add(stream[at[1]:])                                                        // no Begin
		f.Add(slices.Concat(stream[:at[1]], stream[:at[1]], stream[at[len(at)-1]:])) // two Begins
		f.Add(stream[:len(stream)-3])                                                // cut inside Commit
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		_ = receive(t, in)
	})
}

// TestReplicateSeed checks that the seed stream is a point the server takes
// whole, and that its cut and doubled variants are refused: the fuzzer starts
// from a valid stream, not from one refused early.
func TestReplicateSeed(t *testing.T) {
	for _, comp := range []*compressor{newCompressor(), nil} {
		stream, at := seedStream(t, comp)
		if err := receive(t, stream); err != nil {
			t.Fatalf("compression %v: the seed stream was refused: %v", comp != nil, err)
		}
		if len(at) != 9 {
			t.Fatalf("the seed stream has %d frames, want 9", len(at))
		}
		flipped := slices.Clone(stream)
		flipped[at[7]-1] ^= 1 // the last byte of the first patch's data
		for name, bad := range map[string][]byte{
			"Begin only":      stream[:at[1]],
			"no Begin":        stream[at[1]:],
			"no Commit":       stream[:at[len(at)-1]],
			"cut in Commit":   stream[:len(stream)-3],
			"two Begins":      slices.Concat(stream[:at[1]], stream),
			"copy before src": slices.Concat(stream[:at[1]], stream[at[3]:]),
			"patch corrupted": flipped,
		} {
			if err := receive(t, bad); err == nil {
				t.Errorf("compression %v: the stream %s was taken as a point", comp != nil, name)
			}
		}
	}
}

// fakeReplication is the recovery site as the client's stub sees it: each
// reply is whatever bytes the fuzzer gave it, unmarshalled.
type fakeReplication struct {
	latest, points []byte
	chunks         [][]byte
	changed        []byte
}

func (f *fakeReplication) Hello(context.Context, *wirepb.HelloRequest, ...grpc.CallOption) (*wirepb.HelloReply, error) {
	return nil, errors.New("not fuzzed")
}

func (f *fakeReplication) Latest(context.Context, *wirepb.VMRequest, ...grpc.CallOption) (*wirepb.LatestReply, error) {
	r := &wirepb.LatestReply{}
	return r, proto.Unmarshal(f.latest, r)
}

func (f *fakeReplication) Points(context.Context, *wirepb.VMRequest, ...grpc.CallOption) (*wirepb.PointsReply, error) {
	r := &wirepb.PointsReply{}
	return r, proto.Unmarshal(f.points, r)
}

func (f *fakeReplication) BlockMap(context.Context, *wirepb.BlockMapRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[wirepb.BlockMapChunk], error) {
	return &chunkStream{chunks: f.chunks}, nil
}

func (f *fakeReplication) Changed(context.Context, *wirepb.ChangedRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[wirepb.ChangedChunk], error) {
	return &changedStream{chunk: f.changed}, nil
}

type changedStream struct {
	grpc.ClientStream
	chunk []byte
}

func (s *changedStream) Recv() (*wirepb.ChangedChunk, error) {
	if s.chunk == nil {
		return nil, io.EOF
	}
	c := &wirepb.ChangedChunk{}
	err := proto.Unmarshal(s.chunk, c)
	s.chunk = nil
	return c, err
}

func (f *fakeReplication) PrepareFailback(context.Context, *wirepb.PrepareFailbackRequest, ...grpc.CallOption) (*wirepb.PrepareFailbackReply, error) {
	return nil, errors.New("not fuzzed")
}
func (f *fakeReplication) FinishFailback(context.Context, *wirepb.FinishFailbackRequest, ...grpc.CallOption) (*wirepb.FinishFailbackReply, error) {
	return nil, errors.New("not fuzzed")
}

func (f *fakeReplication) Failover(context.Context, *wirepb.FailoverRequest, ...grpc.CallOption) (*wirepb.FailoverReply, error) {
	return nil, errors.New("not fuzzed")
}

func (f *fakeReplication) Reverse(context.Context, *wirepb.ReverseRequest, ...grpc.CallOption) (*wirepb.ReverseReply, error) {
	return nil, errors.New("not fuzzed")
}

type chunkStream struct {
	grpc.ClientStream
	chunks [][]byte
}

func (s *chunkStream) Recv() (*wirepb.BlockMapChunk, error) {
	if len(s.chunks) == 0 {
		return nil, io.EOF
	}
	c := &wirepb.BlockMapChunk{}
	err := proto.Unmarshal(s.chunks[0], c)
	s.chunks = s.chunks[1:]
	return c, err
}

// splitFields cuts the fuzz input into n pieces, each but the last prefixed
// by its length (two bytes, big endian); the last takes the rest.
func splitFields(in []byte, n int) [][]byte {
	out := make([][]byte, n)
	for i := 0; i < n-1 && len(in) >= 2; i++ {
		l := min(int(binary.BigEndian.Uint16(in)), len(in)-2)
		out[i], in = in[2:2+l], in[2+l:]
	}
	out[n-1] = in
	return out
}

func joinFields(fields ...[]byte) []byte {
	var out []byte
	for _, f := range fields[:len(fields)-1] {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	return append(out, fields[len(fields)-1]...)
}

// FuzzSiteReplies feeds the protected site's client what a recovery site answers:
// a latest point, a point list, two block-map chunks, a chunk of changes.
func FuzzSiteReplies(f *testing.F) {
	p := pointToPB(fuzzPoint())
	latest, _ := proto.Marshal(&wirepb.LatestReply{Found: true, Point: p})
	p2 := pointToPB(fuzzPoint())
	p2.Id, p2.Disks = 8, p2.Disks[:1]
	points, _ := proto.Marshal(&wirepb.PointsReply{Points: []*wirepb.Point{p, p2}})
	h := lifeboat.HashBlock([]byte("x"))
	chunk, _ := proto.Marshal(&wirepb.BlockMapChunk{Blocks: []int64{0, 5}, Hashes: append(h[:], make([]byte, 32)...)})
	bad, _ := proto.Marshal(&wirepb.BlockMapChunk{Blocks: []int64{1}, Hashes: h[:31]})
	changed, _ := proto.Marshal(&wirepb.ChangedChunk{Offsets: []int64{0, 1 << 20}, Lengths: []int64{65536, 4096}})
	badChanged, _ := proto.Marshal(&wirepb.ChangedChunk{Offsets: []int64{0, 1 << 20}, Lengths: []int64{65536}})
	f.Add(joinFields(latest, points, chunk, chunk, changed))
	f.Add(joinFields(nil, points[:len(points)/2], bad, nil, badChanged))
	f.Fuzz(func(t *testing.T, in []byte) {
		fs := splitFields(in, 5)
		c := &Client{rc: &fakeReplication{latest: fs[0], points: fs[1], chunks: fs[2:4], changed: fs[4]}, peer: "dr"}
		ctx := context.Background()
		if pt, ok, err := c.Latest(ctx, "vm1"); err == nil && ok {
			for _, d := range pt.Disks {
				if d.Size < 0 {
					t.Fatalf("latest point has disk %q of negative size %d", d.Name, d.Size)
				}
			}
		}
		_, _ = c.Points(ctx, "vm1")
		_, _ = c.BlockMap(ctx, "vm1", "vda")
		_ = c.Changed(ctx, "vm1", "vda", func(off, length int64) error { return nil })
	})
}

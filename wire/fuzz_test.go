package wire

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// The fuzz targets feed arbitrary bytes to what decodes the site protocol: the
// recovery site's side of Replicate (frames -> proto.Unmarshal -> pointFromPB,
// apply, statsFromPB) and the protected site's side of the replies (Latest,
// Points, BlockMap, the commit's reply). Every field of the messages is
// decoded by the generic protobuf path, so fields added to wire.proto are
// fuzzed without a change here. Properties: no panic, and what apply hands the
// store meets the PointWriter contract. The seeds run in every `go test`;
// `make fuzz` explores further.

// fuzzPoint is the point of the seed streams: two disks, one of them short of
// a whole last block.
func fuzzPoint() lifeboat.Point {
	return lifeboat.Point{VM: "vm1", ID: 7, Instant: time.Unix(1700000000, 5).UTC(), Consistency: lifeboat.Filesystem,
		Group: "g", Freeze: 3 * time.Millisecond, Note: "n",
		Disks: []lifeboat.PointDisk{{Name: "vda", Size: 4 << 20, Resync: true}, {Name: "vdb", Size: 1<<20 + 512}}}
}

// captureStream is the client end of Replicate, keeping every frame as the
// bytes gRPC would put on the wire.
type captureStream struct {
	grpc.ClientStream
	frames [][]byte
	reply  *wirepb.ReplicateReply
}

func (s *captureStream) Send(f *wirepb.Frame) error {
	b, err := proto.Marshal(f)
	if err != nil {
		return err
	}
	s.frames = append(s.frames, b)
	return nil
}

func (s *captureStream) CloseAndRecv() (*wirepb.ReplicateReply, error) { return s.reply, nil }

// seedFrames are the frames of one real point, produced by the client's own
// encoder (PointStream): Begin, compressed and raw blocks, a copy, zeroes, Commit.
func seedFrames(t testing.TB, comp *compressor) [][]byte {
	p := fuzzPoint()
	st := &captureStream{reply: &wirepb.ReplicateReply{Point: pointToPB(p)}}
	ps := &PointStream{c: &Client{comp: comp, peer: "dr"}, cancel: func() {}, st: st}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(ps.send(&wirepb.Frame{Body: &wirepb.Frame_Begin{Begin: &wirepb.Begin{Point: pointToPB(p)}}}))
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
	_, err := ps.SendBlocks("vda", 0, text, hashes(text))
	must(err)
	_, err = ps.SendBlocks("vda", 2*lifeboat.BlockSize, random, hashes(random))
	must(err)
	must(ps.SendCopy("vdb", 0, "vda", 0, lifeboat.BlockSize, lifeboat.HashBlock(text[:lifeboat.BlockSize])))
	tail := random[:512]
	_, err = ps.SendBlocks("vdb", 1<<20, tail, hashes(tail))
	must(err)
	must(ps.SendZeroes("vda", 3*lifeboat.BlockSize, 1<<20))
	_, err = ps.Commit(lifeboat.CycleStats{BytesChanged: 3 << 20, BytesZero: 1 << 20, BytesData: 3 * lifeboat.BlockSize, BytesSent: 1000, Duration: time.Second})
	must(err)
	return st.frames
}

// delimit joins frames as the fuzz input carries them: each one prefixed by
// its length (a uvarint, as protodelim writes it).
func delimit(frames [][]byte) []byte {
	var out []byte
	for _, f := range frames {
		out = binary.AppendUvarint(out, uint64(len(f)))
		out = append(out, f...)
	}
	return out
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
		w.t.Fatalf("apply passed %d bytes, over MaxChunk", len(data))
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
		w.t.Fatalf("apply passed a copy of %d bytes", length)
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

// receive is the recovery site's side of one Replicate stream, frame by frame
// as Server.Replicate takes them (Begin first, then apply, then Commit), on
// one goroutine: the first error ends it.
func receive(t *testing.T, in []byte, buf *[]byte) error {
	s := &Server{Site: "dr"}
	r := bufio.NewReader(bytes.NewReader(in))
	next := func() (*wirepb.Frame, error) {
		f := &wirepb.Frame{}
		err := protodelim.UnmarshalOptions{MaxSize: maxMessage}.UnmarshalFrom(r, f)
		return f, err
	}
	f, err := next()
	if err != nil {
		return err
	}
	b := f.GetBegin()
	if b == nil {
		return errors.New("stream must start with Begin")
	}
	p, err := pointFromPB(b.Point)
	if err != nil {
		return err
	}
	w := &fakeWriter{t: t, p: p, written: map[string]map[int64]lifeboat.Hash{}}
	for range 256 {
		f, err := next()
		if err != nil {
			return err
		}
		if c := f.GetCommit(); c != nil {
			pt, err := w.Commit(context.Background(), statsFromPB(c.Stats))
			if err != nil {
				return err
			}
			_ = pointToPB(pt)
			return nil
		}
		if err := s.apply(context.Background(), w, f, buf); err != nil {
			return err
		}
	}
	return errors.New("too many frames")
}

func FuzzReplicate(f *testing.F) {
	for _, comp := range []*compressor{newCompressor(), nil} {
		frames := seedFrames(f, comp)
		f.Add(delimit(frames))
		f.Add(delimit(frames[:1]))                                             // Begin only
		f.Add(delimit(frames[1:]))                                             // no Begin
		f.Add(delimit(append(frames[:1:1], frames[0], frames[len(frames)-1]))) // two Begins
	}
	// One decompression buffer for every input, as a server stream keeps one
	// for all its frames (a fresh MaxChunk buffer each time would be most of
	// the cost of an input).
	var buf []byte
	f.Fuzz(func(t *testing.T, in []byte) {
		_ = receive(t, in, &buf)
	})
}

// TestReplicateSeed checks that the seed stream is a point the server takes
// whole: the fuzzer starts from a valid stream, not from one refused early.
func TestReplicateSeed(t *testing.T) {
	for _, comp := range []*compressor{newCompressor(), nil} {
		var buf []byte
		if err := receive(t, delimit(seedFrames(t, comp)), &buf); err != nil {
			t.Fatalf("compression %v: the seed stream was refused: %v", comp != nil, err)
		}
	}
}

// fakeReplication is the recovery site as the client's stub sees it: each
// reply is whatever bytes the fuzzer gave it, unmarshalled.
type fakeReplication struct {
	latest, points []byte
	chunks         [][]byte
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

func (f *fakeReplication) Replicate(context.Context, ...grpc.CallOption) (grpc.ClientStreamingClient[wirepb.Frame, wirepb.ReplicateReply], error) {
	return nil, errors.New("not fuzzed")
}

func (f *fakeReplication) Failover(context.Context, *wirepb.FailoverRequest, ...grpc.CallOption) (*wirepb.FailoverReply, error) {
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
// a latest point, a point list, two block-map chunks.
func FuzzSiteReplies(f *testing.F) {
	p := pointToPB(fuzzPoint())
	latest, _ := proto.Marshal(&wirepb.LatestReply{Found: true, Point: p})
	p2 := pointToPB(fuzzPoint())
	p2.Id, p2.Disks = 8, p2.Disks[:1]
	points, _ := proto.Marshal(&wirepb.PointsReply{Points: []*wirepb.Point{p, p2}})
	h := lifeboat.HashBlock([]byte("x"))
	chunk, _ := proto.Marshal(&wirepb.BlockMapChunk{Blocks: []int64{0, 5}, Hashes: append(h[:], make([]byte, 32)...)})
	bad, _ := proto.Marshal(&wirepb.BlockMapChunk{Blocks: []int64{1}, Hashes: h[:31]})
	f.Add(joinFields(latest, points, chunk, chunk))
	f.Add(joinFields(nil, points[:len(points)/2], bad, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		fs := splitFields(in, 4)
		c := &Client{rc: &fakeReplication{latest: fs[0], points: fs[1], chunks: fs[2:]}, peer: "dr"}
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
	})
}

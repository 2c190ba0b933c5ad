// Package wire is the site-to-site protocol over mutual TLS: gRPC for the
// calls, and a connection of its own for each restore point (see streamProto),
// every block carried with its content hash.
package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// Version is the protocol's major version; peers of another one are refused.
// Version 2 carries each disk's lineage and base point, and checks ownership;
// version 3 sends points on their own connections rather than through gRPC.
const Version = 3

// Flow-control windows sized for a long fat link: gRPC's 64 KiB default would cap
// a WAN stream at a few MB/s.
const (
	streamWindow = 8 << 20
	connWindow   = 32 << 20
	maxMessage   = MaxChunk + 1<<20
)

// Client is a protected site's connection to one recovery site.
type Client struct {
	conn        *grpc.ClientConn
	rc          wirepb.ReplicationClient
	compression Compression
	comp        *compressor
	peer        string
	addr        string      // the recovery site's address, which point streams dial
	tls         *tls.Config // the calls' mutual TLS, which point streams use too
	v3          bool        // speak point stream version 3 only (tests of an older peer)

	mu      sync.Mutex
	closed  bool
	streams map[*PointStream]struct{} // open point streams, which Close ends
}

// Dial connects to the recovery site named peer and checks that it speaks our
// protocol. The server must present peer's own certificate (pki.RequirePeer):
// another site's, even from the deployment's CA, is refused.
func Dial(ctx context.Context, address string, tlsConf *tls.Config, site, peer string, compression Compression) (*Client, error) {
	if peer == "" {
		return nil, fmt.Errorf("recovery site %s: no peer name to check its certificate against", address)
	}
	tlsConf = pki.RequirePeer(tlsConf, peer)
	recheck := recheckPeer(tlsConf)
	conn, err := grpc.NewClient(address,
		grpc.WithTransportCredentials(batchCreds{credentials.NewTLS(tlsConf)}),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoke grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if err := recheck(); err != nil {
				return fmt.Errorf("recovery site %s at %s: %w", peer, address, err)
			}
			return invoke(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, stream grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			if err := recheck(); err != nil {
				return nil, fmt.Errorf("recovery site %s at %s: %w", peer, address, err)
			}
			return stream(ctx, desc, cc, method, opts...)
		}),
		grpc.WithInitialWindowSize(streamWindow),
		grpc.WithInitialConnWindowSize(connWindow),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
		grpc.WithReadBufferSize(1<<20), grpc.WithWriteBufferSize(1<<20),
	)
	if err != nil {
		return nil, fmt.Errorf("recovery site %s: %w", address, err)
	}
	c := &Client{conn: conn, rc: wirepb.NewReplicationClient(conn), compression: compression, peer: peer, addr: address, tls: tlsConf}
	if compression == CompressionZstd {
		c.comp = newCompressor()
	}
	hello, err := c.rc.Hello(ctx, &wirepb.HelloRequest{Site: site, Version: Version})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("recovery site %s: hello: %w", address, err)
	}
	if hello.Site != peer {
		conn.Close()
		return nil, fmt.Errorf("recovery site %s calls itself %q, but this site dialled %q (its certificate says %q): fix `site:` in its config", address, hello.Site, peer, peer)
	}
	if hello.Version != Version {
		conn.Close()
		return nil, fmt.Errorf("recovery site %s (%s) speaks protocol v%d, this lifeboat v%d: upgrade the older one", address, hello.Site, hello.Version, Version)
	}
	c.peer = hello.Site
	return c, nil
}

// recheckPeer makes c remember the state of each handshake it verifies, and
// returns a check that verifies the latest again: a call on a connection
// made before the server's certificate was revoked (a revocation list is
// read again when it changes) is refused, as a new connection would be.
func recheckPeer(c *tls.Config) func() error {
	verify := c.VerifyConnection
	if verify == nil {
		return func() error { return nil }
	}
	var last atomic.Pointer[tls.ConnectionState]
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verify(cs); err != nil {
			return err
		}
		last.Store(&cs)
		return nil
	}
	return func() error {
		if cs := last.Load(); cs != nil {
			return verify(*cs)
		}
		return nil
	}
}

// Ready waits, within ctx, until the connection to the recovery site is up. A
// site that was down is retried at once rather than after gRPC's backoff, so
// the first cycle after it comes back succeeds.
func (c *Client) Ready(ctx context.Context) error {
	c.conn.ResetConnectBackoff()
	c.conn.Connect()
	for {
		st := c.conn.GetState()
		if st == connectivity.Ready {
			return nil
		}
		if st == connectivity.TransientFailure {
			c.conn.ResetConnectBackoff()
		}
		if !c.conn.WaitForStateChange(ctx, st) {
			return fmt.Errorf("recovery site %s is unreachable (connection %s): %w; is `lifeboat serve` running there, and its `listen:` reachable?", c.peer, st, ctx.Err())
		}
	}
}

// Peer is the recovery site's name, as it said in Hello.
func (c *Client) Peer() string { return c.peer }

// Close ends the connection and every point stream still open.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	streams := c.streams
	c.streams = nil
	c.mu.Unlock()
	for s := range streams {
		s.fail(fmt.Errorf("point stream to %s: the client was closed", c.peer))
	}
	return c.conn.Close()
}

// track registers an open stream for Close; false: the client is closed.
func (c *Client) track(s *PointStream) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	if c.streams == nil {
		c.streams = map[*PointStream]struct{}{}
	}
	c.streams[s] = struct{}{}
	return true
}

func (c *Client) untrack(s *PointStream) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.streams, s)
}

// Latest is the newest committed point of vm at the recovery site.
func (c *Client) Latest(ctx context.Context, vm string) (lifeboat.Point, bool, error) {
	r, err := c.rc.Latest(ctx, &wirepb.VMRequest{Vm: vm})
	if err != nil {
		return lifeboat.Point{}, false, fmt.Errorf("latest point at %s: %w", c.peer, err)
	}
	if !r.Found {
		return lifeboat.Point{}, false, nil
	}
	p, err := pointFromPB(r.Point)
	return p, err == nil, err
}

// Points lists vm's committed points at the recovery site, oldest first.
func (c *Client) Points(ctx context.Context, vm string) ([]lifeboat.Point, error) {
	r, err := c.rc.Points(ctx, &wirepb.VMRequest{Vm: vm})
	if err != nil {
		return nil, fmt.Errorf("vm %q: points at %s: %w", vm, c.peer, err)
	}
	out := make([]lifeboat.Point, 0, len(r.Points))
	for _, pp := range r.Points {
		p, err := pointFromPB(pp)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// BlockMap is a disk's block hashes at the latest point.
func (c *Client) BlockMap(ctx context.Context, vm, disk string) (map[int64]lifeboat.Hash, error) {
	st, err := c.rc.BlockMap(ctx, &wirepb.BlockMapRequest{Vm: vm, Disk: disk})
	if err != nil {
		return nil, fmt.Errorf("vm %q disk %q: block map: %w", vm, disk, err)
	}
	m := make(map[int64]lifeboat.Hash)
	for {
		ch, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return m, nil
		}
		if err != nil {
			return nil, fmt.Errorf("vm %q disk %q: block map: %w", vm, disk, err)
		}
		hs, err := hashesFromBytes(ch.Hashes)
		if err != nil || len(hs) != len(ch.Blocks) {
			return nil, fmt.Errorf("vm %q disk %q: block map: malformed chunk (%d blocks, %d hash bytes)", vm, disk, len(ch.Blocks), len(ch.Hashes))
		}
		for i, b := range ch.Blocks {
			m[b] = hs[i]
		}
	}
}

// PrepareFailback asks the production site to take a failback of vm from
// this site (see Server.PrepareFailback); it returns the point the
// production disks hold.
func (c *Client) PrepareFailback(ctx context.Context, vm string, holds lifeboat.Point, own map[string]Shared) (lifeboat.Point, error) {
	req := &wirepb.PrepareFailbackRequest{Vm: vm, Holds: pointToPB(holds)}
	for _, disk := range slices.Sorted(maps.Keys(own)) {
		o := own[disk]
		req.Own = append(req.Own, &wirepb.OwnGeneration{Disk: disk, Peer: o.Peer, Lineage: o.Lineage, Point: o.Point, Generation: o.Generation})
	}
	r, err := c.rc.PrepareFailback(ctx, req)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: prepare the failback at %s: %w", vm, c.peer, err)
	}
	return pointFromPB(r.Holds)
}

// FinishFailback ends vm's failback at the production site (see
// Server.FinishFailback): its disks hold failback point held, this site
// folded that state into its chain as fold. It returns, by disk, the
// generations production started at fold.
func (c *Client) FinishFailback(ctx context.Context, vm string, held uint64, fold lifeboat.Point) (map[string]string, error) {
	r, err := c.rc.FinishFailback(ctx, &wirepb.FinishFailbackRequest{Vm: vm, Held: held, Fold: pointToPB(fold)})
	if err != nil {
		return nil, fmt.Errorf("vm %q: finish the failback at %s: %w", vm, c.peer, err)
	}
	gens := map[string]string{}
	for _, g := range r.Generations {
		gens[g.Disk] = g.Generation
	}
	for _, d := range fold.Disks {
		if gens[d.Name] == "" {
			return nil, fmt.Errorf("vm %q: %s started no generation on disk %q", vm, c.peer, d.Name)
		}
	}
	return gens, nil
}

// Changed calls fn for each byte range the site's copy of a disk changed on
// its own since its latest point (see ChangeLister). A site that cannot tell
// returns an error wrapping lifeboat.ErrNoChangeRecord.
func (c *Client) Changed(ctx context.Context, vm, disk string, fn func(off, length int64) error) error {
	st, err := c.rc.Changed(ctx, &wirepb.ChangedRequest{Vm: vm, Disk: disk})
	if err != nil {
		return fmt.Errorf("vm %q disk %q: changes at %s: %w", vm, disk, c.peer, err)
	}
	for {
		ch, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if status.Code(err) == codes.FailedPrecondition {
			return fmt.Errorf("vm %q disk %q at %s: %w: %s", vm, disk, c.peer, lifeboat.ErrNoChangeRecord, status.Convert(err).Message())
		}
		if err != nil {
			return fmt.Errorf("vm %q disk %q: changes at %s: %w", vm, disk, c.peer, err)
		}
		if len(ch.Offsets) != len(ch.Lengths) {
			return fmt.Errorf("vm %q disk %q: changes at %s: malformed chunk (%d offsets, %d lengths)", vm, disk, c.peer, len(ch.Offsets), len(ch.Lengths))
		}
		for i, off := range ch.Offsets {
			if err := fn(off, ch.Lengths[i]); err != nil {
				return err
			}
		}
	}
}

// Failover asks the recovery site to start vm from point and take it over:
// a planned migration's last step, once the caller has shut the VM down and
// sent that point.
func (c *Client) Failover(ctx context.Context, vm string, point uint64) (FailoverResult, error) {
	r, err := c.rc.Failover(ctx, &wirepb.FailoverRequest{Vm: vm, Point: point})
	if err != nil {
		return FailoverResult{}, fmt.Errorf("vm %q: failover at %s from point %d: %w", vm, c.peer, point, err)
	}
	return FailoverResult{Run: r.Run, Point: r.Point, ToRunning: time.Duration(r.ToRunningNs), Epoch: r.Epoch}, nil
}

// Reverse asks the production site, whose disks took a failback point from
// this site, to keep vm's restore points from now on, those disks the first
// (see Server.Reverse); it returns that point.
func (c *Client) Reverse(ctx context.Context, vm string) (lifeboat.Point, error) {
	r, err := c.rc.Reverse(ctx, &wirepb.ReverseRequest{Vm: vm})
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: protection in reverse at %s: %w", vm, c.peer, err)
	}
	return pointFromPB(r.Point)
}

// PointStream carries one point to the recovery site on a connection of its
// own (see streamProto): the lifeboat.PointSink of a cycle that replicates to
// a chain of points there. A point sends each block once at most (as data, a
// patch, zeros or a copy): the recovery site applies the frames of a point
// concurrently and in no particular order, so two frames for one block race.
type PointStream struct {
	c    *Client
	conn *flushConn
	stop func() bool // ends the watch of Begin's context

	mu sync.Mutex // one frame at a time; held while writing

	patches bool // the server speaks version 4: a block's changed parts may be sent alone

	// The server's one answer, taken by read: the committed point, or why not.
	done   chan struct{}
	reply  *wirepb.ReplicateReply
	answer error

	failMu sync.Mutex
	failed error // the stream is over: every later call says why
}

// Begin opens point p (its instant, consistency and every disk) at the
// recovery site: it dials the site's address for the point's own connection.
func (c *Client) Begin(ctx context.Context, p lifeboat.Point) (lifeboat.PointSink, error) {
	conn, proto, err := c.dialStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("vm %q point %d: open a point stream to %s: %w", p.VM, p.ID, c.peer, err)
	}
	s := &PointStream{c: c, conn: conn, done: make(chan struct{}), patches: proto == streamProto}
	if !c.track(s) {
		conn.Close()
		return nil, fmt.Errorf("vm %q point %d: the client of %s was closed", p.VM, p.ID, c.peer)
	}
	s.stop = context.AfterFunc(ctx, func() { s.fail(fmt.Errorf("point stream to %s: %w", c.peer, context.Cause(ctx))) })
	go s.read()
	if err := s.writeMessage(&wirepb.Frame{Body: &wirepb.Frame_Begin{Begin: &wirepb.Begin{Point: pointToPB(p)}}}); err != nil {
		s.Abort()
		return nil, err
	}
	return s, nil
}

// dialStream makes a point stream's connection: TCP, then the same mutual TLS
// as the gRPC calls, asking for streamProto or streamProtoV3; it returns the
// version the server chose.
func (c *Client) dialStream(ctx context.Context) (*flushConn, string, error) {
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return nil, "", err
	}
	bc := newBatchConn(raw)
	conf := c.tls.Clone()
	conf.NextProtos = c.streamProtos()
	tc := tls.Client(bc, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, "", err
	}
	got := tc.ConnectionState().NegotiatedProtocol
	if got != streamProto && got != streamProtoV3 {
		raw.Close()
		return nil, "", fmt.Errorf("the recovery site does not speak %s (it chose %q): upgrade it", streamProto, got)
	}
	return &flushConn{Conn: tc, raw: bc}, got, nil
}

// streamProtos are the point stream versions the client asks for, the
// newest first.
func (c *Client) streamProtos() []string {
	if c.v3 {
		return []string{streamProtoV3}
	}
	return []string{streamProto, streamProtoV3}
}

// read takes the server's one answer, which may come before Commit (the
// point was refused or failed); then the stream is over.
func (s *PointStream) read() {
	defer close(s.done)
	typ, payload, err := newFrameReader(s.conn).next()
	switch {
	case err != nil:
		s.answer = fmt.Errorf("recovery site %s: the point stream broke: %w", s.c.peer, err)
	case typ == frameError:
		s.answer = fmt.Errorf("recovery site %s: %w", s.c.peer, statusFromFrame(payload))
	case typ == frameReply:
		r := &wirepb.ReplicateReply{}
		if err := proto.Unmarshal(payload, r); err != nil {
			s.answer = fmt.Errorf("recovery site %s: malformed reply: %w", s.c.peer, err)
		} else {
			s.reply = r
		}
	default:
		s.answer = fmt.Errorf("recovery site %s: unexpected frame %q", s.c.peer, typ)
	}
	putPayload(payload)
	if s.answer != nil {
		s.fail(s.answer)
	}
}

// fail ends the stream with err, unless it ended already; the connection is
// closed, which also ends a write blocked on it.
func (s *PointStream) fail(err error) {
	s.failMu.Lock()
	if s.failed == nil {
		s.failed = err
	}
	s.failMu.Unlock()
	s.conn.Close()
}

func (s *PointStream) err() error {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	return s.failed
}

// answerWait bounds how long a failed write waits for the server's reason.
const answerWait = 5 * time.Second

// streamStall bounds one frame's write: a recovery site that takes in nothing
// for this long (stopped, its store's disk hung, a connection gone half-open)
// fails the point, so that the cycle ends, its fleece leaves the guest's write
// path and the next cycle tries again; before, the cycle waited for its own
// bound (up to 6 hours). A healthy site's reads stall only while its in-flight
// budget is full: seconds.
var streamStall = 2 * time.Minute

// write sends one frame's parts. When the write fails, the error is the
// server's reason if it gave one (it may have refused the point).
func (s *PointStream) write(parts ...[]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.err(); err != nil {
		return err
	}
	s.conn.SetWriteDeadline(time.Now().Add(streamStall))
	if err := s.conn.writeParts(parts...); err != nil {
		select {
		case <-s.done:
		case <-time.After(answerWait):
		}
		if ferr := s.err(); ferr != nil {
			return ferr
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("it took in nothing for %v (is it stopped, or its store's disk hung?): %w", streamStall, err)
		}
		err = fmt.Errorf("send to recovery site %s: %w", s.c.peer, err)
		s.fail(err)
		return err
	}
	return nil
}

// SendBlocks sends consecutive blocks of a disk starting at off, one hash per
// block. It compresses where it pays and returns the bytes put on the wire.
// Safe for concurrent use: compression runs in the caller's goroutine.
func (s *PointStream) SendBlocks(disk string, off int64, data []byte, hashes []lifeboat.Hash) (int64, error) {
	if len(data) > MaxChunk {
		return 0, fmt.Errorf("chunk of %d bytes exceeds the %d-byte limit", len(data), MaxChunk)
	}
	b := &wirepb.Blocks{Disk: disk, Offset: off, Hashes: hashesToBytes(hashes), Length: uint32(len(data))}
	payload := data
	if s.c.comp != nil {
		buf := bufpool.Shared.Get(len(data) + 1<<10) // what zstd makes of data when it pays
		defer bufpool.Shared.Put(buf)
		payload, b.Zstd = s.c.comp.compress(*buf, data)
	}
	head, err := dataHead(frameBlocks, b, len(payload))
	if err != nil {
		return 0, err
	}
	if err := s.write(head, payload); err != nil {
		return 0, err
	}
	return int64(len(payload) + len(b.Hashes)), nil
}

// SendPatch sends the changed parts of one block: the sub-blocks of dirty,
// with their hash and the whole block's, compressed where it pays. To a
// server of protocol version 3 it sends the whole block.
func (s *PointStream) SendPatch(disk string, off int64, block []byte, h lifeboat.Hash, dirty lifeboat.Dirty) (int64, error) {
	if !s.patches || dirty == 0 || len(block) > lifeboat.BlockSize {
		return s.SendBlocks(disk, off, block, []lifeboat.Hash{h})
	}
	pb := bufpool.Shared.Get(len(block))
	defer bufpool.Shared.Put(pb)
	parts := dirty.Gather((*pb)[:0], block)
	sum := lifeboat.HashBlock(parts)
	p := &wirepb.Patch{Disk: disk, Offset: off, Dirty: uint32(dirty), Sum: sum[:], Hash: h[:], Length: uint32(len(parts))}
	payload := parts
	if s.c.comp != nil {
		buf := bufpool.Shared.Get(len(parts) + 1<<10)
		defer bufpool.Shared.Put(buf)
		payload, p.Zstd = s.c.comp.compress(*buf, parts)
	}
	head, err := dataHead(framePatch, p, len(payload))
	if err != nil {
		return 0, err
	}
	if err := s.write(head, payload); err != nil {
		return 0, err
	}
	return int64(len(payload) + 2*len(h)), nil
}

// SendCopy says that the block at (disk, off) holds the same bytes as the block
// already sent in this point at (srcDisk, srcOff): deduplication.
func (s *PointStream) SendCopy(disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	return s.writeMessage(&wirepb.Frame{Body: &wirepb.Frame_Copy{Copy: &wirepb.Copy{
		Disk: disk, Offset: off, SrcDisk: srcDisk, SrcOffset: srcOff, Hash: h[:], Length: uint32(length)}}})
}

// SendZeroes says that [off, off+length) of a disk reads as zeros.
func (s *PointStream) SendZeroes(disk string, off, length int64) error {
	return s.writeMessage(&wirepb.Frame{Body: &wirepb.Frame_Zeroes{Zeroes: &wirepb.Zeroes{Disk: disk, Offset: off, Length: length}}})
}

func (s *PointStream) writeMessage(m *wirepb.Frame) error {
	f, err := marshalFrame(frameMessage, m)
	if err != nil {
		return err
	}
	return s.write(f)
}

// Commit asks the recovery site to flush and commit the point, and waits for it.
// Only a nil error means the point is durable there.
func (s *PointStream) Commit(stats lifeboat.CycleStats) (lifeboat.Point, error) {
	defer s.Abort()
	if err := s.writeMessage(&wirepb.Frame{Body: &wirepb.Frame_Commit{Commit: &wirepb.Commit{Stats: statsToPB(stats)}}}); err != nil {
		return lifeboat.Point{}, err
	}
	<-s.done
	if s.reply == nil {
		return lifeboat.Point{}, fmt.Errorf("commit: %w", s.err())
	}
	return pointFromPB(s.reply.Point)
}

// Abort gives the point up; the recovery site discards what it received. After
// Commit it only releases the connection.
func (s *PointStream) Abort() {
	s.stop()
	s.c.untrack(s)
	s.fail(fmt.Errorf("point stream to %s: %w", s.c.peer, errAborted))
}

// errAborted ends a stream given up by Abort.
var errAborted = errors.New("the point was aborted")

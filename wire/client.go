// Package wire is the site-to-site protocol: gRPC over mutual TLS, one stream per
// restore point, every block carried with its content hash.
package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// Version is the protocol's major version; peers of another one are refused.
// Version 2 carries each disk's lineage and base point, and checks ownership.
const Version = 2

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
}

// Dial connects to the recovery site named peer and checks that it speaks our
// protocol. The server must present peer's own certificate (pki.RequirePeer):
// another site's, even from the deployment's CA, is refused.
func Dial(ctx context.Context, address string, tlsConf *tls.Config, site, peer string, compression Compression) (*Client, error) {
	if peer == "" {
		return nil, fmt.Errorf("recovery site %s: no peer name to check its certificate against", address)
	}
	tlsConf = pki.RequirePeer(tlsConf, peer)
	conn, err := grpc.NewClient(address,
		grpc.WithTransportCredentials(batchCreds{credentials.NewTLS(tlsConf)}),
		grpc.WithInitialWindowSize(streamWindow),
		grpc.WithInitialConnWindowSize(connWindow),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
		grpc.WithReadBufferSize(1<<20), grpc.WithWriteBufferSize(1<<20),
	)
	if err != nil {
		return nil, fmt.Errorf("recovery site %s: %w", address, err)
	}
	c := &Client{conn: conn, rc: wirepb.NewReplicationClient(conn), compression: compression, peer: peer}
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

// Close ends the connection.
func (c *Client) Close() error { return c.conn.Close() }

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

// PointStream carries one point to the recovery site: the lifeboat.PointSink
// of a cycle that replicates to a chain of points there.
type PointStream struct {
	c      *Client
	cancel context.CancelFunc
	mu     sync.Mutex // gRPC streams allow one sender at a time
	st     grpc.ClientStreamingClient[wirepb.Frame, wirepb.ReplicateReply]
	failed error
}

// Begin opens point p (its instant, consistency and every disk) at the recovery site.
func (c *Client) Begin(ctx context.Context, p lifeboat.Point) (lifeboat.PointSink, error) {
	ctx, cancel := context.WithCancel(ctx)
	st, err := c.rc.Replicate(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("open stream to %s: %w", c.peer, err)
	}
	s := &PointStream{c: c, cancel: cancel, st: st}
	if err := s.send(&wirepb.Frame{Body: &wirepb.Frame_Begin{Begin: &wirepb.Begin{Point: pointToPB(p)}}}); err != nil {
		cancel()
		return nil, err
	}
	return s, nil
}

func (s *PointStream) send(f *wirepb.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed != nil {
		return s.failed
	}
	if err := s.st.Send(f); err != nil {
		if errors.Is(err, io.EOF) {
			// The server ended the stream; its reason comes with the reply.
			_, err = s.st.CloseAndRecv()
		}
		s.failed = fmt.Errorf("send to recovery site %s: %w", s.c.peer, err)
		return s.failed
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
	b := &wirepb.Blocks{Disk: disk, Offset: off, Hashes: hashesToBytes(hashes), Length: uint32(len(data)), Data: data}
	var buf []byte
	if s.c.comp != nil {
		buf = getBuf()
		defer putBuf(buf)
		b.Data, b.Zstd = s.c.comp.compress(buf, data)
	}
	if err := s.send(&wirepb.Frame{Body: &wirepb.Frame_Blocks{Blocks: b}}); err != nil {
		return 0, err
	}
	return int64(len(b.Data) + len(b.Hashes)), nil
}

// SendCopy says that the block at (disk, off) holds the same bytes as the block
// already sent in this point at (srcDisk, srcOff): deduplication.
func (s *PointStream) SendCopy(disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	return s.send(&wirepb.Frame{Body: &wirepb.Frame_Copy{Copy: &wirepb.Copy{
		Disk: disk, Offset: off, SrcDisk: srcDisk, SrcOffset: srcOff, Hash: h[:], Length: uint32(length)}}})
}

// SendZeroes says that [off, off+length) of a disk reads as zeros.
func (s *PointStream) SendZeroes(disk string, off, length int64) error {
	return s.send(&wirepb.Frame{Body: &wirepb.Frame_Zeroes{Zeroes: &wirepb.Zeroes{Disk: disk, Offset: off, Length: length}}})
}

// Commit asks the recovery site to flush and commit the point, and waits for it.
// Only a nil error means the point is durable there.
func (s *PointStream) Commit(stats lifeboat.CycleStats) (lifeboat.Point, error) {
	defer s.cancel()
	if err := s.send(&wirepb.Frame{Body: &wirepb.Frame_Commit{Commit: &wirepb.Commit{Stats: statsToPB(stats)}}}); err != nil {
		return lifeboat.Point{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := s.st.CloseAndRecv()
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("commit at recovery site %s: %w", s.c.peer, err)
	}
	return pointFromPB(r.Point)
}

// Abort gives the point up; the recovery site discards what it received.
func (s *PointStream) Abort() { s.cancel() }

var bufPool = sync.Pool{New: func() any { return make([]byte, 0, MaxChunk+1<<10) }}

func getBuf() []byte  { return bufPool.Get().([]byte)[:0] }
func putBuf(b []byte) { bufPool.Put(b[:0]) } //nolint:staticcheck // slices are fine here

package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

// Store is the recovery site's store of points, as the receiver needs it.
type Store interface {
	// Authorize says whether site may replicate vm and read its points; an
	// error wrapping recovery.ErrNotOwner names the owner.
	Authorize(vm, site string) error
	Latest(vm string) (lifeboat.Point, bool, error)
	Points(vm string) ([]lifeboat.Point, error)
	// EachBlock calls fn for every data block of the disk's block map at
	// point id (0 = latest); blocks not reported read as zeros there.
	EachBlock(vm, disk string, id uint64, fn func(b int64, h lifeboat.Hash) error) error
	// BeginPoint opens point p for writing; it is listed only after Commit.
	BeginPoint(ctx context.Context, p lifeboat.Point) (PointWriter, error)
}

// PointWriter writes one point. WriteBlocks checks every block against its hash
// before writing any of it, and is safe for concurrent use.
type PointWriter interface {
	WriteBlocks(ctx context.Context, disk string, off int64, data []byte, hashes []lifeboat.Hash) error
	WriteZeroes(ctx context.Context, disk string, off, length int64) error
	// CopyBlock writes at (disk, off) the block this point wrote at (srcDisk,
	// srcOff), checked against h; an error wrapping ErrSourcePending means the
	// source's write has not finished yet.
	CopyBlock(ctx context.Context, disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error
	Commit(ctx context.Context, stats lifeboat.CycleStats) (lifeboat.Point, error)
	Abort(ctx context.Context) error
}

// copySourceWait bounds how long a Copy waits for its source block's write.
var copySourceWait = 10 * time.Second

// Server is a recovery site's face to protected sites.
type Server struct {
	wirepb.UnimplementedReplicationServer
	Site  string
	Store Store
	Log   *slog.Logger
	// Writers is how many blocks messages are decompressed and written at once per point.
	Writers int
	// StartVM starts a VM here from one of its points and takes it over,
	// for its owner's planned migration; nil: this site refuses to.
	StartVM func(ctx context.Context, vm string, point uint64) (FailoverResult, error)

	grpc *grpc.Server

	contacts sync.Map // vm -> contact: the last call about it from its owner
}

type contact struct {
	site string
	at   time.Time
}

// LastContact says when the VM's owner last called about it (a cycle's
// Latest, a point's stream): a production site in contact a moment ago is
// probably running the VM.
func (s *Server) LastContact(vm string) (site string, at time.Time, ok bool) {
	v, ok := s.contacts.Load(vm)
	if !ok {
		return "", time.Time{}, false
	}
	c := v.(contact)
	return c.site, c.at, true
}

// FailoverResult is what a recovery site says of a VM it started for a
// planned migration.
type FailoverResult struct {
	Run       string
	Point     uint64
	ToRunning time.Duration
	Epoch     uint64
}

// Serve accepts protected sites on l with mutual TLS until Stop.
func (s *Server) Serve(l net.Listener, tlsConf *tls.Config) error {
	if s.Log == nil {
		s.Log = slog.Default()
	}
	if s.Writers <= 0 {
		s.Writers = 4
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(batchCreds{credentials.NewTLS(tlsConf)}),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
		grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage),
		grpc.ReadBufferSize(1<<20), grpc.WriteBufferSize(1<<20),
		grpc.ForceServerCodecV2(newFrameCodec()),
	)
	wirepb.RegisterReplicationServer(s.grpc, s)
	return s.grpc.Serve(l)
}

// Stop ends every stream at once; points in flight are discarded.
func (s *Server) Stop() {
	if s.grpc != nil {
		s.grpc.Stop()
	}
}

// peerSite is the site named by the peer's verified certificate.
func peerSite(ctx context.Context) (string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", fmt.Errorf("no peer in the request")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", fmt.Errorf("peer %s did not use TLS", p.Addr)
	}
	return pki.PeerSite(ti.State)
}

func peerName(ctx context.Context) string {
	site, err := peerSite(ctx)
	if err != nil {
		return "unknown peer"
	}
	if p, ok := peer.FromContext(ctx); ok {
		return site + "@" + p.Addr.String()
	}
	return site
}

func (s *Server) Hello(ctx context.Context, r *wirepb.HelloRequest) (*wirepb.HelloReply, error) {
	site, err := peerSite(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	if site != r.Site {
		return nil, status.Errorf(codes.PermissionDenied, "the peer calls itself site %q but its certificate names site %q: fix `site:` in its config or issue it the right certificate", r.Site, site)
	}
	s.Log.Info("protected site connected", "peer", peerName(ctx), "version", r.Version)
	return &wirepb.HelloReply{Site: s.Site, Version: Version}, nil
}

// authorize checks that the peer's certificate names a site that owns vm.
// Every call about a VM goes through it: the certificate, not the message, says
// who is asking.
func (s *Server) authorize(ctx context.Context, vm string) (string, error) {
	site, err := peerSite(ctx)
	if err != nil {
		return "", status.Error(codes.Unauthenticated, err.Error())
	}
	if err := s.Store.Authorize(vm, site); err != nil {
		if errors.Is(err, recovery.ErrNotOwner) {
			s.Log.Warn("refused a site that does not own the vm", "vm", vm, "peer", peerName(ctx), "err", err)
			return "", status.Error(codes.PermissionDenied, err.Error())
		}
		return "", status.Error(codes.Internal, err.Error())
	}
	s.contacts.Store(vm, contact{site: site, at: time.Now()})
	return site, nil
}

// Failover is a planned migration's last step, asked by the VM's owner.
func (s *Server) Failover(ctx context.Context, r *wirepb.FailoverRequest) (*wirepb.FailoverReply, error) {
	site, err := s.authorize(ctx, r.Vm)
	if err != nil {
		return nil, err
	}
	if s.StartVM == nil {
		return nil, status.Errorf(codes.Unimplemented, "recovery site %q does not start VMs", s.Site)
	}
	if r.Point == 0 {
		return nil, status.Error(codes.InvalidArgument, "a planned failover names the point it migrates with")
	}
	s.Log.Warn("planned failover asked by the vm's owner", "vm", r.Vm, "point", r.Point, "peer", peerName(ctx), "owner", site)
	res, err := s.StartVM(context.WithoutCancel(ctx), r.Vm, r.Point)
	if err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	return &wirepb.FailoverReply{Run: res.Run, Point: res.Point, ToRunningNs: int64(res.ToRunning), Epoch: res.Epoch}, nil
}

func (s *Server) Latest(ctx context.Context, r *wirepb.VMRequest) (*wirepb.LatestReply, error) {
	if _, err := s.authorize(ctx, r.Vm); err != nil {
		return nil, err
	}
	p, ok, err := s.Store.Latest(r.Vm)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if !ok {
		return &wirepb.LatestReply{}, nil
	}
	return &wirepb.LatestReply{Found: true, Point: pointToPB(p)}, nil
}

func (s *Server) Points(ctx context.Context, r *wirepb.VMRequest) (*wirepb.PointsReply, error) {
	if _, err := s.authorize(ctx, r.Vm); err != nil {
		return nil, err
	}
	ps, err := s.Store.Points(r.Vm)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	out := &wirepb.PointsReply{}
	for _, p := range ps {
		out.Points = append(out.Points, pointToPB(p))
	}
	return out, nil
}

// BlockMap streams the data blocks of a disk's block map at the latest point
// as the store reads them from its catalog, a chunk at a time: neither side of
// the call holds the disk's map here. Zeroed and never-written blocks are not
// sent (the client takes a block it was not sent to read as zeros).
func (s *Server) BlockMap(r *wirepb.BlockMapRequest, st grpc.ServerStreamingServer[wirepb.BlockMapChunk]) error {
	if _, err := s.authorize(st.Context(), r.Vm); err != nil {
		return err
	}
	const per = 4096
	ch := &wirepb.BlockMapChunk{}
	var sendErr error
	err := s.Store.EachBlock(r.Vm, r.Disk, 0, func(b int64, h lifeboat.Hash) error {
		ch.Blocks = append(ch.Blocks, b)
		ch.Hashes = append(ch.Hashes, h[:]...)
		if len(ch.Blocks) < per {
			return nil
		}
		if sendErr = st.Send(ch); sendErr != nil {
			return sendErr
		}
		ch = &wirepb.BlockMapChunk{}
		return nil
	})
	if sendErr != nil {
		return sendErr
	}
	if err != nil {
		return status.Error(codes.NotFound, err.Error())
	}
	if len(ch.Blocks) > 0 {
		return st.Send(ch)
	}
	return nil
}

// Replicate receives one point. Blocks are decompressed and written by a few
// workers; the first error ends the stream and discards the point.
func (s *Server) Replicate(st grpc.ClientStreamingServer[wirepb.Frame, wirepb.ReplicateReply]) error {
	ctx, cancel := context.WithCancel(st.Context())
	defer cancel()
	f, err := st.Recv()
	if err != nil {
		return err
	}
	b := f.GetBegin()
	if b == nil {
		return status.Error(codes.InvalidArgument, "stream must start with Begin")
	}
	p, err := pointFromPB(b.Point)
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if p.Site, err = s.authorize(ctx, p.VM); err != nil {
		return err
	}
	log := s.Log.With("vm", p.VM, "point", p.ID, "peer", peerName(ctx))
	w, err := s.Store.BeginPoint(ctx, p)
	if err != nil {
		log.Error("cannot begin point", "err", err)
		if errors.Is(err, recovery.ErrNotOwner) {
			return status.Error(codes.PermissionDenied, err.Error())
		}
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	committed := false
	defer func() {
		if !committed {
			if err := w.Abort(context.WithoutCancel(ctx)); err != nil {
				log.Error("discarding interrupted point", "err", err)
			} else {
				log.Warn("point discarded: stream ended before commit")
			}
		}
	}()

	var (
		work    = make(chan *recvFrame, s.Writers*2)
		wg      sync.WaitGroup
		errOnce sync.Once
		first   error
	)
	fail := func(err error) {
		errOnce.Do(func() { first = err; cancel() })
	}
	for range s.Writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for f := range work {
				if ctx.Err() == nil {
					if err := s.apply(ctx, w, &f.f, &buf); err != nil {
						fail(err)
					}
				}
				f.release() // the frame's bytes may be gRPC's buffer
			}
		}()
	}
	finish := func() error {
		close(work)
		wg.Wait()
		return first
	}

	for {
		f := new(recvFrame)
		err := st.RecvMsg(f) // frameCodec: a Blocks frame's data stays in gRPC's buffer
		if err != nil {
			werr := finish()
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("stream ended without Commit")
			}
			if werr != nil {
				err = werr
			}
			log.Warn("point not received whole", "err", err)
			return status.Error(codes.Aborted, err.Error())
		}
		if c := f.f.GetCommit(); c != nil {
			if err := finish(); err != nil {
				log.Error("point rejected", "err", err)
				return status.Error(codes.DataLoss, err.Error())
			}
			pt, err := w.Commit(ctx, statsFromPB(c.Stats))
			if err != nil {
				log.Error("commit failed", "err", err)
				return status.Error(codes.Internal, err.Error())
			}
			committed = true
			log.Info("point committed", "disks", len(pt.Disks), "bytes_sent", pt.Stats.BytesSent)
			return st.SendAndClose(&wirepb.ReplicateReply{Point: pointToPB(pt)})
		}
		select {
		case work <- f:
		case <-ctx.Done():
			f.release()
			werr := finish()
			if werr == nil {
				werr = ctx.Err()
			}
			log.Error("point rejected", "err", werr)
			return status.Error(codes.DataLoss, werr.Error())
		}
	}
}

func (s *Server) apply(ctx context.Context, w PointWriter, f *wirepb.Frame, buf *[]byte) error {
	switch body := f.Body.(type) {
	case *wirepb.Frame_Blocks:
		b := body.Blocks
		if b.Length > MaxChunk {
			return fmt.Errorf("disk %q offset %d: chunk of %d bytes exceeds the %d-byte limit", b.Disk, b.Offset, b.Length, MaxChunk)
		}
		hs, err := hashesFromBytes(b.Hashes)
		if err != nil {
			return fmt.Errorf("disk %q offset %d: %w", b.Disk, b.Offset, err)
		}
		data := b.Data
		if b.Zstd {
			if cap(*buf) < int(b.Length) {
				*buf = make([]byte, 0, MaxChunk)
			}
			data, err = decompress(*buf, b.Data, int(b.Length))
			if err != nil {
				return fmt.Errorf("disk %q offset %d: %w", b.Disk, b.Offset, err)
			}
		} else if len(data) != int(b.Length) {
			return fmt.Errorf("disk %q offset %d: %d data bytes, header said %d", b.Disk, b.Offset, len(data), b.Length)
		}
		return w.WriteBlocks(ctx, b.Disk, b.Offset, data, hs)
	case *wirepb.Frame_Zeroes:
		z := body.Zeroes
		return w.WriteZeroes(ctx, z.Disk, z.Offset, z.Length)
	case *wirepb.Frame_Copy:
		c := body.Copy
		hs, err := hashesFromBytes(c.Hash)
		if err != nil || len(hs) != 1 || c.Length == 0 || c.Length > lifeboat.BlockSize {
			return fmt.Errorf("disk %q offset %d: malformed copy of one block", c.Disk, c.Offset)
		}
		// The source block came earlier in the stream and another worker may
		// still be writing it: wait for it, within a bound (a source that was
		// never sent is the sender's error, not a reason to hang).
		deadline := time.Now().Add(copySourceWait)
		for wait := time.Millisecond; ; wait = min(wait*2, 50*time.Millisecond) {
			err := w.CopyBlock(ctx, c.Disk, c.Offset, c.SrcDisk, c.SrcOffset, int(c.Length), hs[0])
			if !errors.Is(err, recovery.ErrSourcePending) {
				return err
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("disk %q offset %d: copy of %q offset %d, which this point never wrote", c.Disk, c.Offset, c.SrcDisk, c.SrcOffset)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("disk %q offset %d: copy source %q offset %d not written: %w", c.Disk, c.Offset, c.SrcDisk, c.SrcOffset, ctx.Err())
			case <-time.After(wait):
			}
		}
	case *wirepb.Frame_Begin:
		return fmt.Errorf("second Begin in one stream")
	}
	return fmt.Errorf("unknown frame")
}

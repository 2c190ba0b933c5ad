package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
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
	// WritePatch writes the changed parts of one block (the sub-blocks of
	// dirty, data their bytes one range after another) after checking data
	// against sum; h is the whole block's hash once they are written.
	WritePatch(ctx context.Context, disk string, off int64, dirty lifeboat.Dirty, data []byte, sum, h lifeboat.Hash) error
	// CopyBlock writes at (disk, off) the block this point wrote at (srcDisk,
	// srcOff), checked against h; an error wrapping ErrSourcePending means the
	// source's write has not finished yet.
	CopyBlock(ctx context.Context, disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error
	Commit(ctx context.Context, stats lifeboat.CycleStats) (lifeboat.Point, error)
	Abort(ctx context.Context) error
}

// ChangeLister is a Store whose copy of a disk may change on its own between
// points (failback's production disks); a chain of points never does.
type ChangeLister interface {
	// Changed calls fn for each byte range the disk changed since the latest
	// point; an error wrapping lifeboat.ErrNoChangeRecord says it cannot tell.
	Changed(ctx context.Context, vm, disk string, fn func(off, length int64) error) error
}

// copySourceWait bounds how long a Copy waits for its source block's write.
var copySourceWait = 10 * time.Second

// stillEvery is how often an open point stream's peer is checked against the
// revocation list while its frames come (and once more before the commit).
const stillEvery = time.Second

// Server is a recovery site's face to protected sites.
type Server struct {
	wirepb.UnimplementedReplicationServer
	Site  string
	Store Store
	Log   *slog.Logger
	// Writers is how many blocks messages are decompressed and written at
	// once per point (DefaultWriters), within inflightBytes.
	Writers int
	// StartVM starts a VM here from one of its points and takes it over,
	// for its owner's planned migration; nil: this site refuses to.
	StartVM func(ctx context.Context, vm string, point uint64) (FailoverResult, error)
	// TakeFailback readies a failback of vm from site, which owns it now,
	// into this production site's disks (see the PrepareFailback RPC); it
	// returns the point the disks hold. nil: this site takes no failbacks.
	TakeFailback func(ctx context.Context, site, vm string, holds lifeboat.Point, own map[string]Shared) (lifeboat.Point, error)
	// EndFailback ends vm's failback from site (see the FinishFailback
	// RPC): it returns, by disk, the generations started at point fold.
	EndFailback func(ctx context.Context, site, vm string, held uint64, fold lifeboat.Point) (map[string]string, error)
	// ReverseVM makes this production site keep vm's points from now on,
	// its disks (which took a failback point from site) the first (see the
	// Reverse RPC). nil: this site takes no reversal.
	ReverseVM func(ctx context.Context, site, vm string) (lifeboat.Point, error)
	// Revocations is the CA's revocation list as this site holds it: a peer
	// whose certificate it revokes is refused every call and point stream,
	// and a point it streams is not committed once the list revokes it.
	// nil: nothing is revoked.
	Revocations *pki.Revocations
	// ContactFile records each VM's owner's last call (state_dir's
	// contacts.json), so that the split-brain guard can date a call made
	// before a restart of this site (LastContact). "": kept in memory only.
	ContactFile string

	v3 bool // speak point stream version 3 only (tests of an older peer)

	mu       sync.Mutex
	stopped  bool
	listener net.Listener
	calls    *connListener
	grpc     *grpc.Server
	streams  map[net.Conn]struct{} // the point streams' connections

	// cmu guards the watch of peers' calls (contact.go): since when, what
	// this run heard, what ContactFile holds.
	cmu     sync.Mutex
	started time.Time
	heard   map[string]heard
	records map[string]contactRecord
}

// FailoverResult is what a recovery site says of a VM it started for a
// planned migration.
type FailoverResult struct {
	Run       string
	Point     uint64
	ToRunning time.Duration
	Epoch     uint64
}

// Serve accepts protected sites on l with mutual TLS until Stop: gRPC calls
// and point streams on the same address, told apart by ALPN (see streamProto).
func (s *Server) Serve(l net.Listener, tlsConf *tls.Config) error {
	if s.Log == nil {
		s.Log = slog.Default()
	}
	if s.Writers <= 0 {
		s.Writers = DefaultWriters
	}
	s.cmu.Lock()
	s.watch()
	s.cmu.Unlock()
	conf := tlsConf.Clone()
	conf.NextProtos = s.protos()
	calls := newConnListener(l.Addr())
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.listener, s.calls, s.streams = l, calls, map[net.Conn]struct{}{}
	s.grpc = grpc.NewServer(
		grpc.Creds(handshaken{}),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
		grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage),
		grpc.ReadBufferSize(1<<20), grpc.WriteBufferSize(1<<20),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := s.admitCall(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := s.admitCall(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	)
	wirepb.RegisterReplicationServer(s.grpc, s)
	s.mu.Unlock()
	go s.grpc.Serve(calls)
	var backoff time.Duration
	for {
		raw, err := l.Accept()
		if ne, ok := err.(interface{ Temporary() bool }); ok && ne.Temporary() {
			// Out of file descriptors, say: wait and go on, as gRPC's own Serve does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.Log.Warn("accepting a connection failed; retrying", "err", err, "in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if err != nil {
			calls.Close()
			s.mu.Lock()
			stopped := s.stopped
			s.mu.Unlock()
			if stopped {
				return nil
			}
			return err
		}
		go s.handshake(raw, conf)
	}
}

// protos are the protocols the server's listener speaks, by preference.
func (s *Server) protos() []string {
	if s.v3 {
		return []string{"h2", streamProtoV3}
	}
	return []string{"h2", streamProto, streamProtoV3}
}

// handshakeTimeout bounds a connection's TLS handshake and a stream's first frame.
const handshakeTimeout = 30 * time.Second

// handshake completes a connection's mutual TLS and hands it to gRPC or to
// the point stream, by the protocol it asked for.
func (s *Server) handshake(raw net.Conn, conf *tls.Config) {
	bc := newBatchConn(raw)
	tc := tls.Server(bc, conf)
	raw.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := tc.Handshake(); err != nil {
		s.Log.Warn("TLS handshake with a peer failed", "addr", raw.RemoteAddr().String(), "err", err)
		raw.Close()
		return
	}
	raw.SetDeadline(time.Time{})
	conn := &flushConn{Conn: tc, raw: bc}
	if p := tc.ConnectionState().NegotiatedProtocol; p == streamProto || p == streamProtoV3 {
		s.serveStream(conn)
		return
	}
	if !s.calls.push(conn) {
		conn.Close()
	}
}

// Stop ends every call and stream at once; points in flight are discarded.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopped = true
	l, g := s.listener, s.grpc
	for c := range s.streams {
		c.Close()
	}
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
	if g != nil {
		g.Stop()
	}
}

// track registers a stream's connection for Stop; false: the server stopped.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return false
	}
	s.streams[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.streams, c)
}

// handshaken is the gRPC server's transport security: Serve has made the
// mutual TLS handshake already, and this hands gRPC the connection's state.
type handshaken struct{}

func (handshaken) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("wire: handshaken credentials are for the server only")
}

func (handshaken) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	st, ok := tlsState(c)
	if !ok {
		return nil, nil, errors.New("wire: connection did not come through Serve's TLS handshake")
	}
	return c, credentials.TLSInfo{State: st, CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (handshaken) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.3"}
}
func (h handshaken) Clone() credentials.TransportCredentials { return h }
func (handshaken) OverrideServerName(string) error           { return nil }

// connListener is the listener gRPC serves: the connections Serve handed it.
type connListener struct {
	addr   net.Addr
	conns  chan net.Conn
	done   chan struct{}
	closed sync.Once
}

func newConnListener(addr net.Addr) *connListener {
	return &connListener{addr: addr, conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) push(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.closed.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }

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

// admitCall is admit for a gRPC call, checked at every call: a connection
// made before a revocation serves no call after it.
func (s *Server) admitCall(ctx context.Context) error {
	site, err := peerSite(ctx)
	if err != nil {
		return nil // each call says so itself
	}
	p, _ := peer.FromContext(ctx)
	return s.admit(site, peerName(ctx), p.AuthInfo.(credentials.TLSInfo).State)
}

// admit refuses a peer this site serves nothing: one whose certificate names
// this very site (checkNotSelf), or is revoked (checkRevoked).
func (s *Server) admit(site, peer string, cs tls.ConnectionState) error {
	if err := s.checkNotSelf(site, peer); err != nil {
		return err
	}
	return s.checkRevoked(peer, cs)
}

// checkRevoked refuses a peer whose certificate the revocation list revokes,
// and every peer while the list cannot be read (fail closed). The TLS
// handshake let it in so that it hears why here, not "bad certificate".
func (s *Server) checkRevoked(peer string, cs tls.ConnectionState) error {
	err := s.Revocations.CheckPeer(cs)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, pki.ErrRevoked):
		s.Log.Error("refused a peer whose certificate is revoked", "peer", peer, "err", err)
		return status.Errorf(codes.PermissionDenied, "site %q refuses %s: %v; revocation is for good: a site to be trusted again needs a new certificate (`lifeboat cert site NAME --ca DIR --out DIR`)", s.Site, peer, err)
	}
	s.Log.Error("refused a peer: the revocation list cannot be read", "peer", peer, "err", err)
	return status.Errorf(codes.Unavailable, "site %q cannot check %s against its revocation list: %v", s.Site, peer, err)
}

// checkNotSelf refuses a remote peer whose certificate names this very site:
// no remote peer can be it, and after a failover this site owns the VM, so
// such a peer (two sites given one name, a copied certificate) would pass as
// the owner of every VM failed over here, read its points and write into its
// chain while it runs here.

func (s *Server) checkNotSelf(site, peer string) error {
	if site != s.Site {
		return nil
	}
	s.Log.Error("refused a remote peer whose certificate names this site", "peer", peer, "site", s.Site)
	return status.Errorf(codes.PermissionDenied, "%s presents a certificate of site %q, which is this recovery site's own name: two sites were given one name, or a certificate was copied; issue that site a certificate of its own name (`lifeboat cert site NAME`)", peer, s.Site)
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
	return site, s.authorizeSite(site, peerName(ctx), vm)
}

// authorizeSite checks that site, as its certificate names it, owns vm.
func (s *Server) authorizeSite(site, peer, vm string) error {
	if err := s.Store.Authorize(vm, site); err != nil {
		if errors.Is(err, recovery.ErrNotOwner) {
			s.Log.Warn("refused a site that does not own the vm", "vm", vm, "peer", peer, "err", err)
			return status.Error(codes.PermissionDenied, err.Error())
		}
		return status.Error(codes.Internal, err.Error())
	}
	s.recordContact(site, vm)
	return nil
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

// Shared is what a recovery site says of a production disk at the latest
// point production replicated to it: the recovery site's name (the
// namespace of the generations production kept for it), the disk's lineage,
// the point, and the generation its instant started.
type Shared struct {
	Peer       string `json:"peer"`
	Lineage    string `json:"lineage"`
	Point      uint64 `json:"point"`
	Generation string `json:"generation"`
}

// PrepareFailback is a failback's first call at the production site. The
// asking site is the one its certificate names; TakeFailback decides
// whether it may.
func (s *Server) PrepareFailback(ctx context.Context, r *wirepb.PrepareFailbackRequest) (*wirepb.PrepareFailbackReply, error) {
	site, err := peerSite(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	if s.TakeFailback == nil {
		return nil, status.Errorf(codes.Unimplemented, "site %q takes no failbacks (is it the VM's production site, serving with `listen:`?)", s.Site)
	}
	holds, err := pointFromPB(r.Holds)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	own := map[string]Shared{}
	for _, o := range r.Own {
		own[o.Disk] = Shared{Peer: o.Peer, Lineage: o.Lineage, Point: o.Point, Generation: o.Generation}
	}
	s.Log.Warn("failback asked", "vm", r.Vm, "point", holds.ID, "peer", peerName(ctx))
	held, err := s.TakeFailback(ctx, site, r.Vm, holds, own)
	if err != nil {
		if errors.Is(err, recovery.ErrNotOwner) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	return &wirepb.PrepareFailbackReply{Holds: pointToPB(held)}, nil
}

// FinishFailback is a failback's last call at the production site, from
// the site the failback came from.
func (s *Server) FinishFailback(ctx context.Context, r *wirepb.FinishFailbackRequest) (*wirepb.FinishFailbackReply, error) {
	site, err := peerSite(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	if s.EndFailback == nil {
		return nil, status.Errorf(codes.Unimplemented, "site %q takes no failbacks (is it the VM's production site, serving with `listen:`?)", s.Site)
	}
	fold, err := pointFromPB(r.Fold)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.Log.Warn("failback finishing", "vm", r.Vm, "point", r.Held, "fold", fold.ID, "peer", peerName(ctx))
	gens, err := s.EndFailback(ctx, site, r.Vm, r.Held, fold)
	if err != nil {
		if errors.Is(err, recovery.ErrNotOwner) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	reply := &wirepb.FinishFailbackReply{}
	for _, disk := range slices.Sorted(maps.Keys(gens)) {
		reply.Generations = append(reply.Generations, &wirepb.DiskGeneration{Disk: disk, Generation: gens[disk]})
	}
	return reply, nil
}

// Reverse makes this production site keep a VM's restore points, from the
// site that owns and runs it now (protection in reverse).
func (s *Server) Reverse(ctx context.Context, r *wirepb.ReverseRequest) (*wirepb.ReverseReply, error) {
	site, err := peerSite(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	if s.ReverseVM == nil {
		return nil, status.Errorf(codes.Unimplemented, "site %q takes no reversal (is it the VM's production site, serving with `listen:`?)", s.Site)
	}
	s.Log.Warn("protection in reverse asked", "vm", r.Vm, "peer", peerName(ctx))
	pt, err := s.ReverseVM(ctx, site, r.Vm)
	if err != nil {
		if errors.Is(err, recovery.ErrNotOwner) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	return &wirepb.ReverseReply{Point: pointToPB(pt)}, nil
}

// Changed streams what the site's copy of a disk changed on its own.
func (s *Server) Changed(r *wirepb.ChangedRequest, st grpc.ServerStreamingServer[wirepb.ChangedChunk]) error {
	if _, err := s.authorize(st.Context(), r.Vm); err != nil {
		return err
	}
	cl, ok := s.Store.(ChangeLister)
	if !ok {
		return status.Errorf(codes.Unimplemented, "site %q keeps chains of points, whose disks never change on their own", s.Site)
	}
	const per = 4096
	ch := &wirepb.ChangedChunk{}
	err := cl.Changed(st.Context(), r.Vm, r.Disk, func(off, length int64) error {
		ch.Offsets, ch.Lengths = append(ch.Offsets, off), append(ch.Lengths, length)
		if len(ch.Offsets) < per {
			return nil
		}
		err := st.Send(ch)
		ch = &wirepb.ChangedChunk{}
		return err
	})
	switch {
	case errors.Is(err, lifeboat.ErrNoChangeRecord):
		return status.Error(codes.FailedPrecondition, err.Error())
	case err != nil:
		return status.Error(codes.Internal, err.Error())
	case len(ch.Offsets) > 0:
		return st.Send(ch)
	}
	return nil
}

// serveStream receives one point on conn (see streamProto), answers with the
// committed point or the error, and closes conn.
// streamIdle bounds the wait for a point stream's next frame, from Begin on:
// a protected site whose cycle hung or whose host stopped (its kernel may
// still answer, so TCP keepalive never ends the connection) frees the point
// and the VM's writer slot. Far above any pause of a working cycle (its
// client gives up after streamStall without progress).
var streamIdle = 10 * time.Minute

func (s *Server) serveStream(conn *flushConn) {
	if !s.track(conn) {
		conn.Close()
		return
	}
	defer s.untrack(conn)
	defer conn.Close()
	st, _ := tlsState(conn)
	peer := "unknown peer"
	site, err := pki.PeerSite(st)
	var reply *wirepb.ReplicateReply
	if err != nil {
		err = status.Error(codes.Unauthenticated, err.Error())
	} else {
		peer = site + "@" + conn.RemoteAddr().String()
		if err = s.admit(site, peer, st); err == nil {
			conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
			fr := newFrameReader(conn)
			still := func() error { return s.checkRevoked(peer, st) }
			reply, err = s.receive(context.Background(), site, peer, fr, still, func() {
				// From Begin on, each frame must come within streamIdle: a
				// silent peer held the point, its writer and the VM's one
				// writer slot until the site restarted.
				fr.before = func() { conn.SetReadDeadline(time.Now().Add(streamIdle)) }
			})
		}
	}
	conn.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	if err == nil {
		f, merr := marshalFrame(frameReply, reply)
		if merr == nil {
			if werr := conn.writeParts(f); werr != nil {
				s.Log.Warn("the reply to a committed point was lost; the client asks again", "peer", peer, "err", werr)
			}
			return
		}
		err = status.Error(codes.Internal, merr.Error())
	}
	// Say why, then read until the client, having read it, hangs up: closing
	// with its frames unread would reset the connection and lose the reason.
	if werr := conn.writeParts(statusFrame(err)); werr != nil {
		return
	}
	conn.closeWrite()
	conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
	io.Copy(io.Discard, conn)
}

// receive takes one point from fr: Begin first, then frames applied by a few
// workers, then Commit. began is called once Begin was read. still, if set,
// says whether the peer may still send: it is asked at least every
// stillEvery while frames come, and right before the commit, so that a point
// of a site revoked meanwhile is never committed. The first error ends the
// point, discarded; the error is a gRPC status.
func (s *Server) receive(ctx context.Context, site, peer string, fr *frameReader, still func() error, began func()) (*wirepb.ReplicateReply, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	typ, payload, err := fr.next()
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "reading the stream's Begin: %v", err)
	}
	if began != nil {
		began()
	}
	f, err := decodeFrame(typ, payload)
	putPayload(payload)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	b := f.GetBegin()
	if b == nil {
		return nil, status.Error(codes.InvalidArgument, "stream must start with Begin")
	}
	p, err := pointFromPB(b.Point)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := s.authorizeSite(site, peer, p.VM); err != nil {
		return nil, err
	}
	p.Site = site
	log := s.Log.With("vm", p.VM, "point", p.ID, "peer", peer)
	w, err := s.Store.BeginPoint(ctx, p)
	if err != nil {
		log.Error("cannot begin point", "err", err)
		if errors.Is(err, recovery.ErrNotOwner) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.FailedPrecondition, err.Error())
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

	type frame struct {
		f       *wirepb.Frame
		payload []byte // the frame's bytes, which f's data may point into
	}
	var (
		named   = newPointBlocks(p) // the reader's alone: no lock
		work    = make(chan frame, s.Writers)
		budget  = semaphore.NewWeighted(inflightBytes)
		wg      sync.WaitGroup
		errOnce sync.Once
		first   error
	)
	fail := func(err error) {
		errOnce.Do(func() { first = err; cancel() })
	}
	for range max(s.Writers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range work {
				if ctx.Err() == nil {
					if err := s.apply(ctx, w, f.f); err != nil {
						fail(err)
					}
				}
				budget.Release(frameWeight(f.f, f.payload))
				putPayload(f.payload)
			}
		}()
	}
	finish := func() error {
		close(work)
		wg.Wait()
		return first
	}
	// reject ends the stream on err, met with payload in hand: the writers'
	// first error, if one came first, is what the point failed of.
	// withPoint names the VM and point in what goes back to the protected
	// site, where the message did not already.
	withPoint := func(err error) error {
		if strings.Contains(err.Error(), fmt.Sprintf("vm %q", p.VM)) {
			return err
		}
		return fmt.Errorf("vm %q point %d: %w", p.VM, p.ID, err)
	}
	reject := func(payload []byte, err error, code codes.Code) error {
		putPayload(payload)
		if werr := finish(); werr != nil {
			err = werr
		}
		log.Error("point rejected", "err", err)
		return status.Error(code, withPoint(err).Error())
	}

	if still == nil {
		still = func() error { return nil }
	}
	asked := time.Now()
	for {
		typ, payload, err := fr.next()
		if err == nil && time.Since(asked) >= stillEvery {
			asked = time.Now()
			if err := still(); err != nil {
				st := status.Convert(err)
				return nil, reject(payload, errors.New(st.Message()), st.Code())
			}
		}
		if err != nil {
			werr := finish()
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("stream ended without Commit")
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				err = fmt.Errorf("the protected site sent nothing for %v (its cycle hung, or its host stopped): %w", streamIdle, err)
			}
			if werr != nil {
				err = werr
			}
			log.Warn("point not received whole", "err", err)
			return nil, status.Error(codes.Aborted, withPoint(err).Error())
		}
		f, err := decodeFrame(typ, payload)
		if err == nil && f.GetCommit() == nil {
			err = named.claim(f)
		}
		if err != nil {
			return nil, reject(payload, err, codes.InvalidArgument)
		}
		if c := f.GetCommit(); c != nil {
			putPayload(payload)
			if err := finish(); err != nil {
				log.Error("point rejected", "err", err)
				return nil, status.Error(codes.DataLoss, err.Error())
			}
			if err := still(); err != nil {
				st := status.Convert(err)
				log.Error("point not committed", "err", st.Message())
				return nil, status.Error(st.Code(), withPoint(errors.New(st.Message())).Error())
			}
			pt, err := w.Commit(ctx, statsFromPB(c.Stats))
			if err != nil {
				log.Error("commit failed", "err", err)
				return nil, status.Error(codes.Internal, err.Error())
			}
			committed = true
			log.Info("point committed", "disks", len(pt.Disks), "bytes_sent", pt.Stats.BytesSent)
			return &wirepb.ReplicateReply{Point: pointToPB(pt)}, nil
		}
		err = budget.Acquire(ctx, frameWeight(f, payload))
		if err == nil {
			select {
			case work <- frame{f, payload}:
			case <-ctx.Done():
				budget.Release(frameWeight(f, payload))
				err = ctx.Err()
			}
		}
		if err != nil {
			return nil, reject(payload, err, codes.DataLoss)
		}
	}
}

// decodeFrame decodes a frame of the point stream; a Blocks frame's data is
// the payload's tail.
func decodeFrame(typ byte, payload []byte) (*wirepb.Frame, error) {
	switch typ {
	case frameBlocks:
		b, err := decodeBlocks(payload)
		if err != nil {
			return nil, err
		}
		return &wirepb.Frame{Body: &wirepb.Frame_Blocks{Blocks: b}}, nil
	case framePatch:
		p, err := decodePatch(payload)
		if err != nil {
			return nil, err
		}
		return &wirepb.Frame{Body: &wirepb.Frame_Patch{Patch: p}}, nil
	case frameMessage:
		f := &wirepb.Frame{}
		if err := proto.Unmarshal(payload, f); err != nil {
			return nil, fmt.Errorf("frame: %w", err)
		}
		return f, nil
	}
	return nil, fmt.Errorf("unknown frame type %q", typ)
}

// A point's frames are written by DefaultWriters goroutines at once, the
// frames read and not yet written at most inflightBytes: many of an
// incremental cycle's scattered 64 KiB blocks at once, a few of an initial
// sync's 4 MiB chunks. Each write waits for the writer daemon's answer, so
// more at once hide its latency: `make bench`'s incremental cycle of 256
// MiB of random writes on a 16 GiB disk took 3.70-3.79 s in three runs
// with 4 writers (8 frames queued), 3.03-3.58 s in three with 16. The
// frames' memory is bounded by bytes, not by count (4 writers and 8 queued
// 4 MiB frames could take 48 MiB, and as much again inflated).
const (
	DefaultWriters = 16
	inflightBytes  = 32 << 20
)

// frameWeight is what a frame takes of inflightBytes: its payload, and the
// chunk it inflates to.
func frameWeight(f *wirepb.Frame, payload []byte) int64 {
	n := int64(len(payload))
	if b := f.GetBlocks(); b != nil && b.Zstd {
		n += int64(b.Length)
	}
	if p := f.GetPatch(); p != nil && p.Zstd {
		n += int64(p.Length)
	}
	return min(n, inflightBytes)
}

// inflate is a data frame's data as its header says it is: decompressed
// into a pooled buffer when zstd is set (release gives it back once nothing
// reads it), else as it came; either way exactly length bytes.
func inflate(data []byte, zstd bool, length uint32) (out []byte, release func(), err error) {
	if !zstd {
		if len(data) != int(length) {
			return nil, nil, fmt.Errorf("%d data bytes, header said %d", len(data), length)
		}
		return data, func() {}, nil
	}
	db := bufpool.Shared.Get(int(length) + decodeSlack)
	if out, err = decompress((*db)[:0], data, int(length)); err != nil {
		bufpool.Shared.Put(db)
		return nil, nil, err
	}
	return out, func() { bufpool.Shared.Put(db) }, nil
}

func (s *Server) apply(ctx context.Context, w PointWriter, f *wirepb.Frame) error {
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
		data, release, err := inflate(b.Data, b.Zstd, b.Length)
		if err != nil {
			return fmt.Errorf("disk %q offset %d: %w", b.Disk, b.Offset, err)
		}
		defer release() // WriteBlocks is done with data when it returns
		return w.WriteBlocks(ctx, b.Disk, b.Offset, data, hs)
	case *wirepb.Frame_Patch:
		p := body.Patch
		sum, err1 := hashesFromBytes(p.Sum)
		h, err2 := hashesFromBytes(p.Hash)
		if err1 != nil || err2 != nil || len(sum) != 1 || len(h) != 1 || p.Dirty == 0 || p.Dirty > uint32(lifeboat.AllDirty) || p.Length > lifeboat.BlockSize {
			return fmt.Errorf("disk %q offset %d: malformed patch of one block", p.Disk, p.Offset)
		}
		data, release, err := inflate(p.Data, p.Zstd, p.Length)
		if err != nil {
			return fmt.Errorf("disk %q offset %d: %w", p.Disk, p.Offset, err)
		}
		defer release()
		return w.WritePatch(ctx, p.Disk, p.Offset, lifeboat.Dirty(p.Dirty), data, sum[0], h[0])
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

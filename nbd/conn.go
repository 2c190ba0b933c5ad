package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one connection in the transmission phase. Callers write requests one
// at a time (wsem); one reader goroutine dispatches replies to them by cookie and
// reads data straight into the caller's buffer.
type conn struct {
	nc         net.Conn
	br         *bufio.Reader
	name       string // the address, for errors
	structured bool
	metaIDs    map[string]uint32 // negotiated meta context name -> id on this connection
	metaByID   map[uint32]string
	timeout    time.Duration
	stall      time.Duration // Options.Stall
	// heard is when the server last sent a reply, or the connection last
	// became busy (unix nanoseconds): the stall watch's reference.
	heard atomic.Int64

	sem  chan struct{} // in-flight slots; a slot is held from submit until the reply is done
	wsem chan struct{} // one request writer at a time; a channel so waiting honours ctx
	hdr  [requestHeaderBytes]byte

	mu      sync.Mutex
	pending map[uint64]*request
	cookie  uint64
	err     error         // why the connection is dead; set once
	dead    chan struct{} // closed when err is set
	// closing: close has begun. The server may hang up on the disconnect
	// before close marks the connection dead itself; the reason is still
	// that the client closed it (ErrClosed), not the server's hang-up.
	closing    bool
	readerDone chan struct{}
}

type span struct{ off, n uint64 }

// request is one NBD request and, once done is closed, its outcome.
type request struct {
	cmd     uint16
	flags   uint16
	off     uint64
	length  uint32
	buf     []byte // read destination, len(buf) == length
	payload []byte // write payload
	metaID  uint32 // block status: the context the caller asked for
	metaCtx string

	ctx    context.Context
	cancel context.CancelFunc
	conn   *conn

	// Written by the reader goroutine only, read by the caller after done.
	cookie    uint64
	spans     []span // parts of a read covered so far, to detect gaps and overlaps
	spanArr   [2]span
	covered   uint64
	extents   []Extent
	gotStatus bool
	err       error
	done      chan struct{}

	mu        sync.Mutex // held by the reader while it writes into buf
	abandoned bool       // the caller gave up: the reader discards instead of writing buf
}

func newConn(nc net.Conn, br *bufio.Reader, name string, n negotiated, opts Options) *conn {
	c := &conn{
		nc:         nc,
		br:         br,
		name:       name,
		structured: n.structured,
		metaIDs:    n.metaIDs,
		metaByID:   make(map[uint32]string, len(n.metaIDs)),
		timeout:    opts.Timeout,
		stall:      opts.Stall,
		sem:        make(chan struct{}, opts.MaxInFlight),
		wsem:       make(chan struct{}, 1),
		pending:    make(map[uint64]*request),
		dead:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	for name, id := range n.metaIDs {
		c.metaByID[id] = name
	}
	return c
}

func (c *conn) start() {
	go c.readLoop()
	if c.stall > 0 {
		go c.watchStall()
	}
}

// watchStall drops the connection once the server has answered nothing
// for c.stall while requests wait for it (Options.Stall): every request
// then fails with ErrStalled. A server that answers, however slowly in
// all, is not cut, nor is a request that waits for an in-flight slot while
// the others are answered.
func (c *conn) watchStall() {
	t := time.NewTicker(max(c.stall/8, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-c.dead:
			return
		case <-t.C:
		}
		c.mu.Lock()
		waiting := len(c.pending)
		c.mu.Unlock()
		if silent := time.Since(time.Unix(0, c.heard.Load())); waiting > 0 && silent >= c.stall {
			c.fail(fmt.Errorf("nbd: server %s answered nothing for %v with %d requests waiting: %w; dial again", c.name, silent.Round(time.Millisecond), waiting, ErrStalled))
			return
		}
	}
}

func (c *conn) isDead() bool {
	select {
	case <-c.dead:
		return true
	default:
		return false
	}
}

func (c *conn) deadErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// fail marks the connection dead with err (the first reason wins) and closes it,
// which makes the reader fail every pending request.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if c.closing {
		err = ErrClosed
	}
	c.err = err
	close(c.dead)
	c.mu.Unlock()
	c.nc.Close() // outside mu: closing TLS may wait to send its close alert
}

// requestCtx bounds one request by the client's timeout when ctx has no deadline.
func (c *conn) requestCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

// do sends r and waits for its reply.
func (c *conn) do(ctx context.Context, r *request) error {
	r.ctx, r.cancel = c.requestCtx(ctx)
	defer r.cancel()
	if err := c.submit(r); err != nil {
		return err
	}
	return c.wait(r)
}

// submit registers r and writes it to the server. Once it returns nil the
// caller must wait for r.
func (c *conn) submit(r *request) error {
	r.conn = c
	r.done = make(chan struct{})
	select {
	case c.sem <- struct{}{}:
	case <-c.dead:
		return c.deadErr()
	case <-r.ctx.Done():
		return r.ctxErr()
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		<-c.sem
		return err
	}
	c.cookie++
	r.cookie = c.cookie
	if len(c.pending) == 0 {
		c.heard.Store(time.Now().UnixNano()) // busy from now: silence counts from here
	}
	c.pending[r.cookie] = r
	c.mu.Unlock()

	select {
	case c.wsem <- struct{}{}:
	case <-c.dead:
		return nil // the reader fails r with the reason
	case <-r.ctx.Done():
		c.mu.Lock()
		if c.pending[r.cookie] == r {
			delete(c.pending, r.cookie)
			c.mu.Unlock()
			<-c.sem
			return r.ctxErr()
		}
		c.mu.Unlock()
		return nil // already failed by the reader
	}
	err := c.writeRequest(r)
	<-c.wsem
	if err != nil {
		// A partly written request leaves the stream unusable.
		c.fail(fmt.Errorf("nbd: sending %s to %s failed: %w; dial again", cmdName(r.cmd), c.name, err))
	}
	return nil
}

// writeRequest sends r's header and payload; the caller holds wsem.
func (c *conn) writeRequest(r *request) error {
	dl, ok := r.ctx.Deadline()
	if !ok {
		dl = time.Now().Add(c.timeout)
	}
	if err := c.nc.SetWriteDeadline(dl); err != nil {
		return err
	}
	h := c.hdr[:]
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], r.flags)
	binary.BigEndian.PutUint16(h[6:], r.cmd)
	binary.BigEndian.PutUint64(h[8:], r.cookie)
	binary.BigEndian.PutUint64(h[16:], r.off)
	binary.BigEndian.PutUint32(h[24:], r.length)
	if len(r.payload) == 0 {
		_, err := c.nc.Write(h)
		return err
	}
	bufs := net.Buffers{h, r.payload} // writev on unix and tcp sockets
	_, err := bufs.WriteTo(c.nc)
	return err
}

// wait blocks until r is answered, its context ends, or the connection dies.
func (c *conn) wait(r *request) error {
	select {
	case <-r.done:
		return r.err
	case <-r.ctx.Done():
	}
	c.abandon(r)
	select {
	case <-r.done:
		if r.err == nil {
			return nil // the reply raced the deadline and won; buf is complete
		}
	default:
	}
	return r.ctxErr()
}

// abandon makes sure the reader never touches r.buf again. The reader holds r.mu
// only while it reads a piece of a reply; a server stalled in the middle of one
// costs the connection rather than an unbounded wait.
func (c *conn) abandon(r *request) {
	if r.mu.TryLock() {
		r.abandoned = true
		r.mu.Unlock()
		return
	}
	got := make(chan struct{})
	go func() {
		r.mu.Lock()
		r.abandoned = true
		r.mu.Unlock()
		close(got)
	}()
	bound := min(c.timeout, abandonStallBound)
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-got:
	case <-t.C:
		c.fail(fmt.Errorf("nbd: server %s stalled in the middle of a reply for %v; connection dropped, dial again", c.name, bound))
		<-got
	}
}

func (r *request) ctxErr() error {
	err := r.ctx.Err()
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("nbd: %s at offset %d length %d: no reply in time (server slow or hung): %w", cmdName(r.cmd), r.off, r.length, err)
	}
	return fmt.Errorf("nbd: %s at offset %d length %d: %w", cmdName(r.cmd), r.off, r.length, err)
}

func (r *request) serverError(errno uint32, off, length uint64, msg string) {
	if r.err != nil {
		return // the first error is the one worth reporting
	}
	r.err = &Error{Op: cmdName(r.cmd), Offset: int64(off), Length: int64(length), Errno: errnoOf(errno), Message: msg}
}

// readLoop dispatches replies until the connection fails, then fails every
// request still pending with the reason.
func (c *conn) readLoop() {
	defer close(c.readerDone)
	err := c.readReplies()
	c.fail(err)
	c.mu.Lock()
	defer c.mu.Unlock()
	for cookie, r := range c.pending {
		delete(c.pending, cookie)
		r.err = c.err
		close(r.done)
		<-c.sem
	}
}

func (c *conn) readReplies() error {
	var magic [4]byte
	for {
		if _, err := io.ReadFull(c.br, magic[:]); err != nil {
			return c.lost(err)
		}
		c.heard.Store(time.Now().UnixNano())
		var err error
		switch m := binary.BigEndian.Uint32(magic[:]); m {
		case simpleReplyMagic:
			err = c.readSimple()
		case structReplyMagic:
			if !c.structured {
				return c.protocol("structured reply although structured replies were not negotiated")
			}
			err = c.readChunk()
		default:
			return c.protocol("reply with bad magic %#08x", m)
		}
		if err != nil {
			return err
		}
	}
}

func (c *conn) lost(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("nbd: server %s closed the connection: %w; dial again", c.name, err)
	}
	return fmt.Errorf("nbd: connection to %s lost: %w; dial again", c.name, err)
}

func (c *conn) protocol(format string, args ...any) error {
	return fmt.Errorf("%w: %s from %s; connection dropped, dial again", ErrProtocol, fmt.Sprintf(format, args...), c.name)
}

func (c *conn) lookup(cookie uint64) *request {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[cookie]
}

// finish completes r: it checks a successful reply was whole, then wakes the caller.
func (c *conn) finish(r *request) error {
	var perr error
	if r.err == nil {
		switch r.cmd {
		case cmdRead:
			if !r.fullyCovered() {
				perr = c.protocol("read at offset %d length %d claimed success but %d bytes arrived", r.off, r.length, r.covered)
			}
		case cmdBlockStatus:
			if !r.gotStatus {
				perr = c.protocol("block-status at offset %d claimed success without extents for %q", r.off, r.metaCtx)
			}
		}
		r.err = perr
	}
	c.mu.Lock()
	delete(c.pending, r.cookie)
	c.mu.Unlock()
	close(r.done)
	<-c.sem
	return perr
}

func (c *conn) readSimple() error {
	var h [12]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return c.lost(err)
	}
	errno := binary.BigEndian.Uint32(h[0:])
	cookie := binary.BigEndian.Uint64(h[4:])
	r := c.lookup(cookie)
	if r == nil {
		return c.protocol("simple reply for unknown cookie %d (never sent, or already answered)", cookie)
	}
	if errno != 0 {
		r.serverError(errno, r.off, uint64(r.length), "")
		return c.finish(r)
	}
	switch r.cmd {
	case cmdRead:
		if err := r.addSpan(r.off, uint64(r.length)); err != nil {
			return c.protocol("%v", err)
		}
		if err := c.readInto(r, 0, uint64(r.length)); err != nil {
			return c.lost(err)
		}
	case cmdBlockStatus:
		return c.protocol("simple success reply to block-status")
	}
	return c.finish(r)
}

// readChunk reads one structured reply chunk. Every length is checked against
// what the request can legitimately produce before anything is read or allocated.
func (c *conn) readChunk() error {
	var h [16]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return c.lost(err)
	}
	flags := binary.BigEndian.Uint16(h[0:])
	typ := binary.BigEndian.Uint16(h[2:])
	cookie := binary.BigEndian.Uint64(h[4:])
	length := binary.BigEndian.Uint32(h[12:])
	r := c.lookup(cookie)
	if r == nil {
		return c.protocol("reply chunk type %d for unknown cookie %d (never sent, or already answered)", typ, cookie)
	}
	var err error
	switch {
	case typ == chunkNone:
		if length != 0 || flags&replyFlagDone == 0 {
			return c.protocol("NBD_REPLY_TYPE_NONE with length %d, flags %#x", length, flags)
		}
	case typ == chunkOffsetData:
		err = c.readDataChunk(r, length)
	case typ == chunkOffsetHole:
		err = c.readHoleChunk(r, length)
	case typ == chunkBlockStatus:
		err = c.readStatusChunk(r, length)
	case typ&chunkErrBit != 0:
		err = c.readErrorChunk(r, typ, length)
	default:
		return c.protocol("unknown reply chunk type %d", typ)
	}
	if err != nil {
		return err
	}
	if flags&replyFlagDone != 0 {
		return c.finish(r)
	}
	return nil
}

func (c *conn) readDataChunk(r *request, length uint32) error {
	if r.cmd != cmdRead {
		return c.protocol("data chunk in reply to %s", cmdName(r.cmd))
	}
	if length < 9 || length-8 > r.length {
		return c.protocol("data chunk of length %d in reply to a read of %d bytes", length, r.length)
	}
	var b [8]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		return c.lost(err)
	}
	off, n := binary.BigEndian.Uint64(b[:]), uint64(length-8)
	if err := r.addSpan(off, n); err != nil {
		return c.protocol("%v", err)
	}
	if err := c.readInto(r, off-r.off, n); err != nil {
		return c.lost(err)
	}
	return nil
}

func (c *conn) readHoleChunk(r *request, length uint32) error {
	if r.cmd != cmdRead || length != 12 {
		return c.protocol("hole chunk of length %d in reply to %s", length, cmdName(r.cmd))
	}
	var b [12]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		return c.lost(err)
	}
	off, n := binary.BigEndian.Uint64(b[:]), uint64(binary.BigEndian.Uint32(b[8:]))
	if err := r.addSpan(off, n); err != nil {
		return c.protocol("%v", err)
	}
	r.mu.Lock()
	if !r.abandoned {
		clear(r.buf[off-r.off : off-r.off+n])
	}
	r.mu.Unlock()
	return nil
}

func (c *conn) readStatusChunk(r *request, length uint32) error {
	if r.cmd != cmdBlockStatus {
		return c.protocol("block-status chunk in reply to %s", cmdName(r.cmd))
	}
	if length < 12 || (length-4)%8 != 0 || (length-4)/8 > maxStatusDescs {
		return c.protocol("block-status chunk of length %d", length)
	}
	var b [8]byte
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return c.lost(err)
	}
	id := binary.BigEndian.Uint32(b[:4])
	if _, ok := c.metaByID[id]; !ok {
		return c.protocol("block-status chunk for meta context id %d, which was never negotiated", id)
	}
	n := int((length - 4) / 8)
	if id != r.metaID {
		// Another negotiated context: the server answers for all of them.
		if _, err := c.br.Discard(n * 8); err != nil {
			return c.lost(err)
		}
		return nil
	}
	if r.gotStatus {
		return c.protocol("two block-status chunks for %q in one reply", r.metaCtx)
	}
	r.gotStatus = true
	r.extents = make([]Extent, 0, min(n, 4096))
	pos := r.off
	for range n {
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return c.lost(err)
		}
		l := binary.BigEndian.Uint32(b[:4])
		if l == 0 {
			return c.protocol("zero-length extent in block-status for %q", r.metaCtx)
		}
		if pos < uint64(1)<<62 { // beyond that, the extent is past any export: ignore the rest
			r.extents = append(r.extents, Extent{Offset: int64(pos), Length: int64(l), Flags: binary.BigEndian.Uint32(b[4:])})
		}
		pos += uint64(l)
	}
	return nil
}

func (c *conn) readErrorChunk(r *request, typ uint16, length uint32) error {
	if length < 6 || length > maxErrorChunk {
		return c.protocol("error chunk type %d of length %d", typ, length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return c.lost(err)
	}
	errno := binary.BigEndian.Uint32(b[0:])
	mlen := uint32(binary.BigEndian.Uint16(b[4:]))
	if mlen > length-6 {
		return c.protocol("error chunk message length %d exceeds chunk length %d", mlen, length)
	}
	msg := cleanMessage(b[6 : 6+mlen])
	rest := b[6+mlen:]
	off, n := r.off, uint64(r.length)
	if typ == chunkErrorOffset {
		if len(rest) != 8 {
			return c.protocol("error-offset chunk with %d trailing bytes", len(rest))
		}
		eoff := binary.BigEndian.Uint64(rest)
		if eoff < r.off || eoff-r.off >= uint64(r.length) {
			return c.protocol("error offset %d outside the request at %d length %d", eoff, r.off, r.length)
		}
		off, n = eoff, r.off+uint64(r.length)-eoff
	}
	r.serverError(errno, off, n, msg)
	return nil
}

// readInto reads n bytes of a reply into r.buf at rel, or discards them if the
// caller gave up. Pieces keep an abandon from waiting on a whole large read.
func (c *conn) readInto(r *request, rel, n uint64) error {
	const piece = 1 << 20
	for n > 0 {
		k := min(n, piece)
		var err error
		r.mu.Lock()
		if r.abandoned {
			_, err = c.br.Discard(int(k))
		} else {
			_, err = io.ReadFull(c.br, r.buf[rel:rel+k])
		}
		r.mu.Unlock()
		if err != nil {
			return err
		}
		rel += k
		n -= k
	}
	return nil
}

// addSpan records that [off, off+n) of a read arrived, refusing anything outside
// the request or overlapping what arrived before.
func (r *request) addSpan(off, n uint64) error {
	if n == 0 || off < r.off || off-r.off > uint64(r.length) || n > uint64(r.length)-(off-r.off) {
		return fmt.Errorf("chunk at offset %d length %d outside the read at %d length %d", off, n, r.off, r.length)
	}
	if r.covered+n > uint64(r.length) {
		return fmt.Errorf("chunks overlap in the read at %d length %d", r.off, r.length)
	}
	r.covered += n
	if r.spans == nil {
		r.spans = r.spanArr[:0]
	}
	if k := len(r.spans); k > 0 && r.spans[k-1].off+r.spans[k-1].n == off {
		r.spans[k-1].n += n // in order, the common case
		return nil
	}
	r.spans = append(r.spans, span{off, n})
	return nil
}

// fullyCovered reports whether the chunks of a read cover it exactly.
func (r *request) fullyCovered() bool {
	if r.covered != uint64(r.length) {
		return false
	}
	if len(r.spans) <= 1 {
		return true
	}
	s := slices.Clone(r.spans)
	slices.SortFunc(s, func(a, b span) int {
		if a.off < b.off {
			return -1
		}
		if a.off > b.off {
			return 1
		}
		return 0
	})
	pos := r.off
	for _, sp := range s {
		if sp.off != pos {
			return false
		}
		pos += sp.n
	}
	return true
}

func cleanMessage(b []byte) string {
	s := strings.ToValidUTF8(string(b), "?")
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

// close sends NBD_CMD_DISC if the connection still works, then closes it; requests
// still in flight fail with ErrClosed.
func (c *conn) close() {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	if !c.isDead() {
		t := time.NewTimer(closeWriteBound)
		select {
		case c.wsem <- struct{}{}:
			c.nc.SetWriteDeadline(time.Now().Add(closeWriteBound))
			h := c.hdr[:]
			clear(h)
			binary.BigEndian.PutUint32(h[0:], requestMagic)
			binary.BigEndian.PutUint16(h[6:], cmdDisc)
			c.nc.Write(h) // best effort: we close either way
			<-c.wsem
		case <-t.C:
		case <-c.dead:
		}
		t.Stop()
	}
	c.fail(ErrClosed)
	<-c.readerDone // prompt: the socket is closed
}

package nbd

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
)

// Client is a connection (or several, with multi-conn) to one NBD export. All
// methods are safe for concurrent use; many requests are in flight at once.
type Client struct {
	name      string
	conns     []*conn
	rr        atomic.Uint32
	size      int64
	flags     uint16
	minBS     uint32
	prefBS    uint32
	maxBS     uint32
	step      int64 // bytes per read or write request: max block size capped, aligned to min
	metaNames []string
	closeOnce sync.Once
}

// Size returns the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// ReadOnly reports whether the export refuses writes.
func (c *Client) ReadOnly() bool { return c.flags&tfReadOnly != 0 }

// CanMultiConn reports whether the server allows several connections with consistent results.
func (c *Client) CanMultiConn() bool { return c.flags&tfCanMultiConn != 0 }

// CanFlush reports whether the server accepts flush (without it, Flush is a no-op).
func (c *Client) CanFlush() bool { return c.flags&tfFlush != 0 }

// CanFUA reports whether the server accepts forced unit access on writes.
func (c *Client) CanFUA() bool { return c.flags&tfFUA != 0 }

// CanTrim reports whether the server accepts trim (without it, Trim is a no-op).
func (c *Client) CanTrim() bool { return c.flags&tfTrim != 0 }

// CanWriteZeroes reports whether the server zeroes ranges itself.
func (c *Client) CanWriteZeroes() bool { return c.flags&tfWriteZeroes != 0 }

// CanFastZero reports whether the server accepts ZeroFast.
func (c *Client) CanFastZero() bool { return c.flags&tfFastZero != 0 }

// Connections returns the number of connections open to the server.
func (c *Client) Connections() int { return len(c.conns) }

// BlockSizes returns the server's minimum, preferred and maximum block sizes
// (NBD_INFO_BLOCK_SIZE, or the protocol defaults 1, 4096, 32 MiB).
func (c *Client) BlockSizes() (min, preferred, max uint32) { return c.minBS, c.prefBS, c.maxBS }

// MetaContexts returns the negotiated meta contexts.
func (c *Client) MetaContexts() []string { return append([]string(nil), c.metaNames...) }

func (c *Client) String() string { return "nbd " + c.name }

// pick spreads requests across the live connections.
func (c *Client) pick() *conn {
	n := uint32(len(c.conns))
	start := c.rr.Add(1)
	for i := range n {
		if cn := c.conns[(start+i)%n]; !cn.isDead() {
			return cn
		}
	}
	return c.conns[start%n] // all dead: submit reports why
}

func (c *Client) checkRange(op string, off, length int64) error {
	if off < 0 || length < 0 || off > c.size || length > c.size-off {
		return fmt.Errorf("nbd: %s at offset %d length %d is outside the export of %s (size %d)", op, off, length, c.name, c.size)
	}
	return nil
}

func (c *Client) aligned(off, length int64) bool {
	m := int64(c.minBS) - 1
	return off&m == 0 && length&m == 0
}

func (c *Client) readOnlyErr(op string, off, length int64) error {
	return &Error{Op: op, Offset: off, Length: length, Errno: syscall.EPERM, Message: "export " + c.name + " is read-only"}
}

// ReadAt implements io.ReaderAt, bounded by Options.Timeout per request. Reading
// past the end of the export returns the bytes before it and io.EOF.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd: read at negative offset %d", off)
	}
	if off >= c.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), c.size-off)
	if err := c.Read(context.Background(), p[:n], off); err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt implements io.WriterAt, bounded by Options.Timeout per request.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.Write(context.Background(), p, off, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Read fills p with the export's bytes at off. Holes arrive as zeros. Large
// reads are split into requests of at most the server's max block size, in
// flight together.
func (c *Client) Read(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange("read", off, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if !c.aligned(off, int64(len(p))) {
		// The server wants whole blocks: read them into a bounce buffer.
		a0, a1, err := c.alignOut("read", off, int64(len(p)))
		if err != nil {
			return err
		}
		b := make([]byte, a1-a0)
		if err := c.Read(ctx, b, a0); err != nil {
			return err
		}
		copy(p, b[off-a0:])
		return nil
	}
	return c.pipeline(ctx, cmdRead, 0, off, int64(len(p)), c.step, func(r *request, pos int64) {
		r.buf = p[pos : pos+int64(r.length)]
	})
}

// alignOut widens [off, off+length) to whole minimum blocks.
func (c *Client) alignOut(op string, off, length int64) (int64, int64, error) {
	m := int64(c.minBS)
	a0 := off / m * m
	a1 := (off + length + m - 1) / m * m
	if a1 > c.size {
		return 0, 0, fmt.Errorf("nbd: unaligned %s at offset %d length %d reaches the tail of %s, whose size %d is not a multiple of its minimum block size %d", op, off, length, c.name, c.size, m)
	}
	return a0, a1, nil
}

// Write writes p at off; fua asks for it to be durable when Write returns
// (emulated with a flush when the server lacks FUA). Large writes are split.
// When the server's minimum block size is over 1, unaligned edges are
// read, patched and written back: not atomic against overlapping writers.
func (c *Client) Write(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := c.checkRange("write", off, int64(len(p))); err != nil {
		return err
	}
	if c.ReadOnly() {
		return c.readOnlyErr("write", off, int64(len(p)))
	}
	if len(p) == 0 {
		return nil
	}
	if !c.aligned(off, int64(len(p))) {
		a0, a1, err := c.alignOut("write", off, int64(len(p)))
		if err != nil {
			return err
		}
		b := make([]byte, a1-a0)
		m := int64(c.minBS)
		if err := c.Read(ctx, b[:m], a0); err != nil {
			return fmt.Errorf("nbd: read-modify-write of an unaligned write: %w", err)
		}
		if a1-a0 > m {
			if err := c.Read(ctx, b[len(b)-int(m):], a1-m); err != nil {
				return fmt.Errorf("nbd: read-modify-write of an unaligned write: %w", err)
			}
		}
		copy(b[off-a0:], p)
		p, off = b, a0
	}
	var flags uint16
	if fua && c.CanFUA() {
		flags = cmdFlagFUA
	}
	err := c.pipeline(ctx, cmdWrite, flags, off, int64(len(p)), c.step, func(r *request, pos int64) {
		r.payload = p[pos : pos+int64(r.length)]
	})
	if err == nil && fua && !c.CanFUA() {
		err = c.Flush(ctx)
	}
	return err
}

// zeros is the source of writes when the server cannot zero ranges itself.
var zeros [1 << 20]byte

// WriteZeroes makes [off, off+length) read as zeros. Without server support
// it writes zero buffers, except with ZeroFast, which then fails with ENOTSUP
// at once, as it does whenever the server judges zeroing would be slow.
func (c *Client) WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error {
	if err := c.checkRange("write-zeroes", off, length); err != nil {
		return err
	}
	if c.ReadOnly() {
		return c.readOnlyErr("write-zeroes", off, length)
	}
	if length == 0 {
		return nil
	}
	if flags&ZeroFast != 0 && !c.CanFastZero() {
		return &Error{Op: "write-zeroes", Offset: off, Length: length, Errno: syscall.ENOTSUP, Message: "server " + c.name + " does not support fast zero"}
	}
	if !c.aligned(off, length) {
		// Zero the partial edge blocks by writing, the aligned middle by command.
		m := int64(c.minBS)
		a0 := (off + m - 1) / m * m
		a1 := (off + length) / m * m
		if a1 <= a0 {
			return c.Write(ctx, zeros[:length], off, false) // within one block; length < minBS <= 64 KiB
		}
		if err := c.Write(ctx, zeros[:a0-off], off, false); err != nil {
			return err
		}
		if err := c.Write(ctx, zeros[:off+length-a1], a1, false); err != nil {
			return err
		}
		off, length = a0, a1-a0
	}
	if !c.CanWriteZeroes() {
		step := min(c.step, int64(len(zeros)))
		return c.pipeline(ctx, cmdWrite, 0, off, length, step, func(r *request, pos int64) {
			r.payload = zeros[:r.length]
		})
	}
	var cf uint16
	if flags&ZeroNoHole != 0 {
		cf |= cmdFlagNoHole
	}
	if flags&ZeroFast != 0 {
		cf |= cmdFlagFastZero
	}
	// Zeroing carries no payload, so the max block size does not apply; a large
	// aligned step keeps the count of requests low.
	return c.pipeline(ctx, cmdWriteZeroes, cf, off, length, maxStatusRequest/2, nil)
}

// Trim tells the server [off, off+length) is no longer needed; its contents are
// undefined afterwards. A no-op when the server does not support trim.
func (c *Client) Trim(ctx context.Context, off, length int64) error {
	if err := c.checkRange("trim", off, length); err != nil {
		return err
	}
	if c.ReadOnly() {
		return c.readOnlyErr("trim", off, length)
	}
	m := int64(c.minBS)
	a0 := (off + m - 1) / m * m // trim only whole blocks: it is a hint
	a1 := (off + length) / m * m
	if !c.CanTrim() || a1 <= a0 {
		return nil
	}
	return c.pipeline(ctx, cmdTrim, 0, a0, a1-a0, maxStatusRequest/2, nil)
}

// Flush makes every write answered so far durable, on every connection.
func (c *Client) Flush(ctx context.Context) error {
	if !c.CanFlush() {
		return nil
	}
	reqs := make([]*request, 0, len(c.conns))
	for _, cn := range c.conns {
		reqs = append(reqs, &request{cmd: cmdFlush, conn: cn})
	}
	return c.submitAll(ctx, reqs)
}

// submitAll sends every request on its connection (all in flight together)
// and waits for every one sent; the first error wins. A request's buffer is the
// caller's and must not be touched after we return.
func (c *Client) submitAll(ctx context.Context, reqs []*request) error {
	var first error
	sent := reqs[:0:0]
	for _, r := range reqs {
		cn := r.conn
		r.ctx, r.cancel = cn.requestCtx(ctx)
		if err := cn.submit(r); err != nil {
			r.cancel()
			first = err
			break
		}
		sent = append(sent, r)
	}
	for _, r := range sent {
		if err := r.conn.wait(r); err != nil && first == nil {
			first = err
		}
		r.cancel()
	}
	return first
}

// pipeline issues [off, off+length) as requests of at most step bytes spread
// across the connections, all in flight together, and waits for every one: a
// request's buffer is the caller's and must not be touched after we return.
func (c *Client) pipeline(ctx context.Context, cmd, flags uint16, off, length, step int64, fill func(r *request, pos int64)) error {
	var arr [4]*request
	reqs := arr[:0]
	for pos := int64(0); pos < length; pos += step {
		r := &request{cmd: cmd, flags: flags, off: uint64(off + pos), length: uint32(min(step, length-pos)), conn: c.pick()}
		if fill != nil {
			fill(r, pos)
		}
		reqs = append(reqs, r)
	}
	return c.submitAll(ctx, reqs)
}

// BlockStatus reports the extents of metaContext over [off, off+length),
// issuing NBD_CMD_BLOCK_STATUS until the range is covered (servers may answer
// short), and calls fn in offset order with extents clipped to the range.
// Adjacent extents with equal flags are merged.
func (c *Client) BlockStatus(ctx context.Context, metaContext string, off, length int64, fn func(Extent) error) error {
	if err := c.checkRange("block-status", off, length); err != nil {
		return err
	}
	end := off + length
	m := int64(c.minBS)
	var cur Extent // pending, merged with following extents of equal flags
	for pos := off; pos < end; {
		cn := c.pick()
		id, ok := cn.metaIDs[metaContext]
		if !ok {
			return fmt.Errorf("nbd: meta context %q was not negotiated with %s: pass it in Options.MetaContexts", metaContext, c.name)
		}
		// Ask for whole minimum blocks; the answer is clipped to [pos, end).
		q0 := pos / m * m
		q1 := min((end+m-1)/m*m, c.size)
		r := &request{cmd: cmdBlockStatus, off: uint64(q0), length: uint32(min(q1-q0, maxStatusRequest)), metaID: id, metaCtx: metaContext}
		if err := cn.do(ctx, r); err != nil {
			return err
		}
		next := pos
		for _, e := range r.extents {
			s, t := max(e.Offset, pos), min(e.End(), end)
			if t <= s {
				if e.Offset >= end {
					break
				}
				continue
			}
			next = t
			if cur.Length > 0 && cur.Flags == e.Flags && cur.End() == s {
				cur.Length += t - s
				continue
			}
			if cur.Length > 0 {
				if err := fn(cur); err != nil {
					return err
				}
			}
			cur = Extent{Offset: s, Length: t - s, Flags: e.Flags}
		}
		if next <= pos {
			return fmt.Errorf("%w: block-status at offset %d made no progress from %s", ErrProtocol, pos, c.name)
		}
		pos = next
	}
	if cur.Length > 0 {
		return fn(cur)
	}
	return nil
}

// Close disconnects (NBD_CMD_DISC) and closes every connection; requests in
// flight fail with ErrClosed. It is idempotent.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		var wg sync.WaitGroup
		for _, cn := range c.conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cn.close()
			}()
		}
		wg.Wait()
	})
	return nil
}

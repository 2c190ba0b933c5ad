package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/bits"
	"net"
	"net/url"
	"os"
	"strings"
	"time"
)

// negotiated is what the handshake of one connection established.
type negotiated struct {
	size              int64
	flags             uint16
	minBS, prefBS     uint32
	maxBS             uint32
	structured        bool
	metaIDs           map[string]uint32
	fellBackToOldName bool // NBD_OPT_GO unsupported: NBD_OPT_EXPORT_NAME was used
}

// target is where to dial, parsed from an address or NBD URI.
type target struct {
	network, address, export string
	tls                      bool // nbds:// or nbds+unix://
}

// parseAddr understands "unix:/path", "tcp:host:port", a bare absolute socket
// path, and the NBD URIs nbd://host[:port]/EXPORT and nbd+unix:///EXPORT?socket=PATH
// (and their nbds forms, which require TLS).
func parseAddr(addr string) (target, error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		return target{network: "unix", address: strings.TrimPrefix(addr, "unix:")}, nil
	case strings.HasPrefix(addr, "tcp:"):
		return target{network: "tcp", address: strings.TrimPrefix(addr, "tcp:")}, nil
	case strings.HasPrefix(addr, "/"):
		return target{network: "unix", address: addr}, nil
	case strings.Contains(addr, "://"):
	default:
		return target{}, fmt.Errorf("nbd: address %q not understood: use unix:/path/to/sock, tcp:host:port, nbd://host:port/EXPORT or nbd+unix:///EXPORT?socket=/path", addr)
	}
	u, err := url.Parse(addr)
	if err != nil {
		return target{}, fmt.Errorf("nbd: address %q is not a valid NBD URI: %w", addr, err)
	}
	t := target{export: strings.TrimPrefix(u.Path, "/")}
	switch u.Scheme {
	case "nbd", "nbds":
		host := u.Host
		if host == "" {
			return target{}, fmt.Errorf("nbd: URI %q has no host: use nbd://host:port/EXPORT", addr)
		}
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "10809")
		}
		t.network, t.address = "tcp", host
	case "nbd+unix", "nbds+unix":
		t.network, t.address = "unix", u.Query().Get("socket")
		if t.address == "" {
			return target{}, fmt.Errorf("nbd: URI %q has no socket: use nbd+unix:///EXPORT?socket=/path", addr)
		}
	default:
		return target{}, fmt.Errorf("nbd: URI scheme %q not supported: use nbd://, nbds://, nbd+unix:// or nbds+unix://", u.Scheme)
	}
	t.tls = strings.HasPrefix(u.Scheme, "nbds")
	return t, nil
}

// Dial connects to an NBD export. addr is "unix:/path/to/sock", "tcp:host:port" or
// an NBD URI (nbd+unix:///EXPORT?socket=/path, nbd://host:port/EXPORT), in which case
// export may be "" to use the URI's. It negotiates the fixed newstyle handshake,
// structured replies, opts.MetaContexts and NBD_OPT_GO, and opens up to
// opts.Connections connections when the server advertises multi-conn.
func Dial(ctx context.Context, addr, export string, opts Options) (*Client, error) {
	opts = opts.withDefaults()
	t, err := parseAddr(addr)
	if err != nil {
		return nil, err
	}
	if export == "" {
		export = t.export
	}
	if len(export) > maxString {
		return nil, fmt.Errorf("nbd: export name of %d bytes is longer than the protocol's %d", len(export), maxString)
	}
	if t.tls && opts.TLS == nil {
		return nil, fmt.Errorf("nbd: %q asks for TLS: set Options.TLS", addr)
	}
	if opts.TLS != nil && opts.TLS.ServerName == "" && t.network == "tcp" {
		cfg := opts.TLS.Clone()
		if host, _, err := net.SplitHostPort(t.address); err == nil {
			cfg.ServerName = host
		}
		opts.TLS = cfg
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.Timeout)
		defer cancel()
	}
	if opts.Stall > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, opts.Stall, ErrStalled)
		defer cancel()
	}
	name := t.network + ":" + t.address
	if export != "" {
		name += " export " + fmt.Sprintf("%q", export)
	}

	first, n, err := dialConn(ctx, t, export, opts, name)
	if err != nil {
		return nil, err
	}
	c := &Client{
		name:      name,
		size:      n.size,
		flags:     n.flags,
		minBS:     n.minBS,
		prefBS:    n.prefBS,
		maxBS:     n.maxBS,
		metaNames: append([]string(nil), opts.MetaContexts...),
		conns:     []*conn{first},
	}
	c.step = int64(min(n.maxBS, maxRequest)) / int64(n.minBS) * int64(n.minBS)
	first.start()
	want := 1
	if n.flags&tfCanMultiConn != 0 {
		want = opts.Connections
	}
	for len(c.conns) < want {
		// A server at its client limit may leave an extra connection waiting
		// in its backlog rather than refuse it: bound the wait.
		ectx, cancel := context.WithTimeout(ctx, min(opts.Timeout, extraConnBound))
		cn, n2, err := dialConn(ectx, t, export, opts, name)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				c.Close()
				return nil, err
			}
			// The server may cap its clients (qemu-nbd --shared): fewer
			// connections are slower, not wrong.
			slog.Warn("nbd: using fewer connections than asked", "server", name, "connections", len(c.conns), "wanted", want, "err", err)
			break
		}
		if n2.size != n.size || n2.flags != n.flags {
			cn.nc.Close()
			c.Close()
			return nil, fmt.Errorf("nbd: %s: connections disagree (size %d flags %#x, then size %d flags %#x); the export changed while dialing, dial again", name, n.size, n.flags, n2.size, n2.flags)
		}
		cn.start()
		c.conns = append(c.conns, cn)
	}
	return c, nil
}

func dialConn(ctx context.Context, t target, export string, opts Options, name string) (*conn, negotiated, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, t.network, t.address)
	if err != nil {
		return nil, negotiated{}, fmt.Errorf("nbd: dial %s: %w; is the NBD server running?", name, err)
	}
	// The handshake honours ctx: its deadline directly, a cancel by a deadline in the past.
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	h := &handshake{nc: nc, br: bufio.NewReaderSize(nc, 64<<10), name: name}
	n, err := h.run(export, opts)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err == nil {
		err = h.nc.SetDeadline(time.Time{})
	}
	if err != nil {
		h.nc.Close()
		if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
			<-ctx.Done() // the socket's deadline is ctx's: its timer fires at once
		}
		var cause error
		if ctx.Err() != nil {
			cause = context.Cause(ctx)
		}
		if cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%w)", err, cause)
		}
		return nil, negotiated{}, err
	}
	return newConn(h.nc, h.br, name, n, opts), n, nil
}

type handshake struct {
	nc       net.Conn
	br       *bufio.Reader
	name     string
	noZeroes bool // NBD_FLAG_C_NO_ZEROES agreed
}

func (h *handshake) errorf(format string, args ...any) error {
	return fmt.Errorf("nbd: handshake with %s: %s", h.name, fmt.Sprintf(format, args...))
}

func (h *handshake) ioErr(what string, err error) error {
	return fmt.Errorf("nbd: handshake with %s: %s: %w", h.name, what, err)
}

func (h *handshake) run(export string, opts Options) (negotiated, error) {
	var n negotiated
	var b [18]byte
	if _, err := io.ReadFull(h.br, b[:18]); err != nil {
		return n, h.ioErr("reading the greeting", err)
	}
	if m := binary.BigEndian.Uint64(b[0:]); m != nbdMagic {
		return n, h.errorf("not an NBD server (greeting %#016x)", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case optsMagic:
	case oldstyleMagic:
		return n, h.errorf("server speaks the oldstyle handshake, which is not supported; use qemu-nbd, qemu-storage-daemon or nbdkit")
	default:
		return n, h.errorf("unknown handshake magic %#016x", m)
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	if hflags&flagFixedNewstyle == 0 {
		return n, h.errorf("server does not offer the fixed newstyle handshake")
	}
	h.noZeroes = hflags&flagNoZeroes != 0
	var cf [4]byte
	binary.BigEndian.PutUint32(cf[:], uint32(flagFixedNewstyle|hflags&flagNoZeroes))
	if _, err := h.nc.Write(cf[:]); err != nil {
		return n, h.ioErr("sending client flags", err)
	}

	if opts.TLS != nil {
		if err := h.startTLS(opts.TLS); err != nil {
			return n, err
		}
	}

	if err := h.sendOpt(optStructured, nil); err != nil {
		return n, err
	}
	typ, data, err := h.readOptReply(optStructured)
	if err != nil {
		return n, err
	}
	switch {
	case typ == repAck:
		n.structured = true
	case typ == repErrBit+1: // NBD_REP_ERR_UNSUP: an old server, simple replies only
	default:
		return n, h.optError(optStructured, typ, data)
	}

	if len(opts.MetaContexts) > 0 {
		if !n.structured {
			return n, h.errorf("server does not support structured replies, so meta contexts %q cannot be used", opts.MetaContexts)
		}
		if n.metaIDs, err = h.setMetaContexts(export, opts.MetaContexts); err != nil {
			return n, err
		}
	}

	if err := h.optGo(export, &n); err != nil {
		return n, err
	}
	if n.minBS == 0 {
		n.minBS, n.prefBS, n.maxBS = 1, 4096, defaultMaxBlock
	}
	return n, nil
}

func (h *handshake) startTLS(cfg *tls.Config) error {
	if err := h.sendOpt(optStartTLS, nil); err != nil {
		return err
	}
	typ, data, err := h.readOptReply(optStartTLS)
	if err != nil {
		return err
	}
	if typ != repAck {
		return h.optError(optStartTLS, typ, data)
	}
	if h.br.Buffered() != 0 {
		return h.errorf("server sent data after accepting STARTTLS")
	}
	tc := tls.Client(h.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return h.ioErr("TLS handshake (check Options.TLS: CA, certificate, server name)", err)
	}
	h.nc = tc
	h.br = bufio.NewReaderSize(tc, 64<<10)
	return nil
}

func (h *handshake) sendOpt(opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], optsMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	if _, err := h.nc.Write(b); err != nil {
		return h.ioErr(fmt.Sprintf("sending %s", optName(opt)), err)
	}
	return nil
}

// readOptReply reads one option reply, refusing payloads larger than any reply
// this client asks for can need.
func (h *handshake) readOptReply(opt uint32) (uint32, []byte, error) {
	var b [20]byte
	if _, err := io.ReadFull(h.br, b[:]); err != nil {
		return 0, nil, h.ioErr(fmt.Sprintf("reading the reply to %s", optName(opt)), err)
	}
	if m := binary.BigEndian.Uint64(b[0:]); m != optReplyMagic {
		return 0, nil, h.errorf("reply to %s has bad magic %#016x", optName(opt), m)
	}
	if o := binary.BigEndian.Uint32(b[8:]); o != opt {
		return 0, nil, h.errorf("reply to %s names option %d", optName(opt), o)
	}
	typ := binary.BigEndian.Uint32(b[12:])
	n := binary.BigEndian.Uint32(b[16:])
	if n > maxOptReply {
		return 0, nil, h.errorf("reply to %s of %d bytes, more than the %d accepted", optName(opt), n, maxOptReply)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(h.br, data); err != nil {
		return 0, nil, h.ioErr(fmt.Sprintf("reading the reply to %s", optName(opt)), err)
	}
	return typ, data, nil
}

func (h *handshake) optError(opt, typ uint32, data []byte) error {
	msg := ""
	if typ&repErrBit != 0 && len(data) > 0 {
		msg = ": " + cleanMessage(data[:min(len(data), maxString)])
	}
	var why string
	switch typ {
	case repErrBit + 1:
		why = "not supported by the server"
	case repErrBit + 2:
		why = "refused by server policy"
	case repErrBit + 3:
		why = "rejected as invalid"
	case repErrBit + 4:
		why = "not supported on the server's platform"
	case repErrBit + 5:
		why = "refused: the server requires TLS (set Options.TLS)"
	case repErrBit + 6:
		why = "refused: no such export (check the export name)"
	case repErrBit + 7:
		why = "refused: the server is shutting down"
	case repErrBit + 8:
		why = "refused: block size negotiation required"
	case repErrBit + 9:
		why = "refused: request too big"
	default:
		if typ&repErrBit != 0 {
			why = fmt.Sprintf("refused with error %#x", typ)
		} else {
			why = fmt.Sprintf("answered with unexpected reply type %d", typ)
		}
	}
	return h.errorf("%s %s%s", optName(opt), why, msg)
}

func putString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

func (h *handshake) setMetaContexts(export string, want []string) (map[string]uint32, error) {
	data := putString(nil, export)
	data = binary.BigEndian.AppendUint32(data, uint32(len(want)))
	for _, q := range want {
		if len(q) == 0 || len(q) > maxString {
			return nil, h.errorf("meta context name %q is empty or longer than %d bytes", q, maxString)
		}
		data = putString(data, q)
	}
	if err := h.sendOpt(optSetMetaContext, data); err != nil {
		return nil, err
	}
	ids := make(map[string]uint32)
	seen := make(map[uint32]string)
	for range maxOptReplies {
		typ, data, err := h.readOptReply(optSetMetaContext)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repAck:
			for _, q := range want {
				if _, ok := ids[q]; !ok {
					hint := ""
					if strings.HasPrefix(q, ContextDirtyBitmap) {
						hint = " (the export must publish the bitmap: block-export-add bitmaps=[NAME], qemu-nbd -B NAME)"
					}
					return nil, h.errorf("server did not grant meta context %q%s", q, hint)
				}
			}
			return ids, nil
		case repMetaContext:
			if len(data) < 5 {
				return nil, h.errorf("meta context reply of %d bytes", len(data))
			}
			id := binary.BigEndian.Uint32(data)
			name := string(data[4:])
			if other, dup := seen[id]; dup && other != name {
				return nil, h.errorf("server gave meta contexts %q and %q the same id %d", other, name, id)
			}
			seen[id] = name
			ids[name] = id
		default:
			return nil, h.optError(optSetMetaContext, typ, data)
		}
	}
	return nil, h.errorf("server sent more than %d replies to %s", maxOptReplies, optName(optSetMetaContext))
}

func (h *handshake) optGo(export string, n *negotiated) error {
	data := putString(nil, export)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	if err := h.sendOpt(optGo, data); err != nil {
		return err
	}
	haveExport := false
	for range maxOptReplies {
		typ, data, err := h.readOptReply(optGo)
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			if !haveExport {
				return h.errorf("server finished %s without describing the export", optName(optGo))
			}
			return nil
		case repInfo:
			if len(data) < 2 {
				return h.errorf("info reply of %d bytes", len(data))
			}
			switch binary.BigEndian.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return h.errorf("export info of %d bytes, want 12", len(data))
				}
				size := binary.BigEndian.Uint64(data[2:])
				if size > math.MaxInt64 {
					return h.errorf("export size %d too large", size)
				}
				n.size, n.flags = int64(size), binary.BigEndian.Uint16(data[10:])
				haveExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return h.errorf("block size info of %d bytes, want 14", len(data))
				}
				mn, pr, mx := binary.BigEndian.Uint32(data[2:]), binary.BigEndian.Uint32(data[6:]), binary.BigEndian.Uint32(data[10:])
				if err := checkBlockSizes(mn, pr, mx); err != nil {
					return h.errorf("%v", err)
				}
				n.minBS, n.prefBS, n.maxBS = mn, pr, mx
			}
		case repErrBit + 1: // NBD_OPT_GO unknown: an old server
			return h.exportName(export, n)
		default:
			return h.optError(optGo, typ, data)
		}
	}
	return h.errorf("server sent more than %d replies to %s", maxOptReplies, optName(optGo))
}

func checkBlockSizes(mn, pr, mx uint32) error {
	pow2 := func(v uint32) bool { return v != 0 && bits.OnesCount32(v) == 1 }
	if !pow2(mn) || mn > 64<<10 || !pow2(pr) || pr < mn || mx < mn || (mx%mn != 0 && mx != math.MaxUint32) {
		return fmt.Errorf("server advertised invalid block sizes min %d preferred %d max %d", mn, pr, mx)
	}
	return nil
}

// exportName ends the handshake the old way, for servers without NBD_OPT_GO.
func (h *handshake) exportName(export string, n *negotiated) error {
	if err := h.sendOpt(optExportName, []byte(export)); err != nil {
		return err
	}
	var b [10]byte
	if _, err := io.ReadFull(h.br, b[:]); err != nil {
		return h.ioErr(fmt.Sprintf("export %q not available (server closed on NBD_OPT_EXPORT_NAME)", export), err)
	}
	size := binary.BigEndian.Uint64(b[:])
	if size > math.MaxInt64 {
		return h.errorf("export size %d too large", size)
	}
	n.size, n.flags = int64(size), binary.BigEndian.Uint16(b[8:])
	n.fellBackToOldName = true
	if !h.noZeroes { // 124 zero bytes follow unless NO_ZEROES was agreed
		if _, err := h.br.Discard(124); err != nil {
			return h.ioErr("reading the export description", err)
		}
	}
	return nil
}

func optName(opt uint32) string {
	switch opt {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optStartTLS:
		return "NBD_OPT_STARTTLS"
	case optGo:
		return "NBD_OPT_GO"
	case optStructured:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return fmt.Sprintf("option %d", opt)
}

package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
)

// fakeServer is a deliberately broken NBD server written in Go for the tests:
// it produces handshakes and replies that qemu and nbdkit never send, so that
// the client's handling of hostile or buggy servers can be tested. Everything
// a real server can produce is tested against real servers instead.
type fakeServer struct {
	size       uint64
	flags      uint16 // transmission flags; tfHasFlags is added
	blockSizes *[3]uint32
	contexts   map[string]uint32 // granted meta contexts
	noStruct   bool              // refuse structured replies
	// option, if set, may answer an option itself (returning true).
	option func(w io.Writer, opt uint32, data []byte) bool
	// greeting, if set, replaces the whole handshake.
	greeting func(rw io.ReadWriter)
	// handle answers one transmission request; returning false closes the connection.
	handle func(w *replies, req fakeRequest) bool
}

type fakeRequest struct {
	flags, cmd uint16
	cookie     uint64
	off        uint64
	length     uint32
	payload    []byte
}

// start listens on a unix socket and serves until the test ends.
func (s *fakeServer) start(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "fake.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer nc.Close()
				s.serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, nc := range conns {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "unix:" + sock
}

func (s *fakeServer) serve(nc net.Conn) {
	br := bufio.NewReader(nc)
	rw := struct {
		io.Reader
		io.Writer
	}{br, nc}
	if s.greeting != nil {
		s.greeting(rw)
		return
	}
	var b []byte
	b = binary.BigEndian.AppendUint64(b, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, optsMagic)
	b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	nc.Write(b)
	var cf [4]byte
	if _, err := io.ReadFull(br, cf[:]); err != nil {
		return
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(br, data); err != nil {
			return
		}
		if s.option != nil && s.option(nc, opt, data) {
			continue
		}
		switch opt {
		case optStructured:
			if s.noStruct {
				optReply(nc, opt, repErrBit+1, nil)
			} else {
				optReply(nc, opt, repAck, nil)
			}
		case optSetMetaContext:
			n := binary.BigEndian.Uint32(data)
			rest := data[4+n:]
			count := binary.BigEndian.Uint32(rest)
			rest = rest[4:]
			for range count {
				l := binary.BigEndian.Uint32(rest)
				name := string(rest[4 : 4+l])
				rest = rest[4+l:]
				if id, ok := s.contexts[name]; ok {
					optReply(nc, opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), name...))
				}
			}
			optReply(nc, opt, repAck, nil)
		case optGo:
			info := binary.BigEndian.AppendUint16(nil, infoExport)
			info = binary.BigEndian.AppendUint64(info, s.size)
			info = binary.BigEndian.AppendUint16(info, s.flags|tfHasFlags)
			optReply(nc, opt, repInfo, info)
			if bs := s.blockSizes; bs != nil {
				info := binary.BigEndian.AppendUint16(nil, infoBlockSize)
				for _, v := range bs {
					info = binary.BigEndian.AppendUint32(info, v)
				}
				optReply(nc, opt, repInfo, info)
			}
			optReply(nc, opt, repAck, nil)
			s.transmission(br, nc)
			return
		default:
			optReply(nc, opt, repErrBit+1, nil)
		}
	}
}

func (s *fakeServer) transmission(br *bufio.Reader, nc net.Conn) {
	w := &replies{w: nc}
	for {
		var h [28]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return
		}
		req := fakeRequest{
			flags:  binary.BigEndian.Uint16(h[4:]),
			cmd:    binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		if req.cmd == cmdWrite {
			req.payload = make([]byte, req.length)
			if _, err := io.ReadFull(br, req.payload); err != nil {
				return
			}
		}
		if req.cmd == cmdDisc {
			return
		}
		if s.handle == nil || !s.handle(w, req) {
			return
		}
	}
}

func optReply(w io.Writer, opt, typ uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, optReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	w.Write(append(b, data...))
}

// replies builds transmission-phase replies, well-formed or not. It serves the
// fake server and the fuzz seeds alike.
type replies struct {
	w   io.Writer // nil: only accumulate into buf
	buf []byte
}

func (r *replies) flush() {
	if r.w != nil {
		r.w.Write(r.buf)
		r.buf = r.buf[:0]
	}
}

func (r *replies) simple(cookie uint64, errno uint32, data []byte) *replies {
	r.buf = binary.BigEndian.AppendUint32(r.buf, simpleReplyMagic)
	r.buf = binary.BigEndian.AppendUint32(r.buf, errno)
	r.buf = binary.BigEndian.AppendUint64(r.buf, cookie)
	r.buf = append(r.buf, data...)
	r.flush()
	return r
}

// chunk writes a structured reply chunk whose length field is len(payload),
// unless length is given.
func (r *replies) chunk(flags, typ uint16, cookie uint64, payload []byte, length ...uint32) *replies {
	r.buf = binary.BigEndian.AppendUint32(r.buf, structReplyMagic)
	r.buf = binary.BigEndian.AppendUint16(r.buf, flags)
	r.buf = binary.BigEndian.AppendUint16(r.buf, typ)
	r.buf = binary.BigEndian.AppendUint64(r.buf, cookie)
	l := uint32(len(payload))
	if len(length) > 0 {
		l = length[0]
	}
	r.buf = binary.BigEndian.AppendUint32(r.buf, l)
	r.buf = append(r.buf, payload...)
	r.flush()
	return r
}

func (r *replies) data(flags uint16, cookie, off uint64, data []byte) *replies {
	return r.chunk(flags, chunkOffsetData, cookie, append(binary.BigEndian.AppendUint64(nil, off), data...))
}

func (r *replies) hole(flags uint16, cookie, off uint64, n uint32) *replies {
	return r.chunk(flags, chunkOffsetHole, cookie, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, off), n))
}

func (r *replies) status(flags uint16, cookie uint64, id uint32, ext ...uint32) *replies {
	p := binary.BigEndian.AppendUint32(nil, id)
	for _, v := range ext {
		p = binary.BigEndian.AppendUint32(p, v)
	}
	return r.chunk(flags, chunkBlockStatus, cookie, p)
}

func (r *replies) errorChunk(flags, typ uint16, cookie uint64, errno uint32, msg string, tail []byte) *replies {
	p := binary.BigEndian.AppendUint32(nil, errno)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	p = append(append(p, msg...), tail...)
	return r.chunk(flags, typ, cookie, p)
}

func (r *replies) done(cookie uint64) *replies { return r.chunk(replyFlagDone, chunkNone, cookie, nil) }

package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"testing"
	"time"
)

// The fuzz targets feed arbitrary server bytes to the reply parser and to the
// handshake. The seeds below run in every `go test`; `go test -fuzz=FuzzReplies`
// explores further. Properties: no panic, termination, and every request that
// completes successfully is whole (a read fully covered, extents contiguous).

// fuzzRequests are the requests pending when the fuzzed replies arrive.
func fuzzRequests() []*request {
	return []*request{
		{cmd: cmdRead, cookie: 1, off: 1000, length: 4096, buf: make([]byte, 4096)},
		{cmd: cmdBlockStatus, cookie: 2, off: 0, length: 1 << 20, metaID: 1, metaCtx: ContextBaseAllocation},
		{cmd: cmdWrite, cookie: 3, off: 0, length: 512},
		{cmd: cmdRead, cookie: 4, off: 0, length: 1, buf: make([]byte, 1)},
	}
}

func fuzzReplySeeds() [][]byte {
	var seeds [][]byte
	add := func(r *replies) { seeds = append(seeds, append([]byte{1}, r.buf...)) }
	add(new(replies).
		data(replyFlagDone, 1, 1000, bytes.Repeat([]byte{9}, 4096)).
		status(replyFlagDone, 2, 1, 65536, 0, 1<<20-65536, 3).
		simple(3, 0, nil).
		simple(4, 0, []byte{42}))
	add(new(replies).
		hole(0, 1, 1000, 1000).
		data(0, 1, 2000, bytes.Repeat([]byte{1}, 3096)).
		done(1).
		status(0, 2, 2, 4096, 1).
		status(replyFlagDone, 2, 1, 4096, 0))
	add(new(replies).
		data(0, 1, 3000, make([]byte, 2096)).
		data(0, 1, 1000, make([]byte, 2000)).
		errorChunk(0, chunkErrorOffset, 1, 5, "bad sector", binary.BigEndian.AppendUint64(nil, 1500)).
		done(1).
		errorChunk(replyFlagDone, chunkError, 2, 22, "no", nil).
		simple(3, 28, nil))
	add(new(replies).chunk(replyFlagDone, chunkOffsetData, 1, nil, 0xffffffff))
	add(new(replies).status(replyFlagDone, 2, 1, 0, 0))
	add(new(replies).errorChunk(replyFlagDone, chunkErrBit+7, 4, 1, "odd", []byte{1, 2, 3}))
	// Simple replies only (first byte 0: structured replies not negotiated).
	seeds = append(seeds, append([]byte{0}, new(replies).simple(1, 0, make([]byte, 4096)).simple(4, 5, nil).buf...))
	return seeds
}

func FuzzReplies(f *testing.F) {
	for _, s := range fuzzReplySeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		reqs := fuzzRequests()
		c := &conn{
			br:         bufio.NewReader(bytes.NewReader(data[1:])),
			name:       "fuzz",
			structured: data[0]&1 != 0,
			metaByID:   map[uint32]string{1: ContextBaseAllocation, 2: ContextDirtyBitmap + "b"},
			sem:        make(chan struct{}, len(reqs)),
			pending:    make(map[uint64]*request),
			timeout:    time.Second,
		}
		for _, r := range reqs {
			r.done = make(chan struct{})
			c.pending[r.cookie] = r
			c.sem <- struct{}{}
		}
		errc := make(chan error, 1)
		go func() { errc <- c.readReplies() }()
		var err error
		select {
		case err = <-errc:
		case <-time.After(3 * time.Second):
			t.Fatalf("readReplies did not return within 3s on input %x", data)
		}
		if err == nil {
			t.Fatal("readReplies returned without error at the end of the input")
		}
		for _, r := range reqs {
			select {
			case <-r.done:
			default:
				continue
			}
			if r.err != nil {
				continue
			}
			switch r.cmd {
			case cmdRead:
				if r.covered != uint64(r.length) || !r.fullyCovered() {
					t.Fatalf("read %d succeeded with %d of %d bytes", r.cookie, r.covered, r.length)
				}
			case cmdBlockStatus:
				if len(r.extents) == 0 || r.extents[0].Offset != int64(r.off) {
					t.Fatalf("block status succeeded with extents %v", r.extents)
				}
				for i, e := range r.extents {
					if e.Length <= 0 || (i > 0 && r.extents[i-1].End() != e.Offset) {
						t.Fatalf("block status extents not contiguous: %v", r.extents)
					}
				}
			}
		}
	})
}

// pipeConn is a net.Conn whose reads come from a fixed byte stream and whose
// writes vanish: the handshake under fuzz needs nothing else.
type pipeConn struct {
	net.Conn
	r io.Reader
}

func (p pipeConn) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p pipeConn) Write(b []byte) (int, error) { return len(b), nil }

// serverTranscript is what a well-behaved server sends for the handshake Dial
// performs with MetaContexts {base:allocation}; without NBD_OPT_GO when old.
func serverTranscript(old bool) []byte {
	var b bytes.Buffer
	b.Write(binary.BigEndian.AppendUint64(nil, nbdMagic))
	b.Write(binary.BigEndian.AppendUint64(nil, optsMagic))
	b.Write(binary.BigEndian.AppendUint16(nil, flagFixedNewstyle|flagNoZeroes))
	optReply(&b, optStructured, repAck, nil)
	optReply(&b, optSetMetaContext, repMetaContext, append(binary.BigEndian.AppendUint32(nil, 1), ContextBaseAllocation...))
	optReply(&b, optSetMetaContext, repAck, nil)
	if old {
		optReply(&b, optGo, repErrBit+1, []byte("unknown option"))
		b.Write(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64(nil, 1<<20), tfHasFlags))
		return b.Bytes()
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, 1<<30)
	optReply(&b, optGo, repInfo, binary.BigEndian.AppendUint16(info, tfHasFlags|tfFlush|tfCanMultiConn))
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, 512)
	bs = binary.BigEndian.AppendUint32(bs, 4096)
	optReply(&b, optGo, repInfo, binary.BigEndian.AppendUint32(bs, 32<<20))
	optReply(&b, optGo, repAck, nil)
	return b.Bytes()
}

func FuzzHandshake(f *testing.F) {
	good := serverTranscript(false)
	f.Add(good)
	f.Add(good[:40])
	f.Add(serverTranscript(true))
	f.Fuzz(func(t *testing.T, data []byte) {
		h := &handshake{nc: pipeConn{r: bytes.NewReader(data)}, name: "fuzz"}
		h.br = bufio.NewReader(h.nc)
		n, err := h.run("", Options{MetaContexts: []string{ContextBaseAllocation}})
		if err != nil {
			return
		}
		if _, ok := n.metaIDs[ContextBaseAllocation]; !ok {
			t.Fatalf("handshake succeeded without the meta context: %+v", n)
		}
		if err := checkBlockSizes(n.minBS, n.prefBS, n.maxBS); err != nil || n.size < 0 {
			t.Fatalf("handshake succeeded with %+v: %v", n, err)
		}
	})
}

// TestHandshakeTranscript checks the fuzz seed itself is a successful handshake,
// so the fuzzer starts from the interesting side.
func TestHandshakeTranscript(t *testing.T) {
	for _, old := range []bool{false, true} {
		h := &handshake{nc: pipeConn{r: bytes.NewReader(serverTranscript(old))}, name: "seed"}
		h.br = bufio.NewReader(h.nc)
		n, err := h.run("", Options{MetaContexts: []string{ContextBaseAllocation}})
		if err != nil {
			t.Fatalf("old %v: %v", old, err)
		}
		wantSize, wantMin := int64(1<<30), uint32(512)
		if old {
			wantSize, wantMin = 1<<20, 1 // NBD_OPT_EXPORT_NAME: no block sizes
		}
		if n.size != wantSize || n.minBS != wantMin || n.metaIDs[ContextBaseAllocation] != 1 || !n.structured || n.fellBackToOldName != old {
			t.Fatalf("old %v: negotiated %+v", old, n)
		}
	}
}

// TestReplySeed checks the first fuzz seed answers every request successfully,
// with the data and extents it carries.
func TestReplySeed(t *testing.T) {
	data := fuzzReplySeeds()[0]
	reqs := fuzzRequests()
	c := &conn{br: bufio.NewReader(bytes.NewReader(data[1:])), name: "seed", structured: true,
		metaByID: map[uint32]string{1: ContextBaseAllocation}, sem: make(chan struct{}, len(reqs)), pending: map[uint64]*request{}}
	for _, r := range reqs {
		r.done = make(chan struct{})
		c.pending[r.cookie] = r
		c.sem <- struct{}{}
	}
	if err := c.readReplies(); err == nil || !bytes.Contains([]byte(err.Error()), []byte("EOF")) {
		t.Fatalf("readReplies = %v; want EOF at the end of the seed", err)
	}
	for _, r := range reqs {
		select {
		case <-r.done:
		default:
			t.Fatalf("request %d not answered", r.cookie)
		}
		if r.err != nil {
			t.Fatalf("request %d: %v", r.cookie, r.err)
		}
	}
	if !bytes.Equal(reqs[0].buf, bytes.Repeat([]byte{9}, 4096)) || reqs[3].buf[0] != 42 {
		t.Error("read data not delivered into the buffers")
	}
	if want := []Extent{{0, 65536, 0}, {65536, 1<<20 - 65536, 3}}; !slices.Equal(reqs[1].extents, want) {
		t.Errorf("extents %v; want %v", reqs[1].extents, want)
	}
}

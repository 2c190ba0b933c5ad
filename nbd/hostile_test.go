package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests in this file talk to fakeServer, a deliberate fake that sends what
// real servers never do. Each case must end in a clear error within a bound:
// no panic, no hang, no unbounded allocation.

const fakeSize = 1 << 20

func fakeOpts() Options {
	return Options{MetaContexts: []string{ContextBaseAllocation}, Timeout: 2 * time.Second}
}

// TestHostileReplies: each handler answers a read of 4096 bytes at 8192 (cookie
// given), or a block-status of 64 KiB at 0, in a broken way.
func TestHostileReplies(t *testing.T) {
	const off, n = 8192, 4096
	good := bytes.Repeat([]byte{7}, n)
	for _, tc := range []struct {
		name        string
		blockStatus bool // issue BlockStatus(0, 64k) instead of Read(off, n)
		handle      func(w *replies, r fakeRequest) bool
		wantProto   bool          // the request fails with ErrProtocol and the connection is dropped
		wantErrno   syscall.Errno // the request fails with this server error; the connection lives
		wantErrText string        // the error mentions this
		wantExtents []Extent      // block status succeeds with these
		laterProto  bool          // the request succeeds, the next one finds the connection dropped
	}{
		{name: "unknown cookie", wantProto: true, wantErrText: "unknown cookie",
			handle: func(w *replies, r fakeRequest) bool { w.data(replyFlagDone, r.cookie+1000, r.off, good); return true }},
		{name: "bad magic", wantProto: true, wantErrText: "bad magic",
			handle: func(w *replies, r fakeRequest) bool { w.w.Write([]byte{0xde, 0xad, 0xbe, 0xef}); return true }},
		{name: "data chunk longer than the request", wantProto: true, wantErrText: "data chunk of length",
			handle: func(w *replies, r fakeRequest) bool {
				w.data(replyFlagDone, r.cookie, r.off, make([]byte, n+1))
				return true
			}},
		{name: "data chunk length field huge", wantProto: true, wantErrText: "data chunk of length",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkOffsetData, r.cookie, nil, 0xffffffff)
				return true
			}},
		{name: "data chunk before the request", wantProto: true, wantErrText: "outside",
			handle: func(w *replies, r fakeRequest) bool { w.data(replyFlagDone, r.cookie, r.off-1, good); return true }},
		{name: "data chunk offset overflows", wantProto: true, wantErrText: "outside",
			handle: func(w *replies, r fakeRequest) bool {
				w.data(replyFlagDone, r.cookie, ^uint64(0)-10, good[:100])
				return true
			}},
		{name: "overlapping chunks", wantProto: true, wantErrText: "overlap",
			handle: func(w *replies, r fakeRequest) bool {
				w.data(0, r.cookie, r.off, good[:3000]).data(replyFlagDone, r.cookie, r.off+2000, good[:2096])
				return true
			}},
		{name: "overlap hides a gap", wantProto: true, wantErrText: "claimed success",
			handle: func(w *replies, r fakeRequest) bool {
				// Byte count adds up, coverage does not.
				w.data(0, r.cookie, r.off+1000, good[:1000]).hole(0, r.cookie, r.off+1000, 1000).data(replyFlagDone, r.cookie, r.off+2000, good[:2096])
				return true
			}},
		{name: "success without all data", wantProto: true, wantErrText: "claimed success",
			handle: func(w *replies, r fakeRequest) bool {
				w.data(0, r.cookie, r.off, good[:100]).done(r.cookie)
				return true
			}},
		{name: "unknown chunk type", wantProto: true, wantErrText: "unknown reply chunk type",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, 77, r.cookie, []byte{1, 2, 3})
				return true
			}},
		{name: "NONE without DONE", wantProto: true, wantErrText: "NBD_REPLY_TYPE_NONE",
			handle: func(w *replies, r fakeRequest) bool { w.chunk(0, chunkNone, r.cookie, nil); return true }},
		{name: "error message longer than chunk", wantProto: true, wantErrText: "message length",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkError, r.cookie, []byte{0, 0, 0, 5, 0x10, 0, 'x'})
				return true
			}},
		{name: "error chunk length huge", wantProto: true, wantErrText: "error chunk",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkError, r.cookie, nil, 1<<30)
				return true
			}},
		{name: "error offset outside the request", wantProto: true, wantErrText: "error offset",
			handle: func(w *replies, r fakeRequest) bool {
				w.errorChunk(replyFlagDone, chunkErrorOffset, r.cookie, 5, "bad", binary.BigEndian.AppendUint64(nil, 1))
				return true
			}},
		{name: "unknown error chunk type", wantErrno: syscall.ENOSPC, wantErrText: "disk full",
			handle: func(w *replies, r fakeRequest) bool {
				w.errorChunk(0, chunkErrBit+99, r.cookie, 28, "disk full\x00\n", []byte{1, 2}).done(r.cookie)
				return true
			}},
		{name: "error offset then more data", wantErrno: syscall.EIO, wantErrText: "offset 10000",
			handle: func(w *replies, r fakeRequest) bool {
				w.data(0, r.cookie, r.off, good[:2000]).
					errorChunk(0, chunkErrorOffset, r.cookie, 5, "", binary.BigEndian.AppendUint64(nil, 10000)).
					data(replyFlagDone, r.cookie, r.off+2000, good[:2096])
				return true
			}},
		{name: "unknown errno", wantErrno: syscall.EINVAL,
			handle: func(w *replies, r fakeRequest) bool { w.simple(r.cookie, 12345, nil); return true }},
		{name: "reply twice", laterProto: true,
			handle: func(w *replies, r fakeRequest) bool {
				w.data(replyFlagDone, r.cookie, r.off, good).data(replyFlagDone, r.cookie, r.off, good)
				return true
			}},
		{name: "closed in the middle of data", wantErrText: "closed the connection",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkOffsetData, r.cookie, append(binary.BigEndian.AppendUint64(nil, r.off), good[:10]...), n+8)
				return false
			}},
		{name: "never answers", wantErrText: "no reply in time",
			handle: func(w *replies, r fakeRequest) bool { return true }},
		{name: "stalls in the middle of data", wantErrText: "no reply in time",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkOffsetData, r.cookie, append(binary.BigEndian.AppendUint64(nil, r.off), good[:10]...), n+8)
				return true
			}},

		{name: "status chunk for a read", wantProto: true, wantErrText: "block-status chunk in reply to read",
			handle: func(w *replies, r fakeRequest) bool { w.status(replyFlagDone, r.cookie, 1, 4096, 0); return true }},
		{name: "status length huge", blockStatus: true, wantProto: true, wantErrText: "block-status chunk of length",
			handle: func(w *replies, r fakeRequest) bool {
				w.chunk(replyFlagDone, chunkBlockStatus, r.cookie, nil, 0xfffffff4)
				return true
			}},
		{name: "status zero-length extent", blockStatus: true, wantProto: true, wantErrText: "zero-length extent",
			handle: func(w *replies, r fakeRequest) bool { w.status(replyFlagDone, r.cookie, 1, 4096, 0, 0, 3); return true }},
		{name: "status unknown context", blockStatus: true, wantProto: true, wantErrText: "never negotiated",
			handle: func(w *replies, r fakeRequest) bool { w.status(replyFlagDone, r.cookie, 9, 4096, 0); return true }},
		{name: "status twice", blockStatus: true, wantProto: true, wantErrText: "two block-status chunks",
			handle: func(w *replies, r fakeRequest) bool {
				w.status(0, r.cookie, 1, 4096, 0).status(replyFlagDone, r.cookie, 1, 4096, 0)
				return true
			}},
		{name: "status success without extents", blockStatus: true, wantProto: true, wantErrText: "without extents",
			handle: func(w *replies, r fakeRequest) bool { w.done(r.cookie); return true }},
		{name: "status as simple success", blockStatus: true, wantProto: true, wantErrText: "simple success reply",
			handle: func(w *replies, r fakeRequest) bool { w.simple(r.cookie, 0, nil); return true }},
		// Not hostile, but only a fake answers this way on demand: one extent per
		// reply, the last running past the range; BlockStatus asks again and clips.
		{name: "status short and overlong", blockStatus: true,
			wantExtents: []Extent{{0, 4096, 3}, {4096, 61440, 0}},
			handle: func(w *replies, r fakeRequest) bool {
				if r.off == 0 {
					w.status(replyFlagDone, r.cookie, 1, 4096, 3)
				} else {
					w.status(replyFlagDone, r.cookie, 1, 1<<20, 0)
				}
				return true
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := &fakeServer{size: fakeSize, flags: tfFlush, contexts: map[string]uint32{ContextBaseAllocation: 1}, handle: func(w *replies, r fakeRequest) bool {
				if r.cmd == cmdFlush {
					w.simple(r.cookie, 0, nil)
					return true
				}
				return tc.handle(w, r)
			}}
			opts := fakeOpts()
			opts.Timeout = 300 * time.Millisecond
			c := dial(t, fs.start(t), opts)
			var err error
			var ext []Extent
			start := time.Now()
			if tc.blockStatus {
				err = c.BlockStatus(context.Background(), ContextBaseAllocation, 0, 65536, func(e Extent) error {
					ext = append(ext, e)
					return nil
				})
			} else {
				buf := make([]byte, n)
				_, err = c.ReadAt(buf, off)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("took %v; every failure must be prompt", d)
			}
			if tc.laterProto {
				if err != nil {
					t.Fatalf("first reply = %v; want success", err)
				}
				readersGone(t, c)
				if ferr := c.Flush(ctx10s(t)); !errors.Is(ferr, ErrProtocol) || !strings.Contains(ferr.Error(), "unknown cookie") {
					t.Errorf("Flush after a duplicate reply = %v; want ErrProtocol naming the unknown cookie", ferr)
				}
				return
			}
			if tc.wantExtents != nil {
				if err != nil || !slices.Equal(ext, tc.wantExtents) {
					t.Fatalf("BlockStatus = %v, %v; want %v", ext, err, tc.wantExtents)
				}
				return
			}
			if err == nil {
				t.Fatal("request succeeded")
			}
			if tc.wantErrText != "" && !strings.Contains(err.Error(), tc.wantErrText) {
				t.Errorf("error %q does not mention %q", err, tc.wantErrText)
			}
			if got := errors.Is(err, ErrProtocol); got != tc.wantProto {
				t.Errorf("errors.Is(%v, ErrProtocol) = %v, want %v", err, got, tc.wantProto)
			}
			if tc.wantErrno != 0 {
				var nerr *Error
				if !errors.As(err, &nerr) || nerr.Errno != tc.wantErrno {
					t.Errorf("error %v; want *Error with %v", err, tc.wantErrno)
				}
				if strings.ContainsAny(err.Error(), "\x00\n") {
					t.Errorf("server message not sanitised: %q", err)
				}
				// A server error leaves the connection usable.
				if ferr := c.Flush(ctx10s(t)); ferr != nil {
					t.Errorf("Flush after an error reply: %v", ferr)
				}
			}
			if tc.wantProto {
				readersGone(t, c)
				if ferr := c.Flush(ctx10s(t)); !errors.Is(ferr, ErrProtocol) {
					t.Errorf("Flush after a protocol violation = %v; want the violation again", ferr)
				}
			}
		})
	}
}

// TestHostileHandshake: broken greetings and option replies fail Dial with a
// clear error within its bound.
func TestHostileHandshake(t *testing.T) {
	greet := func(rw io.ReadWriter) {
		b := binary.BigEndian.AppendUint64(nil, nbdMagic)
		b = binary.BigEndian.AppendUint64(b, optsMagic)
		rw.Write(binary.BigEndian.AppendUint16(b, flagFixedNewstyle))
		io.ReadFull(rw, make([]byte, 4))
	}
	for _, tc := range []struct {
		name    string
		fs      fakeServer
		opts    Options
		wantErr string
	}{
		{name: "not NBD", wantErr: "not an NBD server",
			fs: fakeServer{greeting: func(rw io.ReadWriter) { rw.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n")) }}},
		{name: "oldstyle", wantErr: "oldstyle",
			fs: fakeServer{greeting: func(rw io.ReadWriter) {
				b := binary.BigEndian.AppendUint64(nil, nbdMagic)
				rw.Write(binary.BigEndian.AppendUint64(b, oldstyleMagic)[:16])
				rw.Write(make([]byte, 2))
			}}},
		{name: "not fixed newstyle", wantErr: "fixed newstyle",
			fs: fakeServer{greeting: func(rw io.ReadWriter) {
				b := binary.BigEndian.AppendUint64(nil, nbdMagic)
				rw.Write(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64(b, optsMagic), 0))
			}}},
		{name: "silent", wantErr: "deadline exceeded",
			fs: fakeServer{greeting: func(rw io.ReadWriter) { io.Copy(io.Discard, rw) }}},
		{name: "closes after greeting", wantErr: "NBD_OPT_STRUCTURED_REPLY",
			fs: fakeServer{greeting: greet}},
		{name: "huge option reply", wantErr: "more than the",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				b := binary.BigEndian.AppendUint64(nil, optReplyMagic)
				b = binary.BigEndian.AppendUint32(b, opt)
				b = binary.BigEndian.AppendUint32(b, repAck)
				w.Write(binary.BigEndian.AppendUint32(b, 0xffffffff))
				return true
			}}},
		{name: "reply to another option", wantErr: "names option",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				optReply(w, opt+1, repAck, nil)
				return true
			}}},
		{name: "endless meta contexts", opts: Options{MetaContexts: []string{ContextBaseAllocation}}, wantErr: "more than 1024 replies",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				if opt != optSetMetaContext {
					return false
				}
				for i := range 2000 {
					optReply(w, opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, uint32(i)), "x:y"...))
				}
				return true
			}}},
		{name: "meta context not granted", opts: Options{MetaContexts: []string{ContextBaseAllocation, ContextDirtyBitmap + "b1"}},
			wantErr: `did not grant meta context "qemu:dirty-bitmap:b1"`,
			fs:      fakeServer{size: fakeSize, contexts: map[string]uint32{ContextBaseAllocation: 1}}},
		{name: "two contexts one id", opts: Options{MetaContexts: []string{"a:a", "b:b"}}, wantErr: "same id",
			fs: fakeServer{size: fakeSize, contexts: map[string]uint32{"a:a": 1, "b:b": 1}}},
		{name: "meta contexts without structured replies", opts: Options{MetaContexts: []string{ContextBaseAllocation}},
			wantErr: "structured replies", fs: fakeServer{size: fakeSize, noStruct: true}},
		{name: "invalid block sizes", wantErr: "invalid block sizes",
			fs: fakeServer{size: fakeSize, blockSizes: &[3]uint32{3, 4096, 1 << 20}}},
		{name: "no such export", wantErr: "no such export",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				if opt != optGo {
					return false
				}
				optReply(w, opt, repErrBit+6, []byte("export 'x' not present"))
				return true
			}}},
		{name: "TLS required", wantErr: "set Options.TLS",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				optReply(w, opt, repErrBit+5, nil)
				return true
			}}},
		{name: "GO without export info", wantErr: "without describing the export",
			fs: fakeServer{option: func(w io.Writer, opt uint32, data []byte) bool {
				if opt != optGo {
					return false
				}
				optReply(w, opt, repAck, nil)
				return true
			}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := tc.fs.start(t)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			c, err := Dial(ctx, addr, "", tc.opts)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Dial error %q does not mention %q", err, tc.wantErr)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("Dial took %v to fail", d)
			}
		})
	}
}

// TestFakeSimpleReplies: a server without structured replies (only fakes here;
// qemu and nbdkit always offer them) is still read correctly.
func TestFakeSimpleReplies(t *testing.T) {
	data := make([]byte, fakeSize)
	for i := range data {
		data[i] = byte(i * 7)
	}
	fs := &fakeServer{size: fakeSize, noStruct: true, blockSizes: &[3]uint32{1, 4096, 64 << 10},
		handle: func(w *replies, r fakeRequest) bool {
			w.simple(r.cookie, 0, data[r.off:r.off+uint64(r.length)])
			return true
		}}
	c := dial(t, fs.start(t), Options{})
	got := make([]byte, 300000)
	if err := c.Read(ctx10s(t), got, 12345); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data[12345:12345+300000]) {
		t.Fatal("wrong data through simple replies")
	}
}

// TestParseAddr covers the address forms Dial accepts.
func TestParseAddr(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    target
		wantErr bool
	}{
		{in: "unix:/run/x.sock", want: target{network: "unix", address: "/run/x.sock"}},
		{in: "/run/x.sock", want: target{network: "unix", address: "/run/x.sock"}},
		{in: "tcp:10.0.0.1:10809", want: target{network: "tcp", address: "10.0.0.1:10809"}},
		{in: "nbd://host:1234/disk0", want: target{network: "tcp", address: "host:1234", export: "disk0"}},
		{in: "nbd://host/disk0", want: target{network: "tcp", address: "host:10809", export: "disk0"}},
		{in: "nbd+unix:///fleece?socket=/tmp/n.sock", want: target{network: "unix", address: "/tmp/n.sock", export: "fleece"}},
		{in: "nbd+unix:///?socket=/tmp/n.sock", want: target{network: "unix", address: "/tmp/n.sock"}},
		{in: "nbds://host:1/e", want: target{network: "tcp", address: "host:1", export: "e", tls: true}},
		{in: "nbd+unix:///e", wantErr: true},
		{in: "http://x/y", wantErr: true},
		{in: "host:10809", wantErr: true},
		{in: "nbd:///e", wantErr: true},
	} {
		got, err := parseAddr(tc.in)
		if (err != nil) != tc.wantErr || (err == nil && got != tc.want) {
			t.Errorf("parseAddr(%q) = %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

// TestFakeFUAEmulation: qemu and nbdkit here always advertise FUA, so a fake
// without it checks that Write(fua) is followed by a flush.
func TestFakeFUAEmulation(t *testing.T) {
	var mu sync.Mutex
	var cmds []uint16
	var flags []uint16
	fs := &fakeServer{size: fakeSize, flags: tfFlush, handle: func(w *replies, r fakeRequest) bool {
		mu.Lock()
		cmds, flags = append(cmds, r.cmd), append(flags, r.flags)
		mu.Unlock()
		w.simple(r.cookie, 0, nil)
		return true
	}}
	c := dial(t, fs.start(t), Options{})
	if c.CanFUA() {
		t.Fatal("fake without FUA reported CanFUA")
	}
	if err := c.Write(ctx10s(t), []byte("x"), 0, true); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(cmds) != 2 || cmds[0] != cmdWrite || flags[0] != 0 || cmds[1] != cmdFlush {
		t.Fatalf("commands %v flags %v; want a write without FUA, then a flush", cmds, flags)
	}
}

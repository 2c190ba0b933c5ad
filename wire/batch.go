package wire

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"sync"

	"google.golang.org/grpc/credentials"
)

// Go's TLS writes every record (16 KiB at most) with its own system call: a
// 1 MiB message costs 64 writes, and on loopback or a fast LAN those calls are
// a large share of the CPU a transfer takes. batchCreds wraps the TLS
// credentials so that each write of the TLS connection goes out in as few
// system calls as its records fit in.
type batchCreds struct {
	credentials.TransportCredentials
}

func (b batchCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	bc := newBatchConn(raw)
	conn, info, err := b.TransportCredentials.ClientHandshake(ctx, authority, bc)
	if err != nil {
		return nil, nil, err
	}
	return &flushConn{Conn: conn, raw: bc}, info, nil
}

func (b batchCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	bc := newBatchConn(raw)
	conn, info, err := b.TransportCredentials.ServerHandshake(bc)
	if err != nil {
		return nil, nil, err
	}
	return &flushConn{Conn: conn, raw: bc}, info, nil
}

func (b batchCreds) Clone() credentials.TransportCredentials {
	return batchCreds{b.TransportCredentials.Clone()}
}

// batchConn buffers writes while a flushConn write is under way, and reads
// through a buffer: TLS reads a record at a time, so without one a fast
// reader makes a system call for every 16 KiB record.
type batchConn struct {
	net.Conn
	r        *bufio.Reader
	mu       sync.Mutex
	w        *bufio.Writer
	batching bool
}

func newBatchConn(c net.Conn) *batchConn {
	return &batchConn{Conn: c, r: bufio.NewReaderSize(c, 256<<10), w: bufio.NewWriterSize(c, 256<<10)}
}

func (b *batchConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.batching {
		if err := b.w.Flush(); err != nil {
			return 0, err
		}
		return b.Conn.Write(p)
	}
	return b.w.Write(p)
}

func (b *batchConn) begin() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

func (b *batchConn) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	return b.w.Flush()
}

// flushConn is the TLS connection: each Write's records are batched and sent
// before the Write returns.
type flushConn struct {
	net.Conn
	raw *batchConn
}

func (f *flushConn) Write(p []byte) (int, error) {
	f.raw.begin()
	n, err := f.Conn.Write(p)
	if ferr := f.raw.end(); err == nil {
		err = ferr
	}
	return n, err
}

// writeParts writes parts as one TLS write would: their records go out
// together, in as few system calls as they fit in. Callers serialize it.
func (f *flushConn) writeParts(parts ...[]byte) error {
	f.raw.begin()
	var err error
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		if _, err = f.Conn.Write(p); err != nil {
			break
		}
	}
	if ferr := f.raw.end(); err == nil {
		err = ferr
	}
	return err
}

// closeWrite tells the peer that nothing more comes (a TLS close_notify:
// its reads end with io.EOF) while this side may still read.
func (f *flushConn) closeWrite() error {
	if t, ok := f.Conn.(*tls.Conn); ok {
		return t.CloseWrite()
	}
	return nil
}

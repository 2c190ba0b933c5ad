package nbd

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// readersGone checks that every connection's reader goroutine has exited.
func readersGone(t *testing.T, c *Client) {
	t.Helper()
	for i, cn := range c.conns {
		select {
		case <-cn.readerDone:
		case <-time.After(2 * time.Second):
			t.Errorf("reader of connection %d still running 2s after the connection died", i)
		}
	}
}

// TestServerDies kills the server while reads are in flight on two connections:
// every read fails promptly with a clear error, and nothing is left running.
func TestServerDies(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	cmd := startServer(t, sock, "nbdkit", "--foreground", "--unix", sock, "--exit-with-parent",
		"--filter=delay", "memory", "16M", "rdelay=5")
	c := dial(t, "unix:"+sock, Options{Connections: 2})
	if c.Connections() != 2 {
		t.Fatalf("Connections = %d, want 2", c.Connections())
	}
	ctx := ctx10s(t)
	const n = 8
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- c.Read(ctx, make([]byte, 4096), int64(i)*4096) }()
	}
	time.Sleep(200 * time.Millisecond) // let the reads reach the server
	killed := time.Now()
	cmd.Process.Kill()
	for range n {
		err := <-errs
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("read in flight when the server died = %v; want a connection error", err)
		}
		if !strings.Contains(err.Error(), "closed the connection") && !strings.Contains(err.Error(), "lost") {
			t.Errorf("error does not say the connection went away: %v", err)
		}
	}
	if d := time.Since(killed); d > 2*time.Second {
		t.Errorf("reads failed %v after the server died; want promptly", d)
	}
	readersGone(t, c)
	if err := c.Read(ctx, make([]byte, 1), 0); err == nil {
		t.Error("Read on a dead client succeeded")
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close of a dead client: %v", err)
	}
}

// TestTimeoutAndCancel: a request without reply in time fails with
// DeadlineExceeded; its late reply is discarded, not written into the caller's
// buffer; the connection stays usable.
func TestTimeoutAndCancel(t *testing.T) {
	addr := startNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=700ms")
	c := dial(t, addr, Options{Timeout: 150 * time.Millisecond})
	if err := c.Write(ctx10s(t), bytes.Repeat([]byte{0xab}, 4096), 0, false); err != nil {
		t.Fatal(err)
	}

	buf := make([]byte, 4096)
	start := time.Now()
	_, err := c.ReadAt(buf, 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt on a slow server = %v; want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("timeout took %v, want about 150ms", d)
	}
	// The buffer is ours again: the reply arriving later must not touch it.
	for i := range buf {
		buf[i] = 0x11
	}

	cctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if err := c.Read(cctx, make([]byte, 512), 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("Read with a cancelled context = %v; want Canceled", err)
	}

	time.Sleep(900 * time.Millisecond) // both late replies arrive and are discarded
	if !bytes.Equal(buf, bytes.Repeat([]byte{0x11}, 4096)) {
		t.Fatal("a reply that arrived after the timeout was written into the caller's buffer")
	}
	if err := c.Write(ctx10s(t), []byte{1, 2, 3}, 100, false); err != nil {
		t.Fatalf("Write after timeouts: %v", err)
	}
	got := make([]byte, 3)
	if err := c.Read(ctx10s(t), got, 100); err != nil || !bytes.Equal(got, []byte{1, 2, 3}) {
		t.Fatalf("Read after timeouts = %v, %v", got, err)
	}
}

// TestStall: Options.Stall bounds how long a server may answer nothing
// while requests wait, and the handshake, even when the context allows far
// longer (a cycle's context runs for hours), and the error says the server
// stalled; a server that keeps answering is not cut, however long the
// requests take together or wait for an in-flight slot.
func TestStall(t *testing.T) {
	addr := startNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=700ms")
	c := dial(t, addr, Options{Stall: 150 * time.Millisecond})
	start := time.Now()
	err := c.Read(ctx10s(t), make([]byte, 4096), 0)
	if !errors.Is(err, ErrStalled) {
		t.Fatalf("Read on a server slower than the stall bound = %v; want ErrStalled", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the stall bound took %v, want about 150ms", d)
	}
	// One request in flight at a time, each answered in 700 ms, four at
	// once: the last waits about 2.1 s for its slot and 2.8 s in all,
	// more than the stall bound, but the server never went silent for it.
	patient := dial(t, addr, Options{Stall: 1500 * time.Millisecond, MaxInFlight: 1})
	errs := make(chan error, 4)
	for range 4 {
		go func() { errs <- patient.Read(ctx10s(t), make([]byte, 4096), 0) }()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("Read of a server that answers, each within the stall bound: %v", err)
		}
	}

	silent := (&fakeServer{greeting: func(rw io.ReadWriter) { io.Copy(io.Discard, rw) }}).start(t)
	start = time.Now()
	if _, err := Dial(ctx10s(t), silent, "", Options{Stall: 150 * time.Millisecond}); !errors.Is(err, ErrStalled) {
		t.Fatalf("Dial of a server that never greets = %v; want ErrStalled", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the handshake's stall bound took %v, want about 150ms", d)
	}
}

// TestCloseFailsInFlight: Close ends requests in flight with ErrClosed, is
// idempotent, and later requests fail with ErrClosed too.
func TestCloseFailsInFlight(t *testing.T) {
	addr := startNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=5")
	c := dial(t, addr, Options{})
	errs := make(chan error, 4)
	for range 4 {
		go func() { errs <- c.Read(ctx10s(t), make([]byte, 512), 0) }()
	}
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for range 4 {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Errorf("read in flight at Close = %v; want ErrClosed", err)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v with requests in flight", d)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := c.Flush(ctx10s(t)); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close = %v; want ErrClosed", err)
	}
	readersGone(t, c)
}

// TestMultiConn: qemu-storage-daemon (7.2) advertises multi-conn on its
// exports, so Connections are honoured; nbdkit with multi-conn disabled gets one.
func TestMultiConn(t *testing.T) {
	for _, tc := range []struct {
		name      string
		start     func(t *testing.T) string
		wantConns int
	}{
		{"qsd-read-only", func(t *testing.T) string { return startQSD(t, patterned(t), "") }, 4},
		{"qsd-writable", func(t *testing.T) string { return startQSD(t, patterned(t), `"writable":true`) }, 4},
		{"nbdkit-no-multi-conn", func(t *testing.T) string {
			return startNbdkit(t, "--filter=multi-conn", "pattern", "16M", "multi-conn-mode=disable")
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, tc.start(t), Options{Connections: 4})
			if c.Connections() != tc.wantConns || c.CanMultiConn() != (tc.wantConns > 1) {
				t.Fatalf("Connections %d CanMultiConn %v; want %d", c.Connections(), c.CanMultiConn(), tc.wantConns)
			}
			var wg sync.WaitGroup
			for i := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					p := make([]byte, 1<<20)
					off := int64(i) << 20
					if err := c.Read(ctx10s(t), p, off); err != nil {
						t.Error(err)
						return
					}
					for j := 0; j < len(p); j += 8 {
						if got := binary.BigEndian.Uint64(p[j:]); got != uint64(off)+uint64(j) {
							t.Errorf("offset %d holds %d; want its own offset", off+int64(j), got)
							return
						}
					}
				}()
			}
			wg.Wait()
			for i, cn := range c.conns {
				if cn.isDead() {
					t.Errorf("connection %d died: %v", i, cn.deadErr())
				}
				cn.mu.Lock()
				used := cn.cookie
				cn.mu.Unlock()
				if used == 0 {
					t.Errorf("connection %d carried no request: requests are not spread", i)
				}
			}
		})
	}
}

// TestMultiConnServerLimit: qemu-nbd --shared 2 advertises multi-conn but
// accepts two clients; Dial settles for two connections, promptly.
func TestMultiConnServerLimit(t *testing.T) {
	addr := startQemuNbd(t, qcow2(t, "1M"), "qcow2", "--shared", "2", "--read-only")
	start := time.Now()
	c := dial(t, addr, Options{Connections: 4, Timeout: 500 * time.Millisecond})
	if c.Connections() != 2 {
		t.Fatalf("Connections = %d; want the server's limit, 2", c.Connections())
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Dial took %v", d)
	}
	if err := c.Read(ctx10s(t), make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

// patterned makes a 16M qcow2 holding nbdkit's pattern: each 8-byte word is
// its own offset, big-endian.
func patterned(t *testing.T) string {
	img := qcow2(t, "16M")
	run(t, "qemu-img", "convert", "-n", "-O", "qcow2", uri(startNbdkit(t, "pattern", "16M"), ""), img)
	return img
}

// TestTLS upgrades with NBD_OPT_STARTTLS against nbdkit --tls=require, using a
// throwaway CA, and checks a plain client is refused with a hint.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	pool := writeTestPKI(t, dir)
	addr := startNbdkit(t, "--tls=require", "--tls-certificates="+dir, "memory", "1M")

	c := dial(t, addr, Options{TLS: &tls.Config{RootCAs: pool, ServerName: "localhost"}})
	ctx := ctx10s(t)
	if err := c.Write(ctx, []byte("secret"), 10, false); err != nil {
		t.Fatalf("Write over TLS: %v", err)
	}
	got := make([]byte, 6)
	if err := c.Read(ctx, got, 10); err != nil || string(got) != "secret" {
		t.Fatalf("Read over TLS = %q, %v", got, err)
	}

	_, err := Dial(ctx, addr, "", Options{})
	if err == nil || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("plain Dial to a TLS-only server = %v; want an error asking for TLS", err)
	}
	_, err = Dial(ctx, addr, "", Options{TLS: &tls.Config{ServerName: "localhost"}}) // unknown CA
	if err == nil {
		t.Fatal("Dial trusting the wrong CA succeeded")
	}
}

// writeTestPKI writes ca-cert.pem, server-cert.pem and server-key.pem (for
// "localhost") into dir, the layout nbdkit and qemu's tls-creds-x509 read.
func writeTestPKI(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nbd test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "ca-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	writeFile(t, filepath.Join(dir, "server-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFile(t, filepath.Join(dir, "server-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pool
}

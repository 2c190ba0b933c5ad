// Package testsite starts a real recovery site for tests and benchmarks: a
// recovery store behind the wire server on loopback mutual TLS, and a client of it.
package testsite

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Site is a running recovery site.
type Site struct {
	Dir    string
	PKI    string
	Store  *recovery.Store
	Server *wire.Server
	Addr   string
	opts   recovery.Options
	// as is the site whose certificate the server presents ("dr").
	as string
	// startVM is what the server's StartVM calls (SetStartVM).
	startVM atomic.Pointer[func(context.Context, string, uint64) (wire.FailoverResult, error)]
}

// SetStartVM makes the site start VMs for their owners' planned migrations
// with f (as a daemon does with its failover manager).
func (s *Site) SetStartVM(f func(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error)) {
	s.startVM.Store(&f)
}

// New runs a recovery site in dir (its CA, the "prod" and "dr" certificates and
// its store live there) on a free loopback port, until Stop. It is the core of
// Start for callers without a testing.TB, such as the benchmark harness.
func New(ctx context.Context, dir string, opts recovery.Options) (*Site, error) {
	s := &Site{Dir: dir, PKI: filepath.Join(dir, "pki"), opts: opts, as: "dr"}
	if err := pki.CreateCA(s.PKI, "test", 24*time.Hour); err != nil {
		return nil, fmt.Errorf("test site: %w", err)
	}
	for _, site := range []string{"prod", "dr"} {
		if err := pki.IssueSite(s.PKI, s.PKI, site, []string{"127.0.0.1"}, 24*time.Hour); err != nil {
			return nil, fmt.Errorf("test site: %w", err)
		}
	}
	if err := s.start(ctx, "127.0.0.1:0"); err != nil {
		return nil, err
	}
	return s, nil
}

// Start runs a recovery site until the test ends.
func Start(t testing.TB, opts recovery.Options) *Site {
	t.Helper()
	s, err := New(context.Background(), t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartAs runs, until the test ends, a server of the same deployment (ca's
// CA) that presents the certificate of site as: an impostor when clients
// expect "dr".
func StartAs(t testing.TB, ca *Site, as string, opts recovery.Options) *Site {
	t.Helper()
	s := &Site{Dir: t.TempDir(), PKI: ca.PKI, opts: opts, as: as}
	if err := s.IssueSite(as); err != nil {
		t.Fatal(err)
	}
	if err := s.start(context.Background(), "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func (s *Site) start(ctx context.Context, addr string) error {
	st, err := recovery.Open(ctx, filepath.Join(s.Dir, "store"), s.opts)
	if err != nil {
		return fmt.Errorf("test site: %w", err)
	}
	tlsConf, err := pki.ServerTLS(pki.SiteFiles(s.PKI, s.as))
	if err != nil {
		st.Close()
		return fmt.Errorf("test site: %w", err)
	}
	rev, err := pki.LoadRevocations(pki.SiteFiles(s.PKI, s.as))
	if err != nil {
		st.Close()
		return fmt.Errorf("test site: %w", err)
	}
	var l net.Listener
	for i := 0; ; i++ { // a restarted site takes its old port back, which may linger briefly
		l, err = net.Listen("tcp", addr)
		if err == nil || i == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		st.Close()
		return fmt.Errorf("test site: listen on %s: %w", addr, err)
	}
	s.Store = st
	s.Addr = l.Addr().String()
	s.Server = &wire.Server{Site: s.as, Store: wire.RecoveryStore(st), Revocations: rev, ContactFile: filepath.Join(s.Dir, "contacts.json"),
		StartVM: func(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error) {
			f := s.startVM.Load()
			if f == nil {
				return wire.FailoverResult{}, fmt.Errorf("test site %s starts no VMs (SetStartVM)", s.as)
			}
			return (*f)(ctx, vm, point)
		}}
	go s.Server.Serve(l, tlsConf)
	return nil
}

// Stop ends the site: streams in flight are cut, the store closed.
func (s *Site) Stop() {
	if s.Server != nil {
		s.Server.Stop()
		s.Server = nil
	}
	if s.Store != nil {
		s.Store.Close()
		s.Store = nil
	}
}

// Restart stops the site and opens it again on the same address and directory,
// as a recovery daemon that was killed and started again would.
func (s *Site) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	if err := s.start(context.Background(), s.Addr); err != nil {
		t.Fatal(err)
	}
}

// Client connects a protected site ("prod") to this site; the caller closes it.
func (s *Site) Client(ctx context.Context, compression wire.Compression) (*wire.Client, error) {
	return s.ClientAs(ctx, "prod", compression)
}

// ClientAs connects as the protected site named site, with a certificate of
// its own from the site's CA (issued on first use).
func (s *Site) ClientAs(ctx context.Context, site string, compression wire.Compression) (*wire.Client, error) {
	return s.client(ctx, site, "dr", compression)
}

// DialOwn connects "prod" to this site expecting the site's own name (a
// site of StartAs is not "dr"), closed when the test ends.
func (s *Site) DialOwn(t testing.TB, compression wire.Compression) *wire.Client {
	t.Helper()
	c, err := s.client(context.Background(), "prod", cmp.Or(s.as, "dr"), compression)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (s *Site) client(ctx context.Context, site, peer string, compression wire.Compression) (*wire.Client, error) {
	if err := s.IssueSite(site); err != nil {
		return nil, err
	}
	tlsConf, err := pki.ClientTLS(pki.SiteFiles(s.PKI, site), "127.0.0.1")
	if err != nil {
		return nil, fmt.Errorf("test site: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, s.Addr, tlsConf, site, peer, compression)
	if err != nil {
		return nil, fmt.Errorf("test site: dial %s as %q: %w", s.Addr, site, err)
	}
	return c, nil
}

// IssueSite gives site a certificate from the test CA, if it has none yet.
func (s *Site) IssueSite(site string) error {
	if _, err := os.Stat(pki.SiteFiles(s.PKI, site).Cert); err == nil {
		return nil
	}
	if err := pki.IssueSite(s.PKI, s.PKI, site, []string{"127.0.0.1"}, 24*time.Hour); err != nil {
		return fmt.Errorf("test site: %w", err)
	}
	return nil
}

// DialAs is ClientAs, closed when the test ends.
func (s *Site) DialAs(t testing.TB, site string, compression wire.Compression) *wire.Client {
	t.Helper()
	c, err := s.ClientAs(context.Background(), site, compression)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Dial returns a protected site's client of this site, closed when the test ends.
func (s *Site) Dial(t testing.TB, compression wire.Compression) *wire.Client {
	t.Helper()
	c, err := s.Client(context.Background(), compression)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ShortDir is a temporary directory with a path short enough for unix sockets.
func ShortDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "lbt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// PointHash is the sha256 of a point's disk as the site exports it (raw).
func (s *Site) PointHash(t testing.TB, vm string, id uint64, disk string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), fmt.Sprintf("%s-%d-%s.raw", vm, id, disk))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := s.Store.Export(ctx, vm, id, disk, out, "raw"); err != nil {
		t.Fatalf("export vm %s point %d disk %s: %v", vm, id, disk, err)
	}
	defer os.Remove(out)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

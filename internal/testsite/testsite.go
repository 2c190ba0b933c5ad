// Package testsite starts a real recovery site for tests: a recovery store
// behind the wire server on loopback mutual TLS, and a client of it.
package testsite

import (
	"context"
	"net"
	"os"
	"path/filepath"
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
	t      testing.TB
}

// Start runs a recovery site until the test ends.
func Start(t testing.TB, opts recovery.Options) *Site {
	t.Helper()
	dir := t.TempDir()
	s := &Site{Dir: dir, PKI: filepath.Join(dir, "pki"), opts: opts, t: t}
	if err := pki.CreateCA(s.PKI, "test", time.Hour); err != nil {
		t.Fatal(err)
	}
	for _, site := range []string{"prod", "dr"} {
		if err := pki.IssueSite(s.PKI, s.PKI, site, []string{"127.0.0.1"}, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	s.start(t, "127.0.0.1:0")
	t.Cleanup(s.Stop)
	return s
}

func (s *Site) start(t testing.TB, addr string) {
	t.Helper()
	st, err := recovery.Open(context.Background(), filepath.Join(s.Dir, "store"), s.opts)
	if err != nil {
		t.Fatal(err)
	}
	tlsConf, err := pki.ServerTLS(pki.SiteFiles(s.PKI, "dr"))
	if err != nil {
		t.Fatal(err)
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
		t.Fatal(err)
	}
	s.Store = st
	s.Addr = l.Addr().String()
	s.Server = &wire.Server{Site: "dr", Store: wire.RecoveryStore(st)}
	go s.Server.Serve(l, tlsConf)
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
	s.Stop()
	s.start(t, s.Addr)
}

// Dial returns a protected site's client of this site.
func (s *Site) Dial(t testing.TB, compression wire.Compression) *wire.Client {
	t.Helper()
	tlsConf, err := pki.ClientTLS(pki.SiteFiles(s.PKI, "prod"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, s.Addr, tlsConf, "prod", compression)
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

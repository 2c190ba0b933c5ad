package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// result is what each end of one loopback connection saw.
type result struct {
	serverErr, clientErr         error  // from the handshake and byte exchange
	serverPeer, clientPeer       string // PeerSite on each end, after the exchange
	serverPeerErr, clientPeerErr error
}

// handshake runs one TLS connection over loopback TCP: the server and client
// handshake, then exchange a byte each way. The exchange matters: in TLS 1.3
// the client finishes its handshake before the server has checked the client's
// certificate, so a refusal reaches the client only on its first read.
func handshake(t *testing.T, server, client *tls.Config) result {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	type end struct {
		peer         string
		err, peerErr error
	}
	served := make(chan end, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- end{err: err}
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			served <- end{err: err}
			return
		}
		_, err = tc.Write([]byte("s"))
		if err == nil {
			_, err = tc.Read(make([]byte, 1))
		}
		peer, peerErr := PeerSite(tc.ConnectionState())
		served <- end{peer: peer, err: err, peerErr: peerErr}
	}()

	var r result
	func() {
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: client}
		nc, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			r.clientErr = err
			return
		}
		defer nc.Close()
		c := nc.(*tls.Conn)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			r.clientErr = err
			return
		}
		_, r.clientErr = c.Write([]byte("c"))
		r.clientPeer, r.clientPeerErr = PeerSite(c.ConnectionState())
	}()
	if r.clientErr != nil {
		// A refused client may not have reached the server's Accept at all:
		// closing the listener bounds the server's wait.
		ln.Close()
	}
	select {
	case e := <-served:
		r.serverPeer, r.serverErr, r.serverPeerErr = e.peer, e.err, e.peerErr
	case <-time.After(10 * time.Second):
		t.Fatal("server side of the handshake did not finish in 10s")
	}
	return r
}

func serverTLS(t *testing.T, f Files) *tls.Config {
	t.Helper()
	c, err := ServerTLS(f)
	if err != nil {
		t.Fatalf("ServerTLS: %v", err)
	}
	return c
}

func clientTLS(t *testing.T, f Files, name string) *tls.Config {
	t.Helper()
	c, err := ClientTLS(f, name)
	if err != nil {
		t.Fatalf("ClientTLS: %v", err)
	}
	return c
}

func TestMutualTLS(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost", "127.0.0.1")
	b := newSite(t, caDir, "site-b", "b.example.com", "127.0.0.1")

	tests := []struct {
		name           string
		server, client Files
		serverName     string
		wantAtServer   string // the client's site, as the server sees it
		wantAtClient   string
	}{
		{"a serves b", a, b, "localhost", "site-b", "site-a"},
		{"b serves a", b, a, "b.example.com", "site-a", "site-b"},
		{"by IP address", a, b, "127.0.0.1", "site-b", "site-a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handshake(t, serverTLS(t, tt.server), clientTLS(t, tt.client, tt.serverName))
			if r.serverErr != nil || r.clientErr != nil {
				t.Fatalf("handshake: server: %v; client: %v", r.serverErr, r.clientErr)
			}
			if r.serverPeerErr != nil || r.clientPeerErr != nil {
				t.Fatalf("PeerSite: server: %v; client: %v", r.serverPeerErr, r.clientPeerErr)
			}
			if r.serverPeer != tt.wantAtServer || r.clientPeer != tt.wantAtClient {
				t.Errorf("PeerSite: server sees %q, client sees %q; want %q and %q", r.serverPeer, r.clientPeer, tt.wantAtServer, tt.wantAtClient)
			}
		})
	}
}

func TestRefusedPeers(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	otherCA := newCA(t, "other CA")
	stranger := newSite(t, otherCA, "stranger", "localhost")
	expired := issueAt(t, caDir, "old", time.Now().Add(-10*day), time.Now().Add(-day))
	anonymous := issueWithoutSite(t, caDir)

	tests := []struct {
		name         string
		server       *tls.Config
		client       *tls.Config
		wantAtServer string // "" means the server must not see an error
		wantAtClient string
	}{
		{
			// The client trusts our CA, so only the server's check can refuse.
			name:         "client from another CA",
			server:       serverTLS(t, a),
			client:       rawClient(t, Files{CA: a.CA, Cert: stranger.Cert, Key: stranger.Key}, "localhost"),
			wantAtServer: "unknown authority",
			wantAtClient: "unknown certificate authority",
		},
		{
			// The server trusts our CA, so only the client's check can refuse.
			name:         "server from another CA",
			server:       rawServer(t, Files{CA: b.CA, Cert: stranger.Cert, Key: stranger.Key}),
			client:       clientTLS(t, b, "localhost"),
			wantAtServer: "bad certificate",
			wantAtClient: "unknown authority",
		},
		{
			name:         "site of another deployment",
			server:       serverTLS(t, a),
			client:       clientTLS(t, stranger, "localhost"),
			wantAtClient: "unknown authority",
		},
		{
			// Built by hand: ClientTLS refuses to load an expired certificate
			// (TestLoadRefuses), so only a foreign client could present one.
			name:         "expired client",
			server:       serverTLS(t, a),
			client:       rawClient(t, expired, "localhost"),
			wantAtServer: "expired",
			wantAtClient: "expired",
		},
		{
			name:         "expired server",
			server:       rawServer(t, expired),
			client:       clientTLS(t, b, "localhost"),
			wantAtServer: "bad certificate",
			wantAtClient: "expired",
		},
		{
			name:         "client from the CA but not a site",
			server:       serverTLS(t, a),
			client:       rawClient(t, anonymous, "localhost"),
			wantAtServer: "names no lifeboat site",
		},
		{
			name:         "server from the CA but not a site",
			server:       rawServer(t, anonymous),
			client:       clientTLS(t, b, "localhost"),
			wantAtClient: "names no lifeboat site",
		},
		{
			name:         "server name not in the certificate",
			server:       serverTLS(t, a),
			client:       clientTLS(t, b, "elsewhere.example.com"),
			wantAtClient: "not elsewhere.example.com",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handshake(t, tt.server, tt.client)
			if r.serverErr == nil && r.clientErr == nil {
				t.Fatalf("connection accepted: server sees %q, client sees %q", r.serverPeer, r.clientPeer)
			}
			check := func(end string, err error, want string) {
				if want == "" {
					return
				}
				if err == nil {
					t.Errorf("%s: no error, want one containing %q", end, want)
				} else if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: error %q does not contain %q", end, err, want)
				}
			}
			check("server", r.serverErr, tt.wantAtServer)
			check("client", r.clientErr, tt.wantAtClient)
		})
	}
}

func TestPeerSiteBeforeHandshake(t *testing.T) {
	if _, err := PeerSite(tls.ConnectionState{}); err == nil || !strings.Contains(err.Error(), "Handshake") {
		t.Errorf("PeerSite of no handshake: err = %v", err)
	}
	if _, err := PeerSite(tls.ConnectionState{HandshakeComplete: true}); err == nil || !strings.Contains(err.Error(), "not verified") {
		t.Errorf("PeerSite of an unverified peer: err = %v", err)
	}
}

func TestLoadRefuses(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	stranger := newSite(t, newCA(t, "other CA"), "stranger", "localhost")
	now := time.Now()
	expired := issueAt(t, caDir, "old", now.Add(-10*day), now.Add(-day))
	future := issueAt(t, caDir, "new", now.Add(day), now.Add(10*day))
	missing := filepath.Join(t.TempDir(), "nowhere", "site-c.crt")
	worldKey := newSite(t, caDir, "site-w", "localhost")
	if err := os.Chmod(worldKey.Key, 0o644); err != nil {
		t.Fatal(err)
	}
	writableKey := newSite(t, caDir, "site-x", "localhost")
	if err := os.Chmod(writableKey.Key, 0o620); err != nil {
		t.Fatal(err)
	}
	expiredEnd := mustLoad(t, expired.Cert).NotAfter.UTC().Format(time.RFC3339)
	futureStart := mustLoad(t, future.Cert).NotBefore.UTC().Format(time.RFC3339)

	tests := []struct {
		name string
		f    Files
		want []string
	}{
		{"missing cert", Files{CA: a.CA, Cert: missing, Key: a.Key},
			[]string{"cert file " + missing, "no such file", "lifeboat cert site site-c --ca CA_DIR --out " + filepath.Dir(missing)}},
		{"missing key", Files{CA: a.CA, Cert: a.Cert, Key: missing + ".key"}, []string{"key file " + missing + ".key", "lifeboat cert site"}},
		{"missing CA", Files{CA: missing, Cert: a.Cert, Key: a.Key}, []string{"CA cert file " + missing, "lifeboat cert ca --dir"}},
		{"key of another site", Files{CA: a.CA, Cert: a.Cert, Key: b.Key}, []string{"key file " + b.Key + " does not belong to cert file " + a.Cert}},
		{"cert of another CA", Files{CA: a.CA, Cert: stranger.Cert, Key: stranger.Key}, []string{stranger.Cert, "not a site certificate of the CA", `"test CA"`}},
		{"cert as CA", Files{CA: a.Cert, Cert: a.Cert, Key: a.Key}, []string{"not a CA certificate"}},
		{"key as cert", Files{CA: a.CA, Cert: a.Key, Key: a.Key}, []string{"no PEM CERTIFICATE"}},
		{"key every user may read", worldKey, []string{"key file " + worldKey.Key, "readable by every user", "mode 0644", "chmod 600 " + worldKey.Key}},
		{"key others may change", writableKey, []string{"key file " + writableKey.Key, "changed by others", "mode 0620", "chmod 600"}},
		{"expired", expired, []string{expired.Cert, "expired on " + expiredEnd, "valid from", "lifeboat cert site old"}},
		{"not yet valid", future, []string{future.Cert, "not valid yet", "valid from " + futureStart, "clock"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for role, load := range map[string]func() error{
				"ServerTLS": func() error { _, err := ServerTLS(tt.f); return err },
				"ClientTLS": func() error { _, err := ClientTLS(tt.f, "localhost"); return err },
			} {
				err := load()
				if err == nil {
					t.Fatalf("%s accepted the files", role)
				}
				for _, w := range tt.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("%s: error %q does not contain %q", role, err, w)
					}
				}
			}
		})
	}
	if _, err := ClientTLS(a, ""); err == nil {
		t.Error("ClientTLS without a server name succeeded")
	}
	// Readable by its group (the service user's) is allowed.
	if err := os.Chmod(a.Key, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := ServerTLS(a); err != nil {
		t.Errorf("a key of mode 0640 refused: %v", err)
	}
}

// issueAt issues a site certificate valid from notBefore to notAfter, which
// IssueSite cannot do for a past or future window.
func issueAt(t *testing.T, caDir, site string, notBefore, notAfter time.Time) Files {
	t.Helper()
	out := t.TempDir()
	if err := issueSite(caDir, out, site, []string{"localhost"}, notBefore, notAfter); err != nil {
		t.Fatal(err)
	}
	return SiteFiles(out, site)
}

// issueWithoutSite signs, with the CA's key, a certificate that is fine for
// TLS but names no site: what a CA shared with another use might hold.
// IssueSite cannot make one.
func issueWithoutSite(t *testing.T, caDir string) Files {
	t.Helper()
	ca := mustLoad(t, filepath.Join(caDir, CACertFile))
	caKey, _, err := loadKey("CA key", filepath.Join(caDir, CAKeyFile), "")
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serialForTest(t),
		Subject:      pkix.Name{CommonName: "anonymous"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(day),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	f := SiteFiles(out, "anonymous")
	for path, data := range map[string][]byte{f.Cert: encodeCert(der), f.Key: keyPEM, f.CA: encodeCert(ca.Raw)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func serialForTest(t *testing.T) *big.Int {
	t.Helper()
	n, err := newSerial()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rawServer and rawClient build configs like ServerTLS and ClientTLS but
// without their checks of the local files, to present certificates those
// refuse to load.
func rawServer(t *testing.T, f Files) *tls.Config {
	t.Helper()
	cert, roots := rawFiles(t, f)
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{cert},
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        roots,
		VerifyConnection: requireSite,
	}
}

func rawClient(t *testing.T, f Files, serverName string) *tls.Config {
	t.Helper()
	cert, roots := rawFiles(t, f)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Sent even to a server that names other CAs, as ClientTLS does.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		RootCAs:              roots,
		ServerName:           serverName,
	}
}

func rawFiles(t *testing.T, f Files) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(mustLoad(t, f.CA))
	return cert, roots
}

// A site certificate issued again into the same files (`lifeboat cert site
// NAME`) is presented from the next handshake on, by a server and by a
// client, without a restart; before, a site presented what it started with
// until it expired. A pair that does not check (another site's name) is not
// taken: the one in use stays.
func TestRenewedCertificateTakenWithoutRestart(t *testing.T) {
	caDir := newCA(t, "test CA")
	out := filepath.Join(t.TempDir(), "dr")
	if err := IssueSite(caDir, out, "dr", []string{"127.0.0.1"}, day); err != nil {
		t.Fatal(err)
	}
	f := SiteFiles(out, "dr")
	srv, err := ServerTLS(f)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ClientTLS(f, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	presented := func() ([]byte, []byte) {
		s, err := srv.GetCertificate(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}
		c, err := cli.GetClientCertificate(&tls.CertificateRequestInfo{})
		if err != nil {
			t.Fatal(err)
		}
		return s.Certificate[0], c.Certificate[0]
	}
	time.Sleep(10 * time.Millisecond) // a new modification time
	if err := IssueSite(caDir, out, "dr", []string{"127.0.0.1"}, 30*day); err != nil {
		t.Fatal(err)
	}
	renewed := mustLoad(t, f.Cert)
	if s, c := presented(); !bytes.Equal(s, renewed.Raw) || !bytes.Equal(c, renewed.Raw) {
		t.Errorf("after the renewal the server and client still present the certificate they loaded, not the renewed one")
	}
	// Another site's pair copied over the files is not taken.
	other := filepath.Join(t.TempDir(), "prod")
	if err := IssueSite(caDir, other, "prod", []string{"127.0.0.1"}, day); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	for _, p := range [][2]string{{SiteFiles(other, "prod").Cert, f.Cert}, {SiteFiles(other, "prod").Key, f.Key}} {
		data, err := os.ReadFile(p[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p[1], data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if s, c := presented(); !bytes.Equal(s, renewed.Raw) || !bytes.Equal(c, renewed.Raw) {
		t.Errorf("another site's certificate copied over dr's files was presented as dr's")
	}
}

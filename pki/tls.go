package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// ServerTLS returns the config a site listens with: it presents f.Cert and
// accepts only clients whose certificate the CA in f.CA issued for a site.
// TLS 1.3 only. The files are checked now, so a wrong, expired or mismatched
// file is reported at start-up rather than as a peer's failed handshake. It
// does not look at revocation: a revoked client completes the handshake and
// is refused by each call (wire.Server, with Revocations), so that it hears
// why rather than "bad certificate".
func ServerTLS(f Files) (*tls.Config, error) {
	m, err := loadMaterial(f, x509.ExtKeyUsageServerAuth)
	if err != nil {
		return nil, err
	}
	sc := newSiteCert(f, x509.ExtKeyUsageServerAuth, m.cert)
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		GetCertificate:   func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return sc.get(), nil },
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        m.roots,
		VerifyConnection: requireSite,
	}, nil
}

// siteCert is a site's own certificate as its files hold it now: a renewal
// (`lifeboat cert site NAME` run again into the same files) is presented from
// the next handshake on, without a restart. Before, a site went on presenting
// the certificate it started with until it expired, renewed file or not. A
// pair that does not load and check (a renewal half written, a key that is
// not the certificate's, another site's name) is not taken: the one in use
// stays.
type siteCert struct {
	f     Files
	usage x509.ExtKeyUsage
	mu    sync.Mutex
	cert  tls.Certificate
	stamp string // the files' sizes and modification times when cert was loaded
}

func newSiteCert(f Files, usage x509.ExtKeyUsage, cert tls.Certificate) *siteCert {
	return &siteCert{f: f, usage: usage, cert: cert, stamp: fileStamp(f)}
}

func (s *siteCert) get() *tls.Certificate {
	st := fileStamp(s.f)
	s.mu.Lock()
	defer s.mu.Unlock()
	if st != s.stamp {
		s.stamp = st
		if m, err := loadMaterial(s.f, s.usage); err == nil && sameSite(m.cert.Leaf, s.cert.Leaf) {
			s.cert = m.cert
		}
	}
	c := s.cert
	return &c
}

func sameSite(a, b *x509.Certificate) bool {
	if a == nil || b == nil {
		return false
	}
	sa, err := siteOf(a)
	if err != nil {
		return false
	}
	sb, err := siteOf(b)
	return err == nil && sa == sb
}

// fileStamp is what changes when the certificate or key file is rewritten.
func fileStamp(f Files) string {
	var b strings.Builder
	for _, p := range []string{f.Cert, f.Key} {
		if fi, err := os.Stat(p); err == nil {
			fmt.Fprintf(&b, "%d.%d;", fi.Size(), fi.ModTime().UnixNano())
		} else {
			b.WriteString("-;")
		}
	}
	return b.String()
}

// ClientTLS returns the config a site dials another with: it verifies the
// server against the CA in f.CA only (never the system's roots) and against
// serverName, the DNS name or IP address being dialled, which must be one of
// the hosts the server's certificate was issued for, and refuses a server
// whose certificate f.CRL revokes. It presents f.Cert.
func ClientTLS(f Files, serverName string) (*tls.Config, error) {
	if serverName == "" {
		return nil, errors.New("client TLS: no server name: pass the host name or IP address being dialled, one of the --host values its certificate was issued with")
	}
	m, err := loadMaterial(f, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	rev, err := LoadRevocations(f)
	if err != nil {
		return nil, err
	}
	sc := newSiteCert(f, x509.ExtKeyUsageClientAuth, m.cert)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    m.roots,
		ServerName: serverName,
		// Always present the site certificate, even when the server names
		// other acceptable CAs: the server then says "unknown authority",
		// which points at the real problem, instead of "no certificate".
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return sc.get(), nil
		},
		// VerifyConnection, unlike VerifyPeerCertificate, runs on a
		// resumed session too: a server revoked since is refused all the
		// same.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := requireSite(cs); err != nil {
				return err
			}
			if err := rev.CheckPeer(cs); err != nil {
				return fmt.Errorf("this site refuses the server: %w", err)
			}
			return nil
		},
	}, nil
}

// PeerSite returns the site name in the verified certificate of the peer of
// a completed handshake made with ServerTLS or ClientTLS.
func PeerSite(state tls.ConnectionState) (string, error) {
	if !state.HandshakeComplete {
		return "", errors.New("peer site: the TLS handshake is not complete; call Handshake first")
	}
	return verifiedSite(state)
}

// requireSite refuses a peer whose certificate, although issued by the CA,
// names no site: only `lifeboat cert site` certificates are peers.
func requireSite(cs tls.ConnectionState) error {
	_, err := verifiedSite(cs)
	return err
}

func verifiedSite(cs tls.ConnectionState) (string, error) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", errors.New("peer site: the peer's certificate was not verified against the deployment CA; use the configs from ServerTLS and ClientTLS")
	}
	return siteOf(cs.VerifiedChains[0][0])
}

// siteOf returns the site a certificate was issued for, from its URI SAN.
// CertSite is the site a site certificate names.
func CertSite(c *x509.Certificate) (string, error) { return siteOf(c) }

func siteOf(c *x509.Certificate) (string, error) {
	var sites []string
	for _, u := range c.URIs {
		if name, ok := strings.CutPrefix(u.String(), siteURIPrefix); ok {
			sites = append(sites, name)
		}
	}
	switch {
	case len(sites) == 0:
		return "", fmt.Errorf("certificate %q names no lifeboat site; issue site certificates with `lifeboat cert site NAME --ca DIR --out DIR`", c.Subject.CommonName)
	case len(sites) > 1:
		return "", fmt.Errorf("certificate %q names %d sites (%s); a site certificate names exactly one", c.Subject.CommonName, len(sites), strings.Join(sites, ", "))
	}
	if err := CheckSiteName(sites[0]); err != nil {
		return "", fmt.Errorf("certificate %q: %w", c.Subject.CommonName, err)
	}
	return sites[0], nil
}

// material is what both ends of a connection load from Files.
type material struct {
	cert  tls.Certificate
	roots *x509.CertPool
}

// loadMaterial loads and cross-checks f; usage is the role this end plays.
func loadMaterial(f Files, usage x509.ExtKeyUsage) (material, error) {
	now := time.Now()
	caHint := "copy ca.crt from the CA directory (or from beside any site's certificate), or create a CA with `lifeboat cert ca --dir DIR`"
	ca, err := loadCert("CA cert", f.CA, caHint)
	if err != nil {
		return material{}, err
	}
	if !ca.IsCA {
		return material{}, fmt.Errorf("CA cert file %s: %q is not a CA certificate; use the ca.crt that `lifeboat cert` wrote", f.CA, ca.Subject.CommonName)
	}
	if err := checkValidity("CA cert", f.CA, ca, now, "create a new CA with `lifeboat cert ca --dir DIR --force` and issue every site again"); err != nil {
		return material{}, err
	}

	issue := issueHint(f.Cert)
	cert, err := loadCert("cert", f.Cert, issue)
	if err != nil {
		return material{}, err
	}
	key, _, err := loadKey("key", f.Key, issue)
	if err != nil {
		return material{}, err
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return material{}, fmt.Errorf("key file %s does not belong to cert file %s; use the pair one `lifeboat cert site` run wrote, or %s", f.Key, f.Cert, strings.TrimPrefix(issue, "issue one with "))
	}
	if err := checkValidity("cert", f.Cert, cert, now, "issue a new one: "+strings.TrimPrefix(issue, "issue one with ")); err != nil {
		return material{}, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:       roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{usage},
	}); err != nil {
		return material{}, fmt.Errorf("cert file %s is not a site certificate of the CA in %s (%q): %w; use the ca.crt written beside it, or issue it from this CA", f.Cert, f.CA, ca.Subject.CommonName, err)
	}
	if _, err := siteOf(cert); err != nil {
		return material{}, fmt.Errorf("cert file %s: %w", f.Cert, err)
	}
	return material{
		cert:  tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert},
		roots: roots,
	}, nil
}

// issueHint is the command that makes the site certificate certPath, with the
// site and directory filled in from the path.
func issueHint(certPath string) string {
	site := strings.TrimSuffix(filepath.Base(certPath), ".crt")
	if CheckSiteName(site) != nil {
		site = "NAME"
	}
	return fmt.Sprintf("issue one with `lifeboat cert site %s --ca CA_DIR --out %s`", site, filepath.Dir(certPath))
}

// RequirePeer returns a copy of c (a ClientTLS config) that also refuses a
// server whose certificate names a site other than peer, the site being
// dialled: a certificate from the right CA is not enough, it must be that
// site's.
func RequirePeer(c *tls.Config, peer string) *tls.Config {
	c = c.Clone()
	verify := c.VerifyConnection
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if verify != nil {
			if err := verify(cs); err != nil {
				return err
			}
		}
		site, err := verifiedSite(cs)
		if err != nil {
			return err
		}
		if site != peer {
			return fmt.Errorf("the server's certificate names site %q, not %q, the site this one dialled: "+
				"check that peers[].address of %q reaches that site, and that it holds its own certificate (lifeboat cert site %s)", site, peer, peer, peer)
		}
		return nil
	}
	return c
}

package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
)

// CreateCA creates the deployment's CA in dir: a self-signed certificate
// dir/ca.crt and its private key dir/ca.key (mode 0600), valid for validFor.
// It refuses, with ErrExists, to overwrite a CA that is already there: every
// site certificate the old CA issued would stop being trusted.
func CreateCA(dir, name string, validFor time.Duration) error {
	now := time.Now()
	return createCA(dir, name, now.Add(-clockSkew), now.Add(validFor), false)
}

// ReplaceCA is CreateCA that overwrites an existing CA in dir. Every site
// certificate the old CA issued must then be issued again.
func ReplaceCA(dir, name string, validFor time.Duration) error {
	now := time.Now()
	return createCA(dir, name, now.Add(-clockSkew), now.Add(validFor), true)
}

func createCA(dir, name string, notBefore, notAfter time.Time, replace bool) error {
	if strings.TrimSpace(name) == "" {
		return fmt.Errorf("create CA in %s: the CA needs a name (e.g. \"lifeboat CA for acme\")", dir)
	}
	if !notAfter.After(notBefore) || !notAfter.After(time.Now()) {
		return fmt.Errorf("create CA in %s: validity must be positive (e.g. 3650 days)", dir)
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	if !replace {
		for _, p := range []string{certPath, keyPath} {
			if _, err := os.Lstat(p); err == nil {
				return fmt.Errorf("create CA: %s %w: replacing it would make every site certificate it issued untrusted; to replace it anyway run `lifeboat cert ca --dir %s --force`", p, ErrExists, dir)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create CA directory: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("create CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"lifeboat"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// Sites are issued directly by the CA; no intermediate may be minted
		// from a stolen site key or a CA-signed sub-CA.
		MaxPathLen:     0,
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("create CA: %w", err)
	}
	if err := fsutil.WriteFileAtomic(certPath, encodeCert(der), 0o644); err != nil {
		return fmt.Errorf("create CA: %w; %s no longer matches a certificate: remove it and run `lifeboat cert ca --dir %s` again", err, keyPath, dir)
	}
	return nil
}

// IssueSite issues a certificate for site from the CA in caDir and writes
// outDir/<site>.crt, outDir/<site>.key (mode 0600) and a copy of the CA's
// certificate, outDir/ca.crt. The certificate is good for both ends of a
// connection (server and client auth). hosts are the DNS names and IP
// addresses clients dial the site at; a site with none can only be a client.
// Validity is cut at the CA's own expiry, since a certificate cannot outlive
// its issuer. An existing certificate for site in outDir is replaced (renewal);
// an outDir/ca.crt from a different CA is not.
func IssueSite(caDir, outDir, site string, hosts []string, validFor time.Duration) error {
	now := time.Now()
	if validFor <= 0 {
		return fmt.Errorf("issue site %q: validity must be positive (e.g. 365 days)", site)
	}
	return issueSite(caDir, outDir, site, hosts, now.Add(-clockSkew), now.Add(validFor))
}

func issueSite(caDir, outDir, site string, hosts []string, notBefore, notAfter time.Time) error {
	if err := CheckSiteName(site); err != nil {
		return fmt.Errorf("issue site: %w", err)
	}
	dnsNames, ips, err := splitHosts(hosts)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	caCertPath, caKeyPath := filepath.Join(caDir, CACertFile), filepath.Join(caDir, CAKeyFile)
	hint := fmt.Sprintf("create a CA with `lifeboat cert ca --dir %s`", caDir)
	caCert, err := loadCert("CA cert", caCertPath, hint)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	caKey, _, err := loadKey("CA key", caKeyPath, hint)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	if !caCert.IsCA {
		return fmt.Errorf("issue site %q: CA cert file %s is not a CA certificate; point --ca at the directory `lifeboat cert ca` wrote", site, caCertPath)
	}
	if !publicKeysEqual(caCert.PublicKey, caKey.Public()) {
		return fmt.Errorf("issue site %q: CA key file %s does not belong to CA cert file %s; restore the pair from the same `lifeboat cert ca` run", site, caKeyPath, caCertPath)
	}
	if err := checkValidity("CA cert", caCertPath, caCert, time.Now(),
		fmt.Sprintf("create a new CA with `lifeboat cert ca --dir %s --force` and issue every site again", caDir)); err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}

	caPEM := encodeCert(caCert.Raw)
	outCA := filepath.Join(outDir, CACertFile)
	exists, same, err := sameFile(outCA, caPEM)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	if exists && !same {
		// Other bytes may still hold the same CA (say, PEM with comments):
		// compare the certificates, not the files.
		c, err := loadCert("CA cert", outCA, "")
		if err != nil {
			return fmt.Errorf("issue site %q: %w; remove it, and the CA certificate will be copied there", site, err)
		}
		if !bytes.Equal(c.Raw, caCert.Raw) {
			return fmt.Errorf("issue site %q: %s holds another CA's certificate (%q); overwriting it would cut off the sites that trust it: use another --out directory, or remove it if it is stale", site, outCA, c.Subject.CommonName)
		}
		same = true
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("issue site %q: create key: %w", site, err)
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	id, err := url.Parse(siteURIPrefix + site)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: site, Organization: []string{"lifeboat"}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		return fmt.Errorf("issue site %q: sign certificate: %w", site, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}

	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return fmt.Errorf("issue site %q: create output directory: %w", site, err)
	}
	f := SiteFiles(outDir, site)
	if err := fsutil.WriteFileAtomic(f.Key, keyPEM, 0o600); err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	if err := fsutil.WriteFileAtomic(f.Cert, encodeCert(der), 0o644); err != nil {
		return fmt.Errorf("issue site %q: %w; %s no longer matches a certificate: run the command again", site, err, f.Key)
	}
	if !exists || !same {
		if err := fsutil.WriteFileAtomic(outCA, caPEM, 0o644); err != nil {
			return fmt.Errorf("issue site %q: %w", site, err)
		}
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	if err := recordIssued(caDir, c); err != nil {
		return fmt.Errorf("issue site %q: %w", site, err)
	}
	return copyCRL(caDir, outDir, site)
}

// copyCRL copies the CA's revocation list, if it has one, beside the ca.crt
// copy a site gets: a new site learns what is revoked with its certificate.
func copyCRL(caDir, outDir, site string) error {
	data, err := os.ReadFile(filepath.Join(caDir, CRLFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	dst := filepath.Join(outDir, CRLFile)
	if err == nil {
		var same bool
		if _, same, err = sameFile(dst, data); err == nil && !same {
			err = fsutil.WriteFileAtomic(dst, data, 0o644)
		}
	}
	if err != nil {
		return fmt.Errorf("issue site %q: copy the revocation list: %w", site, err)
	}
	return nil
}

// dnsName is a host name, optionally a wildcard one.
var dnsName = regexp.MustCompile(`^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)

// splitHosts sorts hosts into DNS and IP SANs, dropping repeats.
func splitHosts(hosts []string) (dns []string, ips []net.IP, err error) {
	seen := map[string]bool{}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if seen[h] {
			continue
		}
		seen[h] = true
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
			continue
		}
		if len(h) > 253 || !dnsName.MatchString(h) {
			return nil, nil, fmt.Errorf("host %q is neither an IP address nor a DNS name (e.g. dr.example.com or 10.0.0.5)", h)
		}
		dns = append(dns, h)
	}
	return dns, ips, nil
}

func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certificate serial number: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil // never zero
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

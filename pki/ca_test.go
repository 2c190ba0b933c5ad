package pki

import (
	"bytes"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const day = 24 * time.Hour

// newCA creates a CA in a fresh directory and returns the directory.
func newCA(t *testing.T, name string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if err := CreateCA(dir, name, 365*day); err != nil {
		t.Fatalf("CreateCA: %v", err)
	}
	return dir
}

// newSite issues site from caDir into a fresh directory and returns its files.
func newSite(t *testing.T, caDir, site string, hosts ...string) Files {
	t.Helper()
	out := filepath.Join(t.TempDir(), site)
	if err := IssueSite(caDir, out, site, hosts, 30*day); err != nil {
		t.Fatalf("IssueSite %s: %v", site, err)
	}
	return SiteFiles(out, site)
}

func mustLoad(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	c, err := LoadCert(path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestIssueSite(t *testing.T) {
	caDir := newCA(t, "test CA")
	ca := mustLoad(t, filepath.Join(caDir, CACertFile))
	if !ca.IsCA || ca.MaxPathLen != 0 || !ca.MaxPathLenZero || ca.Subject.CommonName != "test CA" {
		t.Errorf("CA cert: IsCA=%v MaxPathLen=%d zero=%v CN=%q", ca.IsCA, ca.MaxPathLen, ca.MaxPathLenZero, ca.Subject.CommonName)
	}

	sites := []struct {
		name  string
		hosts []string
		dns   []string
		ips   []string
	}{
		{"prod-a", []string{"a.example.com", "127.0.0.1", "a.example.com"}, []string{"a.example.com"}, []string{"127.0.0.1"}},
		{"dr_east.1", []string{"::1", "localhost"}, []string{"localhost"}, []string{"::1"}},
	}
	for _, s := range sites {
		t.Run(s.name, func(t *testing.T) {
			f := newSite(t, caDir, s.name, s.hosts...)
			c := mustLoad(t, f.Cert)
			if c.Subject.CommonName != s.name {
				t.Errorf("CN = %q, want %q", c.Subject.CommonName, s.name)
			}
			if got, err := siteOf(c); err != nil || got != s.name {
				t.Errorf("siteOf = %q, %v; want %q", got, err, s.name)
			}
			if !slices.Equal(c.DNSNames, s.dns) {
				t.Errorf("DNS SANs = %q, want %q", c.DNSNames, s.dns)
			}
			var ips []string
			for _, ip := range c.IPAddresses {
				ips = append(ips, ip.String())
			}
			if !slices.Equal(ips, s.ips) {
				t.Errorf("IP SANs = %q, want %q", ips, s.ips)
			}
			if !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
				t.Errorf("ExtKeyUsage = %v, want server and client auth", c.ExtKeyUsage)
			}
			if c.IsCA {
				t.Error("site certificate is a CA")
			}
			if err := c.CheckSignatureFrom(ca); err != nil {
				t.Errorf("site certificate not signed by the CA: %v", err)
			}
			copied, _ := os.ReadFile(f.CA)
			orig, _ := os.ReadFile(filepath.Join(caDir, CACertFile))
			if len(orig) == 0 || !bytes.Equal(copied, orig) {
				t.Errorf("%s is not a copy of the CA certificate", f.CA)
			}
			assertMode(t, f.Key, 0o600)
			assertMode(t, f.Cert, 0o644)
			assertMode(t, filepath.Dir(f.Cert), 0o700|os.ModeDir)
		})
	}
	assertMode(t, filepath.Join(caDir, CAKeyFile), 0o600)
	assertMode(t, caDir, 0o700|os.ModeDir)
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != want {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
	}
}

func TestCreateCARefusesOverwrite(t *testing.T) {
	dir := newCA(t, "first")
	before, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	err = CreateCA(dir, "second", 365*day)
	if !errors.Is(err, ErrExists) {
		t.Fatalf("CreateCA over an existing CA: err = %v, want ErrExists", err)
	}
	if !strings.Contains(err.Error(), "--force") {
		t.Errorf("error does not say how to force: %v", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if !bytes.Equal(before, after) {
		t.Fatal("refused CreateCA changed ca.key")
	}

	// Only the key left (the cert lost): still refused, the key is the CA.
	os.Remove(filepath.Join(dir, CACertFile))
	if err := CreateCA(dir, "second", 365*day); !errors.Is(err, ErrExists) {
		t.Errorf("CreateCA over a lone ca.key: err = %v, want ErrExists", err)
	}

	if err := ReplaceCA(dir, "second", 365*day); err != nil {
		t.Fatalf("ReplaceCA: %v", err)
	}
	if c := mustLoad(t, filepath.Join(dir, CACertFile)); c.Subject.CommonName != "second" {
		t.Errorf("after ReplaceCA CN = %q, want second", c.Subject.CommonName)
	}
	assertMode(t, filepath.Join(dir, CAKeyFile), 0o600)
}

func TestIssueSiteRefuses(t *testing.T) {
	caDir := newCA(t, "test CA")
	otherCA := newCA(t, "other CA")
	foreign := newSite(t, otherCA, "foreign") // its directory holds the other CA's ca.crt

	tests := []struct {
		name   string
		caDir  string
		outDir string
		site   string
		hosts  []string
		want   []string
	}{
		{"slash in name", caDir, t.TempDir(), "../evil", nil, []string{`"../evil"`, "letters, digits"}},
		{"empty name", caDir, t.TempDir(), "", nil, []string{"site name"}},
		{"leading dot", caDir, t.TempDir(), ".hidden", nil, []string{"not usable"}},
		{"bad host", caDir, t.TempDir(), "a", []string{"not a host"}, []string{`"not a host"`, "neither an IP address nor a DNS name"}},
		{"no CA", filepath.Join(t.TempDir(), "none"), t.TempDir(), "a", nil, []string{"ca.crt", "no such file", "lifeboat cert ca --dir"}},
		{"other CA's ca.crt in out dir", caDir, filepath.Dir(foreign.Cert), "a", nil, []string{"another CA's certificate", `"other CA"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := IssueSite(tt.caDir, tt.outDir, tt.site, tt.hosts, day)
			if err == nil {
				t.Fatal("IssueSite succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if _, statErr := os.Stat(filepath.Join(tt.outDir, tt.site+".key")); statErr == nil && tt.site != "" {
				t.Errorf("refused IssueSite left a key behind")
			}
		})
	}
}

func TestIssueSiteIntoCADirAndRenew(t *testing.T) {
	caDir := newCA(t, "test CA")
	caPEM, _ := os.ReadFile(filepath.Join(caDir, CACertFile))
	for range 2 { // the second run renews
		if err := IssueSite(caDir, caDir, "a", nil, day); err != nil {
			t.Fatalf("IssueSite into the CA directory: %v", err)
		}
	}
	now, _ := os.ReadFile(filepath.Join(caDir, CACertFile))
	if !bytes.Equal(caPEM, now) {
		t.Error("issuing into the CA directory changed ca.crt")
	}
}

func TestSiteValidityCappedAtCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	now := time.Now()
	if err := createCA(dir, "short CA", now.Add(-time.Minute), now.Add(time.Hour), false); err != nil {
		t.Fatal(err)
	}
	ca := mustLoad(t, filepath.Join(dir, CACertFile))
	out := t.TempDir()
	if err := IssueSite(dir, out, "a", nil, 365*day); err != nil {
		t.Fatal(err)
	}
	if c := mustLoad(t, SiteFiles(out, "a").Cert); !c.NotAfter.Equal(ca.NotAfter) {
		t.Errorf("site NotAfter = %v, want the CA's %v", c.NotAfter, ca.NotAfter)
	}
}

func TestSplitHosts(t *testing.T) {
	dns, ips, err := splitHosts([]string{"*.dr.example.com", "10.0.0.5", " host ", "fe80::1"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dns, []string{"*.dr.example.com", "host"}) {
		t.Errorf("dns = %q", dns)
	}
	if len(ips) != 2 || !ips[0].Equal(net.ParseIP("10.0.0.5")) || !ips[1].Equal(net.ParseIP("fe80::1")) {
		t.Errorf("ips = %v", ips)
	}
	for _, bad := range []string{"", "a b", "a/b", "-a.com", "a..b", "https://a"} {
		if _, _, err := splitHosts([]string{bad}); err == nil {
			t.Errorf("splitHosts(%q) accepted it", bad)
		}
	}
}

// A site named ca (any case), issued into the CA's own directory as the
// README's setup does for every site, replaced the CA's key and certificate:
// no site could be issued again. The name is refused, and the CA stays.
func TestSiteNamedCAIsRefused(t *testing.T) {
	caDir := newCA(t, "test CA")
	keyBefore, err := os.ReadFile(filepath.Join(caDir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ca", "CA", "Ca"} {
		if err := IssueSite(caDir, caDir, name, []string{"ca.example.net"}, day); err == nil || !strings.Contains(err.Error(), "the CA's own") {
			t.Errorf("IssueSite(site %q) = %v, want a refusal naming the CA's files", name, err)
		}
	}
	if keyAfter, _ := os.ReadFile(filepath.Join(caDir, CAKeyFile)); string(keyBefore) != string(keyAfter) {
		t.Fatal("the CA's private key changed")
	}
	if c := mustLoad(t, filepath.Join(caDir, CACertFile)); !c.IsCA {
		t.Errorf("ca.crt now holds %q, not a CA certificate", c.Subject.CommonName)
	}
	if err := IssueSite(caDir, caDir, "canada", nil, day); err != nil {
		t.Errorf("a site named canada: %v", err)
	}
}

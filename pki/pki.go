// Package pki is the deployment's own certificate authority: it creates the CA,
// issues site certificates, and builds the mutual-TLS configs sites talk over.
//
// A site is named in its certificate twice: as the subject's common name, for
// people reading the certificate, and as the URI SAN "urn:lifeboat:site:NAME",
// which is what PeerSite trusts. Extra hosts become DNS or IP SANs, so a client
// verifies a server's address the ordinary way. Keys are ECDSA P-256, PKCS #8.
package pki

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// File names inside a CA directory and a site directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// siteURIPrefix is the opaque URI a site certificate carries as its identity.
// A URN cannot collide with a host name, unlike a DNS SAN such as "site-a".
const siteURIPrefix = "urn:lifeboat:site:"

// clockSkew backdates NotBefore so a certificate issued on one site is already
// valid on another whose clock is a little behind.
const clockSkew = 5 * time.Minute

// ErrExists is returned when creating a CA would overwrite an existing one.
var ErrExists = errors.New("already exists")

// Files names the PEM files a site uses for mutual TLS: the deployment CA's
// certificate, the site's certificate and the site's private key, and the
// CA's revocation list (see Revocations; "" checks none). CRLSeen is where
// the site records the newest revocation list it accepted (in its
// state_dir), so that an older one is refused after a restart too; ""
// remembers it for the life of each Revocations only.
type Files struct{ CA, Cert, Key, CRL, CRLSeen string }

// SiteFiles returns the files IssueSite writes for site into dir, with the
// revocation list beside the CA's certificate.
func SiteFiles(dir, site string) Files {
	return Files{
		CA:   filepath.Join(dir, CACertFile),
		Cert: filepath.Join(dir, site+".crt"),
		Key:  filepath.Join(dir, site+".key"),
		CRL:  filepath.Join(dir, CRLFile),
	}
}

// siteName is what a site may be called: it becomes a file name and a URN, so
// no slashes, no leading dot, nothing that needs escaping.
var siteName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CheckSiteName reports whether name can name a site, and why not.
func CheckSiteName(name string) error {
	if !siteName.MatchString(name) {
		return fmt.Errorf("site name %q is not usable: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. \"dr-east\")", name)
	}
	// A site's files are NAME.crt and NAME.key, beside the CA's ca.crt and
	// ca.key in the directory the README issues into: a site named ca would
	// overwrite the CA's own key and certificate.
	if strings.EqualFold(name, "ca") {
		return fmt.Errorf("site name %q is not usable: its files would be the CA's own (%s, %s); name the site otherwise (e.g. \"ca-east\", \"canada\")", name, CACertFile, CAKeyFile)
	}
	return nil
}

package pki

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
)

// Revocation. `lifeboat cert revoke` adds a site certificate to the CA's
// revocation list, CADIR/ca.crl: an X.509 CRL signed by the CA, so a copy
// carried to each site beside ca.crt cannot be forged by whoever carries it
// (`openssl crl -in ca.crl -text` reads it). A site reads its copy at every
// connection it makes or takes when the file changed (its size and time), so
// a revocation takes effect without a restart.
const (
	CRLFile = "ca.crl"
	// IssuedDir, inside the CA directory, keeps a copy of every certificate
	// the CA issued, by serial: what `lifeboat cert revoke SERIAL` finds.
	IssuedDir = "issued"
)

// ErrRevoked is what a revoked certificate's error matches with errors.Is.
var ErrRevoked = errors.New("certificate revoked")

// RevokedError is a peer's certificate found in the revocation list.
type RevokedError struct {
	Site    string // the site the certificate names
	Subject string
	Serial  string
	At      time.Time // when it was revoked
	List    string    // the revocation list file
}

func (e *RevokedError) Error() string {
	return fmt.Sprintf("the certificate of site %q (subject %q, serial %s) is revoked (since %s, in %s)",
		e.Site, e.Subject, e.Serial, e.At.UTC().Format(time.RFC3339), e.List)
}

func (e *RevokedError) Is(target error) bool { return target == ErrRevoked }

// Serial is how lifeboat writes a certificate's serial number: upper-case
// hex, as `openssl x509 -serial` prints it.
func Serial(c *x509.Certificate) string { return fmt.Sprintf("%X", c.SerialNumber) }

// parseSerial reads a serial typed as Serial prints it, or with colons
// between bytes or a leading 0x, as other tools print it.
func parseSerial(s string) (*big.Int, bool) {
	h := strings.ReplaceAll(strings.TrimPrefix(strings.ToLower(strings.TrimSpace(s)), "0x"), ":", "")
	n, ok := new(big.Int).SetString(h, 16)
	if !ok || n.Sign() <= 0 || h == "" {
		return nil, false
	}
	return n, true
}

// DefaultCRLValidity is how long a list that `lifeboat cert revoke` or
// `lifeboat cert crl` signs is current: its NextUpdate, after which sites
// warn (see Revocations.Status) until `lifeboat cert crl` signs it again.
const DefaultCRLValidity = 365 * 24 * time.Hour

// Revoke adds a certificate the CA in caDir issued to its revocation list,
// caDir/ca.crl, creating the list on first use. what is the certificate's
// file (a site's NAME.crt) or its serial (as `lifeboat cert revoke` and
// `openssl x509 -serial` print it). It returns the certificate revoked and
// whether it was revoked already (the list is then left as it was). The
// list is signed with the next number (sites refuse a list older than one
// they accepted) and is current for DefaultCRLValidity.
func Revoke(caDir, what string) (c *x509.Certificate, already bool, err error) {
	ca, caKey, err := loadCA(caDir)
	if err != nil {
		return nil, false, fmt.Errorf("revoke: %w", err)
	}
	c, err = findIssued(caDir, ca, what)
	if err != nil {
		return nil, false, fmt.Errorf("revoke: %w", err)
	}
	listPath := filepath.Join(caDir, CRLFile)
	list, err := readCRL(listPath, ca)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("revoke: %w", err)
	}
	var entries []x509.RevocationListEntry
	if list != nil {
		entries = list.RevokedCertificateEntries
		for _, e := range entries {
			if e.SerialNumber.Cmp(c.SerialNumber) == 0 {
				return c, true, nil
			}
		}
	}
	entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now().UTC().Truncate(time.Second)})
	if _, err := signCRL(listPath, ca, caKey, list, entries, DefaultCRLValidity); err != nil {
		return nil, false, fmt.Errorf("revoke: %w", err)
	}
	return c, false, nil
}

// RenewCRL signs the CA's revocation list in caDir again, with the same
// certificates, the next number and a NextUpdate validity from now (cut at
// the CA's end), creating an empty list if there is none yet: what
// `lifeboat cert crl` does before a list's NextUpdate passes.
func RenewCRL(caDir string, validity time.Duration) (*x509.RevocationList, error) {
	ca, caKey, err := loadCA(caDir)
	if err != nil {
		return nil, fmt.Errorf("renew the revocation list: %w", err)
	}
	listPath := filepath.Join(caDir, CRLFile)
	list, err := readCRL(listPath, ca)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("renew the revocation list: %w", err)
	}
	var entries []x509.RevocationListEntry
	if list != nil {
		entries = list.RevokedCertificateEntries
	}
	rl, err := signCRL(listPath, ca, caKey, list, entries, validity)
	if err != nil {
		return nil, fmt.Errorf("renew the revocation list: %w", err)
	}
	return rl, nil
}

// LoadCRL reads the CA's revocation list in caDir, checked against its
// certificate.
func LoadCRL(caDir string) (*x509.RevocationList, error) {
	ca, err := loadCert("CA cert", filepath.Join(caDir, CACertFile), "")
	if err != nil {
		return nil, err
	}
	return readCRL(filepath.Join(caDir, CRLFile), ca)
}

// loadCA reads the CA's certificate and key from caDir, checked to be a pair.
func loadCA(caDir string) (*x509.Certificate, crypto.Signer, error) {
	caCertPath, caKeyPath := filepath.Join(caDir, CACertFile), filepath.Join(caDir, CAKeyFile)
	hint := fmt.Sprintf("point --ca at the directory `lifeboat cert ca` wrote (it holds %s and %s)", CACertFile, CAKeyFile)
	ca, err := loadCert("CA cert", caCertPath, hint)
	if err != nil {
		return nil, nil, err
	}
	caKey, _, err := loadKey("CA key", caKeyPath, hint)
	if err != nil {
		return nil, nil, err
	}
	if !publicKeysEqual(ca.PublicKey, caKey.Public()) {
		return nil, nil, fmt.Errorf("CA key file %s does not belong to CA cert file %s; restore the pair from the same `lifeboat cert ca` run", caKeyPath, caCertPath)
	}
	return ca, caKey, nil
}

// signCRL signs entries as the list after prev (nil: the first), numbered
// one above it and current for validity (cut at the CA's end), and writes
// it to path.
func signCRL(path string, ca *x509.Certificate, caKey crypto.Signer, prev *x509.RevocationList, entries []x509.RevocationListEntry, validity time.Duration) (*x509.RevocationList, error) {
	number := big.NewInt(0)
	if prev != nil && prev.Number != nil {
		number = prev.Number
	}
	now := time.Now()
	next := now.Add(validity)
	if next.After(ca.NotAfter) {
		next = ca.NotAfter
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		RevokedCertificateEntries: entries,
		Number:                    new(big.Int).Add(number, big.NewInt(1)),
		ThisUpdate:                now.Add(-clockSkew),
		NextUpdate:                next,
	}, ca, caKey)
	if err != nil {
		return nil, fmt.Errorf("sign the revocation list: %w", err)
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, fmt.Errorf("sign the revocation list: %w", err)
	}
	if err := fsutil.WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	return rl, nil
}

// findIssued is the certificate what names (its file, or its serial among
// those the CA recorded in IssuedDir), checked to be one ca issued.
func findIssued(caDir string, ca *x509.Certificate, what string) (*x509.Certificate, error) {
	if _, err := os.Stat(what); err == nil {
		c, err := loadCert("cert", what, "")
		if err != nil {
			return nil, fmt.Errorf("%w; name a site's certificate file (NAME.crt) or its serial", err)
		}
		if err := c.CheckSignatureFrom(ca); err != nil {
			return nil, fmt.Errorf("cert file %s (subject %q, serial %s) was not issued by the CA in %s (%q): %v; revoke it with the CA that issued it", what, c.Subject.String(), Serial(c), caDir, ca.Subject.CommonName, err)
		}
		if c.IsCA {
			return nil, fmt.Errorf("cert file %s is the CA's own certificate, which cannot be revoked: to stop trusting it, create a new CA (`lifeboat cert ca --dir DIR --force`) and issue every site again", what)
		}
		return c, nil
	}
	n, ok := parseSerial(what)
	if !ok {
		return nil, fmt.Errorf("%q is neither a certificate file nor a serial number; e.g. `lifeboat cert revoke %s/prod.crt --ca %s`", what, caDir, caDir)
	}
	path := filepath.Join(caDir, IssuedDir, fmt.Sprintf("%X.crt", n))
	c, err := loadCert("cert", path, "")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("serial %X: the CA in %s issued no certificate of that serial (it records those it issues in %s); check the serial (`openssl x509 -noout -serial -in NAME.crt`), or pass the certificate file itself", n, caDir, filepath.Join(caDir, IssuedDir))
	}
	if err != nil {
		return nil, err
	}
	if err := c.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("%s was not issued by the CA in %s: %v", path, caDir, err)
	}
	return c, nil
}

// recordIssued keeps a copy of c in the CA's IssuedDir, for revoking it by
// serial later.
func recordIssued(caDir string, c *x509.Certificate) error {
	dir := filepath.Join(caDir, IssuedDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("record the issued certificate: %w", err)
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, Serial(c)+".crt"), encodeCert(c.Raw), 0o644)
}

// readCRL reads and checks the revocation list at path: a PEM (or DER) CRL
// signed by ca. A missing file matches fs.ErrNotExist.
func readCRL(path string, ca *x509.Certificate) (*x509.RevocationList, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, notExistError(fmt.Sprintf("revocation list %s: no such file", path))
		}
		return nil, fmt.Errorf("revocation list %s: %w", path, err)
	}
	der := data
	if bytes.Contains(data, []byte("-----BEGIN")) {
		block, _ := pem.Decode(data)
		if block == nil || block.Type != "X509 CRL" {
			return nil, fmt.Errorf("revocation list %s: no PEM X509 CRL block in it", path)
		}
		der = block.Bytes
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, fmt.Errorf("revocation list %s: %w", path, err)
	}
	if err := rl.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("revocation list %s was not signed by the deployment CA %q: %w", path, ca.Subject.CommonName, err)
	}
	return rl, nil
}

// Revocations is a site's view of the CA's revocation list (Files.CRL). The
// file is read again when it changes, at the next check. Once the site has
// read a list it never runs without one: a list that is removed, or that
// does not read or check, fails every check (every peer is refused) until it
// is put right. A file absent from the start means nothing is revoked yet.
//
// Lists are numbered (the CRL number, one up at each `lifeboat cert revoke`
// or `cert crl`). A site remembers the highest number it accepted, in
// Files.CRLSeen across restarts, and refuses an older list as it refuses a
// broken one: an older copy, validly signed, would un-revoke every
// certificate revoked since. A list past its NextUpdate is still enforced,
// and only warned of (Status): lists reach sites by hand, and refusing every
// peer on the day an operator forgot to renew one would stop the replication
// of every production VM, which revocation exists to protect; the number,
// not the date, is what keeps an old list out.
type Revocations struct {
	path     string
	seenPath string // Files.CRLSeen
	ca       *x509.Certificate

	mu      sync.Mutex
	stamp   string
	seen    bool                 // a list was read: from now on one must be there
	revoked map[string]time.Time // serial (Serial) -> when it was revoked
	list    *x509.RevocationList // the list in force
	highest *crlSeen             // the newest list accepted, here or (seenPath) by this site before
	err     error                // the last read's failure, which every check returns
}

// crlSeen is the newest list a site accepted, as Files.CRLSeen records it.
// It holds for the CA that signed it only: a new CA numbers its lists from
// 1 again.
type crlSeen struct {
	CA         string    `json:"ca"`     // the CA certificate's SHA-256, hex
	Number     string    `json:"number"` // decimal
	ThisUpdate time.Time `json:"this_update"`
	File       string    `json:"file"`
	Accepted   time.Time `json:"accepted"`
	n          *big.Int
}

// listError is a refused list whose message says what to do already.
type listError struct{ msg string }

func (e *listError) Error() string { return e.msg }

// LoadRevocations reads f.CRL, checked against the CA in f.CA; nil when
// f.CRL is empty (no revocation checks). A list that does not read or check,
// or is older than one this site accepted (f.CRLSeen), is an error now,
// naming the file and what to do.
func LoadRevocations(f Files) (*Revocations, error) {
	if f.CRL == "" {
		return nil, nil
	}
	ca, err := loadCert("CA cert", f.CA, "")
	if err != nil {
		return nil, err
	}
	r := &Revocations{path: f.CRL, seenPath: f.CRLSeen, ca: ca}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.reload(); err != nil {
		if le := (*listError)(nil); errors.As(err, &le) {
			return nil, err
		}
		return nil, fmt.Errorf("%w; copy %s again from the CA's directory, where `lifeboat cert revoke` writes it", err, CRLFile)
	}
	return r, nil
}

// Path is the revocation list's file.
func (r *Revocations) Path() string { return r.path }

// CRLStatus is the revocation list a site holds, for `lifeboat status`.
type CRLStatus struct {
	File       string
	Number     string // "" for a list without one
	ThisUpdate time.Time
	NextUpdate time.Time // zero for a list without one
	Err        error     // the list is refused: every peer is refused
}

// Status reads the list again if it changed and says which one is in force
// (nil: no list yet, or no revocation checks).
func (r *Revocations) Status() *CRLStatus {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reload()
	if r.list == nil && r.err == nil {
		return nil
	}
	s := &CRLStatus{File: r.path, Err: r.err}
	if r.list != nil {
		if r.list.Number != nil {
			s.Number = r.list.Number.String()
		}
		s.ThisUpdate, s.NextUpdate = r.list.ThisUpdate, r.list.NextUpdate
	}
	return s
}

// reload reads the list if it changed since the last read, or if that read
// failed (a copy caught half written reads whole a moment later). A failure
// is kept in r.err, which every check returns, and returned as it came.
func (r *Revocations) reload() error {
	st := crlStamp(r.path)
	if st == r.stamp && r.err == nil {
		return nil
	}
	r.stamp = st
	if err := r.readSeen(); err != nil {
		r.err = err
		return err
	}
	rl, err := readCRL(r.path, r.ca)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !r.seen:
		r.revoked, r.err = nil, nil
		return nil
	case errors.Is(err, fs.ErrNotExist) && r.list == nil:
		// Known only from f.CRLSeen: this site accepted a list before.
		r.err = &listError{fmt.Sprintf("revocation list %s is missing, but this site accepted number %s of it on %s (recorded in %s): without it, every certificate revoked since would be trusted; every peer is refused until it is back (copy %s from the CA's directory, where `lifeboat cert revoke` writes it)",
			r.path, r.highest.Number, r.highest.Accepted.UTC().Format(time.RFC3339), r.seenPath, CRLFile)}
		return r.err
	case errors.Is(err, fs.ErrNotExist):
		r.err = &listError{fmt.Sprintf("revocation list %s was removed after this site had read it: every peer is refused until it is back (copy %s from the CA's directory, where `lifeboat cert revoke` writes it)", r.path, CRLFile)}
		return r.err
	case err != nil:
		r.err = fmt.Errorf("%w: every peer is refused until it reads (copy %s again from the CA's directory, where `lifeboat cert revoke` writes it)", err, CRLFile)
		return err
	}
	n := rl.Number
	if n == nil {
		n = new(big.Int)
	}
	if h := r.highest; h != nil && n.Cmp(h.n) < 0 {
		r.err = &listError{fmt.Sprintf("revocation list %s is number %s, older than number %s this site accepted on %s: an older list un-revokes every certificate revoked since; every peer is refused until the newest is back (copy %s again from the CA's directory, where `lifeboat cert revoke` and `lifeboat cert crl` write it; `openssl crl -noout -crlnumber -in %s` shows a list's number)",
			r.path, n, h.Number, h.Accepted.UTC().Format(time.RFC3339), CRLFile, CRLFile)}
		return r.err
	}
	if r.highest == nil || n.Cmp(r.highest.n) > 0 {
		h := &crlSeen{CA: caID(r.ca), Number: n.String(), ThisUpdate: rl.ThisUpdate.UTC(), File: r.path, Accepted: time.Now().UTC(), n: n}
		if err := r.writeSeen(h); err != nil {
			r.err = err
			return err
		}
		r.highest = h
	}
	revoked := make(map[string]time.Time, len(rl.RevokedCertificateEntries))
	for _, e := range rl.RevokedCertificateEntries {
		revoked[fmt.Sprintf("%X", e.SerialNumber)] = e.RevocationTime
	}
	r.seen, r.revoked, r.list, r.err = true, revoked, rl, nil
	return nil
}

// seenMu orders the writes of CRLSeen files by the Revocations of one
// process (a site's server and each of its dials hold one each).
var seenMu sync.Mutex

// readSeen takes the newest list this site recorded, when it is newer than
// the one r knows (another Revocations of this site, or an earlier run,
// accepted it).
func (r *Revocations) readSeen() error {
	if r.seenPath == "" {
		return nil
	}
	h, err := readSeenFile(r.seenPath, r.ca)
	if err != nil {
		return err
	}
	if h != nil && (r.highest == nil || h.n.Cmp(r.highest.n) > 0) {
		r.highest, r.seen = h, true
	}
	return nil
}

// caID names a CA in a crlSeen record.
func caID(ca *x509.Certificate) string {
	sum := sha256.Sum256(ca.Raw)
	return hex.EncodeToString(sum[:])
}

// readSeenFile reads the record at path; nil when there is none, or when it
// is another CA's (the deployment made a new CA since).
func readSeenFile(path string, ca *x509.Certificate) (*crlSeen, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	bad := func(err error) error {
		return &listError{fmt.Sprintf("%s, where this site records the newest revocation list it accepted, does not read (%v): every peer is refused until it does; restore it from a backup, or remove it to take whatever list is in place as the newest (check first that it is the CA's newest: an older one un-revokes)", path, err)}
	}
	if err != nil {
		return nil, bad(err)
	}
	var h crlSeen
	if err := json.Unmarshal(data, &h); err != nil {
		return nil, bad(err)
	}
	n, ok := new(big.Int).SetString(h.Number, 10)
	if !ok || n.Sign() < 0 {
		return nil, bad(fmt.Errorf("number %q", h.Number))
	}
	if h.CA != caID(ca) {
		return nil, nil
	}
	h.n = n
	return &h, nil
}

// writeSeen records h as the newest list this site accepted, unless the
// file holds a newer one already.
func (r *Revocations) writeSeen(h *crlSeen) error {
	if r.seenPath == "" {
		return nil
	}
	seenMu.Lock()
	defer seenMu.Unlock()
	if cur, err := readSeenFile(r.seenPath, r.ca); err != nil {
		return err
	} else if cur != nil && cur.n.Cmp(h.n) >= 0 {
		return nil
	}
	data, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(r.seenPath, append(data, '\n'), 0o644); err != nil {
		return &listError{fmt.Sprintf("record revocation list %s number %s as the newest this site accepted: %v; every peer is refused until it can be recorded (free space in, or fix the permissions of, %s)", r.path, h.Number, err, filepath.Dir(r.seenPath))}
	}
	return nil
}

// crlStamp identifies the list file's version: its size and modification
// time, and its inode and change time, so that a copy renamed into place
// (a new inode) or written over with its time set back (`touch -r`: the
// change time moves all the same) is read even when the size and the
// modification time are the same.
func crlStamp(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return "-"
	}
	st := fmt.Sprintf("%d.%d", fi.Size(), fi.ModTime().UnixNano())
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st += fmt.Sprintf(".%d.%d.%d.%d", sys.Dev, sys.Ino, sys.Ctim.Sec, sys.Ctim.Nsec)
	}
	return st
}

// Check says whether c may be a peer: a *RevokedError if the list revokes
// it, the list's own error if it does not read (fail closed), else nil. A
// nil Revocations revokes nothing.
func (r *Revocations) Check(c *x509.Certificate) error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.reload(); r.err != nil {
		return r.err
	}
	at, ok := r.revoked[Serial(c)]
	if !ok {
		return nil
	}
	site, err := siteOf(c)
	if err != nil {
		site = c.Subject.CommonName
	}
	return &RevokedError{Site: site, Subject: c.Subject.String(), Serial: Serial(c), At: at, List: r.path}
}

// CheckPeer is Check of the certificate the peer of a handshake presented
// (resumed or not: Go restores the peer's certificates with the session).
func (r *Revocations) CheckPeer(cs tls.ConnectionState) error {
	if r == nil {
		return nil
	}
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the peer presented no certificate")
	}
	return r.Check(cs.PeerCertificates[0])
}

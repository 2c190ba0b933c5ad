package pki

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// revoke revokes what in caDir and copies the list to each site's
// directory, as an operator does.
func revoke(t *testing.T, caDir, what string, to ...Files) {
	t.Helper()
	if _, _, err := Revoke(caDir, what); err != nil {
		t.Fatalf("Revoke %s: %v", what, err)
	}
	data, err := os.ReadFile(filepath.Join(caDir, CRLFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range to {
		if err := os.WriteFile(f.CRL, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRevoke(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	other := newSite(t, newCA(t, "other CA"), "site-a", "localhost")
	ca, ac, bc := mustLoad(t, filepath.Join(caDir, CACertFile)), mustLoad(t, a.Cert), mustLoad(t, b.Cert)

	// By file, then again: the second says so and changes nothing.
	c, already, err := Revoke(caDir, a.Cert)
	if err != nil || already || Serial(c) != Serial(ac) {
		t.Fatalf("Revoke %s: %v, already %v, serial %v; want a's serial revoked now", a.Cert, err, already, c)
	}
	list := filepath.Join(caDir, CRLFile)
	before, _ := os.ReadFile(list)
	if _, already, err := Revoke(caDir, a.Cert); err != nil || !already {
		t.Errorf("revoking a again: already %v, %v; want already", already, err)
	}
	if after, _ := os.ReadFile(list); string(after) != string(before) {
		t.Error("revoking a again rewrote the list")
	}
	// By serial, as openssl prints it (colons, lower case) too.
	s := strings.ToLower(Serial(bc))
	if len(s)%2 == 1 {
		s = "0" + s
	}
	var colons []string
	for i := 0; i < len(s); i += 2 {
		colons = append(colons, s[i:i+2])
	}
	if c, _, err := Revoke(caDir, strings.Join(colons, ":")); err != nil || Serial(c) != Serial(bc) {
		t.Fatalf("Revoke by serial %s: %v, %v", Serial(bc), c, err)
	}
	rev, err := LoadRevocations(Files{CA: filepath.Join(caDir, CACertFile), CRL: list})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, serial string }{{"site-a", Serial(ac)}, {"site-b", Serial(bc)}} {
		cert := ac
		if c.name == "site-b" {
			cert = bc
		}
		err := rev.Check(cert)
		var re *RevokedError
		if !errors.As(err, &re) || !errors.Is(err, ErrRevoked) || re.Site != c.name || re.Serial != c.serial {
			t.Errorf("Check %s: %v, want it revoked", c.name, err)
		}
	}
	if err := rev.Check(ca); err != nil {
		t.Errorf("Check of a certificate not revoked: %v", err)
	}

	notCert := filepath.Join(t.TempDir(), "notes.txt")
	os.WriteFile(notCert, []byte("not a certificate\n"), 0o600)
	for _, tt := range []struct{ what, want string }{
		{"0123ABCD", "issued no certificate of that serial"},
		{"not-a-serial", "neither a certificate file nor a serial"},
		{notCert, "no PEM CERTIFICATE"},
		{a.Key, "no PEM CERTIFICATE"},
		{other.Cert, "was not issued by the CA"},
		{filepath.Join(caDir, CACertFile), "the CA's own certificate"},
	} {
		if _, _, err := Revoke(caDir, tt.what); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Revoke %q: %v, want an error saying %q", tt.what, err, tt.want)
		}
	}
	if after, _ := os.ReadFile(list); len(after) == 0 {
		t.Error("a refused revocation emptied the list")
	}

	// A site issued after a revocation gets the list with its certificate.
	c2 := newSite(t, caDir, "site-c", "localhost")
	if _, err := os.Stat(c2.CRL); err != nil {
		t.Errorf("site issued after a revocation has no copy of the list: %v", err)
	}
}

// A server revoked after a session with it was made is refused when the
// client resumes that session, and the server's check of a resumed
// session's client finds a revoked client: VerifyConnection runs on
// resumption, VerifyPeerCertificate does not.
func TestRevokedPeerRefusedOnResumedSession(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	server := serverTLS(t, b)
	client := clientTLS(t, a, "localhost")
	client.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	var resumed bool
	verifyClient := client.VerifyConnection
	client.VerifyConnection = func(cs tls.ConnectionState) error {
		resumed = cs.DidResume
		return verifyClient(cs)
	}
	var atServer tls.ConnectionState
	verifyServer := server.VerifyConnection
	server.VerifyConnection = func(cs tls.ConnectionState) error {
		atServer = cs
		return verifyServer(cs)
	}
	for i := range 2 {
		if r := handshake(t, server, client); r.clientErr != nil || r.serverErr != nil {
			t.Fatalf("connection %d: client %v, server %v", i, r.clientErr, r.serverErr)
		}
	}
	if !resumed || !atServer.DidResume {
		t.Fatalf("the second connection did not resume its session (client %v, server %v): the test proves nothing", resumed, atServer.DidResume)
	}

	revoke(t, caDir, b.Cert, a)
	r := handshake(t, server, client)
	if r.clientErr == nil || !strings.Contains(r.clientErr.Error(), "revoked") || !strings.Contains(r.clientErr.Error(), `"site-b"`) ||
		!strings.Contains(r.clientErr.Error(), Serial(mustLoad(t, b.Cert))) {
		t.Errorf("resuming with a revoked server: %v, want a refusal naming site-b, its serial and \"revoked\"", r.clientErr)
	}

	revoke(t, caDir, a.Cert, b)
	rev, err := LoadRevocations(b)
	if err != nil {
		t.Fatal(err)
	}
	if !atServer.DidResume {
		t.Fatal("the server's last connection was not a resumed one")
	}
	if err := rev.CheckPeer(atServer); !errors.Is(err, ErrRevoked) || !strings.Contains(err.Error(), `"site-a"`) {
		t.Errorf("server's check of a resumed session's revoked client: %v, want site-a revoked", err)
	}
}

// A revocation list that does not read or check is an error at start, naming
// the file; once read, a list changed on disk is taken at the next check, and
// one that stops reading, or goes, fails every check (fail closed).
func TestRevocationListFailsClosed(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	bc := mustLoad(t, b.Cert)

	os.WriteFile(a.CRL, []byte("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n"), 0o644)
	if _, err := LoadRevocations(a); err == nil || !strings.Contains(err.Error(), a.CRL) || !strings.Contains(err.Error(), "copy ca.crl again") {
		t.Errorf("garbage list: %v, want an error naming %s and what to do", err, a.CRL)
	}
	if _, err := ClientTLS(a, "localhost"); err == nil {
		t.Error("ClientTLS took a garbage revocation list")
	}
	otherCA := newCA(t, "other CA")
	other := newSite(t, otherCA, "x", "localhost")
	revoke(t, otherCA, other.Cert, a)
	if _, err := LoadRevocations(a); err == nil || !strings.Contains(err.Error(), "not signed by the deployment CA") {
		t.Errorf("another CA's list: %v, want it refused", err)
	}
	if err := os.Chmod(a.CRL, 0); err == nil && os.Geteuid() != 0 {
		if _, err := LoadRevocations(a); err == nil || !strings.Contains(err.Error(), a.CRL) {
			t.Errorf("unreadable list: %v, want an error naming it", err)
		}
	}

	// No list yet: nothing revoked; one copied in later is taken.
	os.Remove(a.CRL)
	rev, err := LoadRevocations(a)
	if err != nil {
		t.Fatalf("no list yet: %v", err)
	}
	if err := rev.Check(bc); err != nil {
		t.Fatalf("no list: %v", err)
	}
	revoke(t, caDir, b.Cert, a)
	if err := rev.Check(bc); !errors.Is(err, ErrRevoked) {
		t.Fatalf("after the list was copied in: %v, want b revoked", err)
	}
	ac := mustLoad(t, a.Cert)
	if err := rev.Check(ac); err != nil {
		t.Fatalf("a, not revoked: %v", err)
	}
	// Broken, then gone: every check fails, naming the file.
	os.WriteFile(a.CRL, []byte("half a cop"), 0o644)
	if err := rev.Check(ac); err == nil || errors.Is(err, ErrRevoked) || !strings.Contains(err.Error(), "every peer is refused") {
		t.Errorf("list broken on disk: %v, want every check to fail", err)
	}
	os.Remove(a.CRL)
	if err := rev.Check(ac); err == nil || !strings.Contains(err.Error(), "was removed") {
		t.Errorf("list removed: %v, want every check to fail", err)
	}
}

// An older copy of the list, validly signed by the CA, put in place of the
// newest un-revoked what was revoked since (a rollback). A site remembers the
// highest list number it accepted and refuses an older list as it refuses a
// broken one: every check fails, naming the file, both numbers and what to
// do; the newest list put back is taken again. Over real mutual TLS: the
// client refuses the server, whose certificate only the newer list revokes.
func TestOlderRevocationListIsRefused(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	retired := newSite(t, caDir, "retired", "localhost")
	bc := mustLoad(t, b.Cert)

	revoke(t, caDir, retired.Cert, a) // list number 1: b not in it
	older, err := os.ReadFile(a.CRL)
	if err != nil {
		t.Fatal(err)
	}
	revoke(t, caDir, b.Cert, a) // number 2: b revoked
	newest, _ := os.ReadFile(a.CRL)
	client := clientTLS(t, a, "localhost")
	server := serverTLS(t, b)
	if r := handshake(t, server, client); r.clientErr == nil || !errors.Is(r.clientErr, ErrRevoked) {
		t.Fatalf("revoked server: client %v, want it refused as revoked", r.clientErr)
	}

	os.WriteFile(a.CRL, older, 0o644)
	r := handshake(t, server, client)
	if r.clientErr == nil {
		t.Fatal("an older revocation list put in place of the newest un-revoked site-b: the handshake succeeded")
	}
	for _, s := range []string{a.CRL, "number 1", "number 2", "older", "copy ca.crl"} {
		if !strings.Contains(r.clientErr.Error(), s) {
			t.Errorf("rolled-back list: %v\nwant it to say %q", r.clientErr, s)
		}
	}
	rev, err := LoadRevocations(a)
	if err != nil {
		t.Fatal(err)
	}
	if err := rev.Check(mustLoad(t, a.Cert)); err != nil {
		t.Fatalf("a not revoked: %v", err)
	}
	// A site that read the older list first takes the newest, then refuses
	// the older again.
	os.WriteFile(a.CRL, newest, 0o644)
	if err := rev.Check(bc); !errors.Is(err, ErrRevoked) {
		t.Fatalf("newest list: %v, want b revoked", err)
	}
	os.WriteFile(a.CRL, older, 0o644)
	if err := rev.Check(mustLoad(t, a.Cert)); err == nil || !strings.Contains(err.Error(), "older") {
		t.Errorf("rolled-back list after the newest: %v, want every check to fail", err)
	}
	os.WriteFile(a.CRL, newest, 0o644)
	if r := handshake(t, server, client); !errors.Is(r.clientErr, ErrRevoked) {
		t.Errorf("newest list back: client %v, want site-b refused as revoked", r.clientErr)
	}
	if err := rev.Check(mustLoad(t, a.Cert)); err != nil {
		t.Errorf("newest list back: a: %v", err)
	}
}

// A list is signed current for DefaultCRLValidity (before, until the CA's
// end: no site ever heard it was stale). RenewCRL signs the same
// revocations again under the next number. A list past its next update is
// still enforced, and refuses no other peer for its age (the choice
// Revocations documents): over real mutual TLS, the revoked server is
// refused and one not revoked is served.
func TestRevocationListNextUpdate(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	c := newSite(t, caDir, "site-c", "localhost")
	revoke(t, caDir, b.Cert, a)
	rl, err := LoadCRL(caDir)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(rl.NextUpdate); d < DefaultCRLValidity-time.Hour || d > DefaultCRLValidity {
		t.Errorf("revoke signed a list whose next update is in %v, want %v", d, DefaultCRLValidity)
	}

	renewed, err := RenewCRL(caDir, 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.Number.Cmp(new(big.Int).Add(rl.Number, big.NewInt(1))) != 0 || len(renewed.RevokedCertificateEntries) != 1 ||
		renewed.RevokedCertificateEntries[0].SerialNumber.Cmp(mustLoad(t, b.Cert).SerialNumber) != 0 {
		t.Errorf("renewed list: number %v (was %v), %d entries; want the next number and b still revoked", renewed.Number, rl.Number, len(renewed.RevokedCertificateEntries))
	}
	if d := time.Until(renewed.NextUpdate); d < 10*24*time.Hour-time.Hour || d > 10*24*time.Hour {
		t.Errorf("renewed for 10 days: next update in %v", d)
	}

	// Past its next update: signed with one an hour ago.
	ca, key, err := loadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{RevokedCertificateEntries: renewed.RevokedCertificateEntries,
		Number: big.NewInt(10), ThisUpdate: time.Now().Add(-48 * time.Hour), NextUpdate: time.Now().Add(-time.Hour)}, ca, key)
	if err != nil {
		t.Fatal(err)
	}
	stale, _ := x509.ParseRevocationList(der)
	os.WriteFile(a.CRL, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644)
	client := clientTLS(t, a, "localhost")
	if st := mustRevocations(t, a).Status(); st == nil || !st.NextUpdate.Equal(stale.NextUpdate) || st.Err != nil || !st.NextUpdate.Before(time.Now()) {
		t.Fatalf("status of a list past its next update: %+v", st)
	}
	if r := handshake(t, serverTLS(t, b), client); !errors.Is(r.clientErr, ErrRevoked) {
		t.Errorf("revoked server under a list past its next update: client %v, want it refused as revoked", r.clientErr)
	}
	if r := handshake(t, serverTLS(t, c), client); r.clientErr != nil || r.serverErr != nil {
		t.Errorf("server not revoked, under a list past its next update: client %v, server %v; want it served", r.clientErr, r.serverErr)
	}
}

func mustRevocations(t *testing.T, f Files) *Revocations {
	t.Helper()
	r, err := LoadRevocations(f)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A list replaced by one of the same size and modification time (a renewal
// within the file system's time granularity, or a time set back with
// `touch -r`) is read all the same: the change is seen by the file's inode
// and change time too. Before, the site went on with the list it had read.
func TestRevocationListReplacedUnderTheSameTimeIsRead(t *testing.T) {
	caDir := newCA(t, "test CA")
	a := newSite(t, caDir, "site-a", "localhost")
	b := newSite(t, caDir, "site-b", "localhost")
	revoke(t, caDir, b.Cert, a)
	rev := mustRevocations(t, a)
	first, _ := os.Stat(a.CRL)
	for range 20 { // ECDSA signatures differ in length now and then
		rl, err := RenewCRL(caDir, DefaultCRLValidity)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(filepath.Join(caDir, CRLFile))
		if int64(len(data)) != first.Size() {
			continue
		}
		tmp := a.CRL + ".new"
		os.WriteFile(tmp, data, 0o644)
		os.Chtimes(tmp, first.ModTime(), first.ModTime())
		if err := os.Rename(tmp, a.CRL); err != nil {
			t.Fatal(err)
		}
		if st := rev.Status(); st == nil || st.Number != rl.Number.String() {
			t.Fatalf("list number %s copied in, same size and time as the one before: the site holds %+v", rl.Number, st)
		}
		return
	}
	t.Fatal("no renewed list of the same size in 20 tries: the test proves nothing")
}

// The newest list a site accepted is recorded for the CA that signed it: a
// deployment that makes a new CA (`lifeboat cert ca --force`) and gives the
// site its ca.crt starts numbering its lists at 1 again, and the site takes
// them; the record of the old CA's number 3 does not refuse them. An older
// list of the new CA is refused again.
func TestNewCAsRevocationListIsTaken(t *testing.T) {
	caDir := newCA(t, "old CA")
	a := newSite(t, caDir, "site-a", "localhost")
	a.CRLSeen = filepath.Join(t.TempDir(), "crl-seen.json")
	for _, s := range []string{"x", "y", "v"} {
		revoke(t, caDir, newSite(t, caDir, s, "localhost").Cert, a)
	}
	if st := mustRevocations(t, a).Status(); st == nil || st.Number != "3" {
		t.Fatalf("old CA's list: %+v, want number 3", st)
	}

	newDir := newCA(t, "new CA")
	a2 := newSite(t, newDir, "site-a", "localhost")
	a2.CRLSeen = a.CRLSeen
	revoke(t, newDir, newSite(t, newDir, "z", "localhost").Cert, a2)
	older, _ := os.ReadFile(a2.CRL)
	revoke(t, newDir, newSite(t, newDir, "w", "localhost").Cert, a2)
	rev, err := LoadRevocations(a2)
	if err != nil {
		t.Fatalf("the new CA's list number 2, after the old CA's number 3: %v", err)
	}
	os.WriteFile(a2.CRL, older, 0o644)
	if err := rev.Check(mustLoad(t, a2.Cert)); err == nil || !strings.Contains(err.Error(), "older") {
		t.Errorf("the new CA's older list: %v, want it refused", err)
	}
	if _, err := LoadRevocations(a2); err == nil || !strings.Contains(err.Error(), "older") {
		t.Errorf("the new CA's older list at start: %v, want it refused", err)
	}
}

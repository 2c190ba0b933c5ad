package wire_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// revokeSite revokes site's certificate in the test site's CA, whose
// revocation list every end of the test deployment reads (they share the
// directory), and returns what a refusal must name: the site, the
// certificate's subject and serial.
func revokeSite(t *testing.T, s *testsite.Site, site string) []string {
	t.Helper()
	c, _, err := pki.Revoke(s.PKI, pki.SiteFiles(s.PKI, site).Cert)
	if err != nil {
		t.Fatal(err)
	}
	return []string{`"` + site + `"`, c.Subject.String(), pki.Serial(c), "revoked"}
}

func wantRefusal(t *testing.T, what string, err error, names []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error, want a refusal of a revoked certificate", what)
	}
	msg := strings.ReplaceAll(err.Error(), `\"`, `"`) // gRPC's transport errors quote ours
	for _, n := range names {
		if !strings.Contains(msg, n) {
			t.Errorf("%s: %v\nwant it to name %q", what, err, n)
		}
	}
}

// sendPoint streams point id of vm (one block of a one-disk VM) and commits it.
func sendPoint(ctx context.Context, c *wire.Client, vm string, id uint64) error {
	p := point(id)
	p.VM = vm
	st, err := c.Begin(ctx, p)
	if err != nil {
		return err
	}
	data := make([]byte, lifeboat.BlockSize)
	data[0] = byte(id)
	if _, err := st.SendBlocks("vda", 0, data, []lifeboat.Hash{lifeboat.HashBlock(data)}); err != nil {
		st.Abort()
		return err
	}
	_, err = st.Commit(lifeboat.CycleStats{})
	return err
}

// A protected site whose certificate is revoked is refused its calls, on the
// connection it made before the revocation too, and its point streams; a
// site of the same deployment not revoked goes on replicating.
func TestRevokedProtectedSiteIsRefused(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	prod, prod2 := site.DialAs(t, "prod", wire.CompressionNone), site.DialAs(t, "prod2", wire.CompressionNone)
	if err := sendPoint(ctx, prod, "vm1", 1); err != nil {
		t.Fatalf("prod before the revocation: %v", err)
	}

	names := revokeSite(t, site, "prod")
	_, _, err := prod.Latest(ctx, "vm1")
	wantRefusal(t, "Latest of revoked prod on its open connection", err, names)
	if err != nil && !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("Latest of revoked prod: %v, want PermissionDenied", err)
	}
	wantRefusal(t, "a point of revoked prod", sendPoint(ctx, prod, "vm1", 2), names)
	_, err = site.ClientAs(ctx, "prod", wire.CompressionNone)
	wantRefusal(t, "a new connection of revoked prod", err, names)
	if pts, _ := site.Store.Points("vm1"); len(pts) != 1 {
		t.Errorf("vm1 has %d points after revoked prod's point, want the 1 from before", len(pts))
	}

	if err := sendPoint(ctx, prod2, "vm2", 1); err != nil {
		t.Errorf("prod2, not revoked: %v", err)
	}
	if _, ok, err := prod2.Latest(ctx, "vm2"); err != nil || !ok {
		t.Errorf("Latest of prod2, not revoked: %v, found %v", err, ok)
	}
}

// A revocation that takes effect while a point streams does not let the
// point commit: the recovery site checks the peer again before the commit.
func TestRevokedWhileStreamingIsNotCommitted(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	prod := site.Dial(t, wire.CompressionNone)
	st, err := prod.Begin(ctx, point(1))
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, lifeboat.BlockSize)
	if _, err := st.SendBlocks("vda", 0, data, []lifeboat.Hash{lifeboat.HashBlock(data)}); err != nil {
		t.Fatal(err)
	}
	names := revokeSite(t, site, "prod")
	_, err = st.Commit(lifeboat.CycleStats{})
	wantRefusal(t, "commit of a point whose site was revoked as it streamed", err, names)
	if pts, _ := site.Store.Points("vm1"); len(pts) != 0 {
		t.Errorf("vm1 has points %v: a revoked site's point was committed", pts)
	}
}

// A protected site refuses a recovery site whose certificate is revoked: on
// the connection made before (its next call), on a new point stream, and on
// a new connection.
func TestRevokedRecoverySiteIsRefused(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	prod := site.Dial(t, wire.CompressionNone)
	if err := sendPoint(ctx, prod, "vm1", 1); err != nil {
		t.Fatal(err)
	}
	names := append(revokeSite(t, site, "dr"), "refuses the server")
	_, _, err := prod.Latest(ctx, "vm1")
	wantRefusal(t, "Latest from revoked dr on the open connection", err, names)
	wantRefusal(t, "a point to revoked dr", sendPoint(ctx, prod, "vm1", 2), names)
	_, err = site.Client(ctx, wire.CompressionNone)
	wantRefusal(t, "a new connection to revoked dr", err, names)
	if pts, _ := site.Store.Points("vm1"); len(pts) != 1 {
		t.Errorf("vm1 has %d points at revoked dr, want the 1 from before", len(pts))
	}
}

// An older copy of the revocation list, validly signed, put back in place of
// the newest at the recovery site (a rollback) does not un-revoke the
// protected site revoked since: the recovery site refuses the older list
// (every peer, naming the file and that it is older) until the newest is
// back.
func TestRolledBackRevocationListDoesNotUnrevoke(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	prod, prod2 := site.DialAs(t, "prod", wire.CompressionNone), site.DialAs(t, "prod2", wire.CompressionNone)
	if err := pki.IssueSite(site.PKI, site.PKI, "retired", []string{"127.0.0.1"}, 24*time.Hour); err != nil {
		t.Fatal(err)
	}
	revokeSite(t, site, "retired")
	list := filepath.Join(site.PKI, pki.CRLFile)
	older, err := os.ReadFile(list)
	if err != nil {
		t.Fatal(err)
	}
	if err := sendPoint(ctx, prod, "vm1", 1); err != nil {
		t.Fatalf("prod before its revocation: %v", err)
	}
	names := revokeSite(t, site, "prod")
	newest, _ := os.ReadFile(list)
	_, _, err = prod.Latest(ctx, "vm1")
	wantRefusal(t, "Latest of revoked prod", err, names)

	if err := os.WriteFile(list, older, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = prod.Latest(ctx, "vm1")
	wantRefusal(t, "Latest of revoked prod under an older list", err, []string{list, "older"})
	wantRefusal(t, "a point of revoked prod under an older list", sendPoint(ctx, prod, "vm1", 2), []string{"older"})
	_, _, err = prod2.Latest(ctx, "vm2")
	wantRefusal(t, "Latest of prod2 under an older list", err, []string{"older"})
	if pts, _ := site.Store.Points("vm1"); len(pts) != 1 {
		t.Errorf("vm1 has %d points, want the 1 from before the revocation", len(pts))
	}

	if err := os.WriteFile(list, newest, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = prod.Latest(ctx, "vm1")
	wantRefusal(t, "Latest of revoked prod with the newest list back", err, names)
	if err := sendPoint(ctx, prod2, "vm2", 1); err != nil {
		t.Errorf("prod2, not revoked, with the newest list back: %v", err)
	}
}

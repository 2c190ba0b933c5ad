package wire_test

import (
	"context"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// After a failover the recovery site "dr" owns the VM itself. A remote peer
// whose certificate also names "dr" (a second host given the same name, a
// copied certificate) passed as the owner of every VM failed over there: it
// read their points and committed new ones into the chain of a VM that runs
// at dr. No remote peer can be the site itself: every call and point stream
// of such a peer is refused, saying why (its first call, Hello, already).
func TestPeerNamedAsTheRecoverySiteIsRefused(t *testing.T) {
	site := testsite.Start(t, recovery.Options{})
	if _, _, err := site.Store.TakeOver("vm1", "dr", 0); err != nil {
		t.Fatal(err)
	}
	prod := site.Dial(t, wire.CompressionNone)
	if _, _, err := prod.Latest(context.Background(), "vm1"); err == nil || !strings.Contains(err.Error(), "failed over") {
		t.Fatalf("prod after the failover: %v, want a refusal", err)
	}
	// A remote peer holding a "dr" certificate: refused at its first call
	// (every call and point stream is checked the same way).
	other, err := site.ClientAs(context.Background(), "dr", wire.CompressionNone)
	if err == nil {
		defer other.Close()
		if _, _, err = other.Latest(context.Background(), "vm1"); err == nil {
			t.Fatal("a remote peer presenting a certificate of site \"dr\" was answered, as owner, about vm1 failed over to dr")
		}
	}
	if !strings.Contains(err.Error(), "code = PermissionDenied") || !strings.Contains(err.Error(), "this recovery site's own name") {
		t.Errorf("a remote peer presenting a certificate of site \"dr\": %v, want PermissionDenied naming the cause", err)
	}
	if pts, _ := site.Store.Points("vm1"); len(pts) != 0 {
		t.Errorf("vm1 has points %v after the refusal", pts)
	}
}

package daemon

import (
	"io"
	"log/slog"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Each `lifeboat sync GROUP` started a goroutine per member to pass its
// progress on, reading a channel that nothing closed: they waited for good,
// and a script syncing a group every minute left thousands a day in the
// site. The group's cycles here fail at once (the site's TLS files are not
// there): the readers must end with each request all the same.
func TestGroupSyncLeavesNoProgressReader(t *testing.T) {
	body := strings.Replace(goodConfig, ", interval: 30s", "", 1) +
		"  - {name: db1, qmp: /db.qmp}\ngroups:\n  - {name: shop, vms: [web1, db1]}\n"
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	c.StateDir = t.TempDir()
	d := New(c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	a := &apiServer{d: d}
	before := runtime.NumGoroutine()
	const syncs = 20
	for range syncs {
		rec := httptest.NewRecorder()
		a.syncGroup(rec, httptest.NewRequest("POST", "/v1/vms/shop/sync", nil), d.groups["shop"])
		if !strings.Contains(rec.Body.String(), `"error"`) {
			t.Fatalf("group sync answered %s, want its cycle's error", rec.Body.String())
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+syncs/2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d group syncs left %d goroutines behind, want none", syncs, runtime.NumGoroutine()-before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

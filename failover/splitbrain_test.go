package failover_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// restartedAfterContact is a recovery site that took a point of vm from
// production by a real cycle over mutual TLS (production's last call), then
// restarted as a killed recovery daemon does; its manager has the daemon's
// split-brain guard. forget removes the site's record of calls before the
// restart (a record lost, or a site upgraded from a lifeboat without it).
func restartedAfterContact(t *testing.T, vm string, forget bool) (*testsite.Site, *failover.Manager) {
	t.Helper()
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, vm)
	if forget {
		if err := os.Remove(filepath.Join(site.Dir, "contacts.json")); err != nil {
			t.Fatalf("the site recorded no call of production: %v", err)
		}
	}
	site.Restart(t)
	m := manager(t, site)
	m.LastContact = site.Server.LastContact
	return site, m
}

// wantUnchanged checks that a refused failover left vm to production.
func wantUnchanged(t *testing.T, site *testsite.Site, m *failover.Manager, vm string) {
	t.Helper()
	if o, _, _ := site.Store.Owner(vm); o.Site != "prod" || o.Epoch != 1 {
		t.Errorf("owner after the refused failover: %+v, want prod at epoch 1", o)
	}
	if pins, _ := site.Store.Pins(vm); len(pins) != 0 {
		t.Errorf("pins after the refused failover: %v", pins)
	}
	if runs, _ := m.Runs(vm); len(runs) != 0 {
		t.Errorf("runs after the refused failover: %v", runs)
	}
}

func wantAll(t *testing.T, what string, err error, parts ...string) {
	t.Helper()
	if !errors.Is(err, failover.ErrSplitBrain) {
		t.Fatalf("%s: %v, want it refused as a possible split brain", what, err)
	}
	t.Logf("%s: %v", what, err)
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("%s: the refusal does not say %q:\n%v", what, p, err)
		}
	}
}

// A failover just after the recovery site restarted, production having
// called a moment before, is refused, and says so: before, the guard knew
// of calls only in memory, and let it through. A plan run is refused the
// same way and starts nothing; a drill and --force go through at once.
func TestFailoverRefusedAfterARestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts guests under QEMU: covered by the full (non -short) run")
	}
	site, m := restartedAfterContact(t, "db1", false)
	_, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{})
	wantAll(t, "failover after a restart", err, `vm "db1"`, `site "prod"`, "before this site restarted at", "its last call on record", "--planned", "--force", "goes through from")
	wantUnchanged(t, site, m, "db1")

	plan := failover.Plan{Name: "db-tier", Steps: []failover.Step{{VMs: []string{"db1"}}}}
	rows, err := m.RunPlan(testCtx(t, time.Minute), plan, failover.PlanOptions{}, nil)
	wantAll(t, "plan run after a restart", err, `plan "db-tier": nothing started`, `vm "db1"`, `site "prod"`, "before this site restarted at", "plan run db-tier --force")
	if len(rows) != 0 {
		t.Errorf("plan rows: %+v, want none", rows)
	}
	wantUnchanged(t, site, m, "db1")

	drill, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{Test: true})
	if err != nil {
		t.Fatalf("a drill after a restart: %v", err)
	}
	if err := m.Stop(testCtx(t, time.Minute), drill); err != nil {
		t.Fatal(err)
	}
	wantFailedOver(t, site, m, "db1", failover.Options{Force: true}, "a forced failover after a restart")
}

// wantFailedOver fails vm over, undone when the test ends.
func wantFailedOver(t *testing.T, site *testsite.Site, m *failover.Manager, vm string, opts failover.Options, what string) {
	t.Helper()
	r, err := m.Start(testCtx(t, time.Minute), vm, opts)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	t.Cleanup(func() { m.Stop(context.Background(), r) })
	if o, _, _ := site.Store.Owner(vm); o.Site != "dr" || o.Epoch != 2 {
		t.Errorf("owner after %s: %+v, want dr at epoch 2", what, o)
	}
}

// Production silent for the contact window after the restart: the
// failover goes through.
func TestFailoverAfterARestartOnceProductionIsSilent(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a guest under QEMU: covered by the full (non -short) run")
	}
	site, m := restartedAfterContact(t, "db1", false)
	m.ContactWindow = 4 * time.Second
	_, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{})
	wantAll(t, "failover after a restart", err, `vm "db1"`, `site "prod"`)
	c := site.Server.LastContact("db1")
	if !c.Restarted || c.Site != "prod" {
		t.Fatalf("the restarted site's knowledge of production: %+v, want its call before the restart", c)
	}
	time.Sleep(time.Until(c.At.Add(m.ContactWindow))) // at most the window
	wantFailedOver(t, site, m, "db1", failover.Options{}, "a failover once production was silent for the window")
}

// With no call on record (lost, or written by a lifeboat before the
// record), a restarted site cannot tell when production last called: the
// failover is refused as unknown, saying how long to wait; once production
// calls, the refusal says it is in contact.
func TestFailoverRefusedAfterARestartWithNoCallOnRecord(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a storage daemon: covered by the full (non -short) run")
	}
	site, m := restartedAfterContact(t, "db1", true)
	_, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{})
	wantAll(t, "failover after a restart with no call on record", err, `vm "db1"`, `site "prod"`, "this site started at", "has heard nothing",
		"no call of it is on record", "Wait until", "is known lost (or fenced), repeat with --force")
	wantUnchanged(t, site, m, "db1")

	if _, _, err := site.Dial(t, wire.CompressionZstd).Latest(testCtx(t, time.Minute), "db1"); err != nil {
		t.Fatal(err)
	}
	_, err = m.Start(testCtx(t, time.Minute), "db1", failover.Options{})
	wantAll(t, "failover with production calling after the restart", err, `vm "db1"`, `production site "prod" was in contact`)
	wantUnchanged(t, site, m, "db1")
}

package wire_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// calledBy is a recovery site whose production site ("prod") called about
// vm over mutual TLS; it returns the site and the file of recorded calls.
func calledBy(t *testing.T, vm string) (*testsite.Site, string) {
	t.Helper()
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, _, err := site.Dial(t, wire.CompressionZstd).Latest(ctx, vm); err != nil {
		t.Fatal(err)
	}
	return site, filepath.Join(site.Dir, "contacts.json")
}

// A call is on disk once it is answered: a site killed then (no stop, no
// flush) and started again dates it, and the write left no temporary file.
func TestLastContactSurvivesACrash(t *testing.T) {
	before := time.Now()
	site, file := calledBy(t, "db1")
	after := time.Now()
	// The running site is not stopped: a second one reads what the first
	// left on disk, as a site started after a kill -9 would.
	c := (&wire.Server{ContactFile: file}).LastContact("db1")
	if c.Site != "prod" || c.Unknown || !c.Restarted {
		t.Fatalf("the call as a restarted site knows it: %+v, want prod's call from before the restart", c)
	}
	if c.Wall.Before(before.Truncate(time.Second)) || c.Wall.After(after) {
		t.Errorf("recorded call at %s, want between %s and %s", c.Wall, before, after)
	}
	if silent := time.Since(c.At); silent > time.Second {
		t.Errorf("the restarted site counts production silent for %v, want the call taken as just before its start", silent)
	}
	entries, _ := os.ReadDir(site.Dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if got := site.Server.LastContact("db1"); got.Restarted || got.Unknown || got.Site != "prod" {
		t.Errorf("the running site's own knowledge: %+v, want the call it heard", got)
	}
}

// After a restart on the same boot, a recorded call is dated by the boot
// clock, whatever the wall clock did meanwhile; after a reboot, or with no
// record it can read, the production site is unknown since the start.
func TestLastContactAfterAClockStepOrAReboot(t *testing.T) {
	boot, since := "boot-a", time.Hour
	defer wire.SetBootClock(func() (string, time.Duration, error) { return boot, since, nil })()
	_, file := calledBy(t, "db1")
	setWall := func(wall time.Time) {
		t.Helper()
		var f struct {
			VMs map[string]map[string]any `json:"vms"`
		}
		b, err := os.ReadFile(file)
		if err == nil {
			err = json.Unmarshal(b, &f)
		}
		if err != nil {
			t.Fatal(err)
		}
		f.VMs["db1"]["wall"] = wall.UTC()
		b, _ = json.Marshal(f)
		if err := os.WriteFile(file, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	restarted := func() wire.Contact { return (&wire.Server{ContactFile: file}).LastContact("db1") }

	// 20 s since the call; the wall clock stepped 5 hours forward since,
	// so the recorded wall time reads 5 hours old: still 20 s (less the
	// record's lag, 10 s) by the boot clock.
	since = time.Hour + 20*time.Second
	setWall(time.Now().Add(-5 * time.Hour))
	c := restarted()
	if silent := time.Since(c.At); !c.Restarted || c.Site != "prod" || silent < 10*time.Second || silent > 11*time.Second {
		t.Errorf("20 s after the call, the wall clock 5 h ahead: %+v, silent %v; want 10 s", c, silent)
	}
	// 10 minutes since the call; the wall clock stepped back meanwhile,
	// so the recorded time reads as now: 10 minutes by the boot clock.
	since = time.Hour + 10*time.Minute
	setWall(time.Now())
	c = restarted()
	if silent := time.Since(c.At); !c.Restarted || silent < 9*time.Minute+50*time.Second || silent > 9*time.Minute+51*time.Second {
		t.Errorf("10 min after the call, the wall clock stepped back: %+v, silent %v; want 9m50s", c, silent)
	}
	// Another boot: the boot clock cannot date the call.
	boot, since = "boot-b", time.Minute
	c = restarted()
	if !c.Unknown || c.Restarted || !c.At.Equal(c.Started) || c.Site != "prod" || c.Wall.IsZero() {
		t.Errorf("after a reboot: %+v, want unknown since the start, the recorded call named", c)
	}
	// A record it cannot read.
	boot = "boot-a"
	if err := os.WriteFile(file, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if c := restarted(); !c.Unknown || !c.At.Equal(c.Started) || c.Site != "" {
		t.Errorf("with a torn record: %+v, want unknown since the start", c)
	}
}

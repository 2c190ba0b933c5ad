package daemon

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// A recovery site measures a replica's RPO against its own clock, which is
// not the protected site's that stamped the point's instant: a protected
// site 5 minutes ahead gave an RPO of -300 s (status, and /metrics' gauge:
// an RPO alert would stay quiet 5 minutes past its threshold), one 5
// minutes behind 300 s from its first point on (the alert always firing).
// The point was sent a moment ago (its cycle took a second): its age here
// is that, whatever the other clock said.
func TestReplicaRPOAcrossClocks(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := recovery.Open(ctx, testsite.ShortDir(t), recovery.Options{Keep: 4, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	skew := map[string]time.Duration{"ahead": 5 * time.Minute, "behind": -5 * time.Minute}
	for vm, off := range skew {
		w, err := st.Begin(ctx, recovery.BeginSpec{VM: vm, ID: 1, Instant: time.Now().Add(off).UTC(), Consistency: lifeboat.Crash,
			Disks: []recovery.DiskSpec{{Name: "vda", Size: 1 << 20, Resync: true, Lineage: "l1", Generation: "g1"}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Commit(ctx, lifeboat.CycleStats{Duration: time.Second}); err != nil {
			t.Fatal(err)
		}
	}
	c, err := LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	c.VMs = nil
	d := New(c, quiet)
	d.store, d.runs = st, &failover.Manager{Store: st, Dir: t.TempDir(), Log: quiet}
	rec := httptest.NewRecorder()
	(&apiServer{d: d}).status(rec, httptest.NewRequest("GET", "/v1/status", nil))
	var out StatusReply
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatalf("%v: %s", err, rec.Body)
	}
	rpo := map[string]float64{}
	for _, s := range out.VMs {
		rpo[s.VM] = s.RPO
	}
	fams, err := d.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	gauge := map[string]float64{}
	for _, f := range fams {
		if f.GetName() == "lifeboat_rpo_seconds" {
			for _, m := range f.GetMetric() {
				gauge[m.GetLabel()[1].GetValue()] = m.GetGauge().GetValue()
			}
		}
	}
	for vm, off := range skew {
		if rpo[vm] < 0 || rpo[vm] > 30 {
			t.Errorf("vm %s, its protected site's clock %v off: status's RPO %.1f s, want about 1 s", vm, off, rpo[vm])
		}
		if gauge[vm] < 0 || gauge[vm] > 30 {
			t.Errorf("vm %s, its protected site's clock %v off: lifeboat_rpo_seconds %.1f, want about 1", vm, off, gauge[vm])
		}
	}
}

// A protected VM failed over at its recovery site asks again every 30 s
// whether it still is, so that replication resumes soon after an undo. The
// refusal's time is the wall clock's: once the clock stepped back an hour
// (an NTP step, `date -s`), the refusal seemed to come from the future, and
// the old check (time.Since(since) < 30 s) held replication back for that
// hour.
func TestFailedOverRecheckAfterAClockStep(t *testing.T) {
	now := time.Now().UTC()
	for _, tt := range []struct {
		since time.Time
		quiet bool
	}{
		{now.Add(-10 * time.Second), true},
		{now.Add(-failedOverRecheck), false},
		{now.Add(time.Hour), false}, // recorded before the clock stepped back an hour
	} {
		if got := refusedLately(tt.since, now); got != tt.quiet {
			t.Errorf("refused at %s, now %s: waits to ask again %v, want %v", tt.since.Format(time.TimeOnly), now.Format(time.TimeOnly), got, tt.quiet)
		}
	}
}

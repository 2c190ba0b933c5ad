package failback

import (
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
)

// A finalize run again knows the point its first attempt folded by the
// run its note names, not by the clock: this site's clock stepped back an
// hour between the failover and the fold, so the fold's instant is before
// the run's start. On the old rule (instant not before the start) it was
// taken for an older point and folded again.
func TestFoldKnownAfterAClockStep(t *testing.T) {
	started := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	b := &Back{Site: "dr"}
	run := &failover.Run{ID: "r7", VM: "vm1", Point: 5, Started: started}
	fold := func(id uint64, note string, at time.Time) lifeboat.Point {
		return lifeboat.Point{VM: "vm1", ID: id, Site: "dr", Instant: at, Note: note}
	}
	stepped := started.Add(-time.Hour)
	for _, c := range []struct {
		what string
		pt   lifeboat.Point
		want bool
	}{
		{"this run's fold, the clock stepped back", fold(6, "failback: the recovered VM's last state, powered off cleanly"+", folded from run "+"r7", stepped), true},
		{"this run's fold", fold(6, "failback: the recovered VM's last state, its CPUs stopped (it did not power off)"+", folded from run "+"r7", started.Add(time.Minute)), true},
		{"another run's fold, after this run started", fold(6, "failback: the recovered VM's last state, powered off cleanly"+", folded from run "+"r6", started.Add(time.Minute)), false},
		{"a fold that names no run (an older lifeboat), after the start", fold(6, "", started.Add(time.Minute)), true},
		{"a fold that names no run, before the start", fold(6, "", stepped), false},
		{"the failover's own point", fold(5, foldedFrom+"r7", started.Add(time.Minute)), false},
		{"a point another site sent", lifeboat.Point{VM: "vm1", ID: 6, Site: "prod", Instant: started.Add(time.Minute), Note: ", folded from run r7"}, false},
	} {
		if _, got := b.folded(run, c.pt); got != c.want {
			t.Errorf("%s: folded = %v, want %v", c.what, got, c.want)
		}
	}
}

package failover

import (
	"context"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// The protected site's clock stepped back between two points (an NTP step,
// `date -s`): point 2 carries a later instant than point 3, taken after it.
// "The latest point at or before T" is the newest point (by id, the order
// they were taken in) whose instant is not after T, for a failover as for a
// plan: with T after every instant, that is the latest point, 3. A failover
// chose by the greatest instant and started from point 2, older than the
// plan's and than a failover without --point.
func TestPointAtOrBeforeAfterAClockStep(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, m := quietSite(ctx, t, 10)
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	commitPointAt(ctx, t, st, "vm1", 1, t0)
	commitPointAt(ctx, t, st, "vm1", 2, t0.Add(10*time.Minute)) // the clock ran 10 minutes fast
	commitPointAt(ctx, t, st, "vm1", 3, t0.Add(time.Minute))    // then NTP stepped it back
	for _, tt := range []struct {
		before time.Time
		want   uint64
	}{
		{t0.Add(time.Hour), 3},        // after every instant: the latest
		{t0.Add(5 * time.Minute), 3},  // points 1 and 3 are not after it
		{t0.Add(30 * time.Second), 1}, // point 1 only
	} {
		pt, err := m.point("vm1", 0, tt.before)
		if err != nil || pt.ID != tt.want {
			t.Errorf("failover --point %s: point %d (%v), want %d", instantText(tt.before), pt.ID, err, tt.want)
		}
		got, release, err := m.planPoints(ctx, Plan{Name: "p", Steps: []Step{{VMs: []string{"vm1"}}}}, tt.before, false, func(string) {})
		if err != nil || got["vm1"] != tt.want {
			t.Errorf("plan run --point %s: point %d (%v), want %d", instantText(tt.before), got["vm1"], err, tt.want)
		}
		if release != nil {
			release()
		}
	}
}

package recovery

import (
	"slices"
	"testing"
	"time"
)

// While a run pins a VM, retention merges none of its points (a merge
// rewrites the images a started VM reads); once the pin goes, it catches
// up. A pin of a point that does not exist is refused.
func TestPinHoldsRetention(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	models := writeSeries(t, s, "p1", 5)
	s.keep = 3
	if err := s.AddPin(testCtx(t), "p1", "run-a", Pin{Point: 2, Reason: "test failover", Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddPin(testCtx(t), "p1", "run-b", Pin{Point: 99}); err == nil {
		t.Error("a pin of a point that does not exist was taken")
	}
	if err := s.ApplyRetention(testCtx(t), "p1"); err != nil {
		t.Fatal(err)
	}
	if got := pointIDs(t, s, "p1"); !slices.Equal(got, []uint64{1, 2, 3, 4, 5}) {
		t.Fatalf("points with a pin after retention: %v, want all five", got)
	}
	checkPoint(t, s, "p1", 2, models[1])
	if err := s.RemovePin("p1", "run-a"); err != nil {
		t.Fatal(err)
	}
	if pins, _ := s.Pins("p1"); len(pins) != 0 {
		t.Fatalf("pins after removal: %v", pins)
	}
	if err := s.ApplyRetention(testCtx(t), "p1"); err != nil {
		t.Fatal(err)
	}
	if got := pointIDs(t, s, "p1"); !slices.Equal(got, []uint64{3, 4, 5}) {
		t.Fatalf("points after the pin went and retention ran: %v, want [3 4 5]", got)
	}
	for i := 2; i < 5; i++ {
		checkPoint(t, s, "p1", uint64(i+1), models[i])
	}
}

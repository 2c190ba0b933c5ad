package daemon

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// scheduleStarts runs runEvery with a cycle that takes took and returns
// fail's error, until n cycles have started, and returns their start times.
func scheduleStarts(t *testing.T, every, retry, took time.Duration, fail error, n int) []time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var (
		mu      sync.Mutex
		starts  []time.Time
		running bool
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runEvery(ctx, every, retry, func(context.Context) error {
			mu.Lock()
			if running {
				t.Error("two cycles at once")
			}
			running = true
			starts = append(starts, time.Now())
			if len(starts) == n {
				cancel()
			}
			mu.Unlock()
			time.Sleep(took)
			mu.Lock()
			running = false
			mu.Unlock()
			return fail
		})
	}()
	<-done
	for i := 1; i < len(starts); i++ {
		t.Logf("cycle %d started %s after the one before", i, starts[i].Sub(starts[i-1]).Round(time.Millisecond))
	}
	if len(starts) < n {
		t.Fatalf("%d cycles started within a minute, want %d", len(starts), n)
	}
	return starts
}

// A cycle starts an interval after the one before started, not an interval
// after it ended: with cycles of 200 ms every 500 ms, starts are 500 ms
// apart (the schedule used to wait the interval, or a second, after each
// cycle, which added a second to the RPO under load).
func TestScheduleStartsEveryInterval(t *testing.T) {
	every := 500 * time.Millisecond
	s := scheduleStarts(t, every, time.Second, 200*time.Millisecond, nil, 4)
	for i := 1; i < len(s); i++ {
		gap := s[i].Sub(s[i-1])
		// The starts are seen inside the cycles, each a little late: a gap
		// may be short by the lateness of the one before.
		if gap < every-100*time.Millisecond {
			t.Errorf("cycle %d started %s after the one before: less than the interval %s", i, gap, every)
		}
		// An upper bound with room for a loaded machine, well under the
		// 700 ms of waiting the interval after the cycle ended.
		if gap > every+150*time.Millisecond {
			t.Errorf("cycle %d started %s after the one before: want about the interval %s", i, gap, every)
		}
	}
}

// A cycle longer than the interval is followed at once by the next.
func TestScheduleBackToBackWhenBehind(t *testing.T) {
	took := 300 * time.Millisecond
	s := scheduleStarts(t, 100*time.Millisecond, time.Second, took, nil, 4)
	for i := 1; i < len(s); i++ {
		if gap := s[i].Sub(s[i-1]); gap < took || gap > took+150*time.Millisecond {
			t.Errorf("cycle %d started %s after the one before, which took %s: want it to follow at once", i, gap, took)
		}
	}
}

// After a failed cycle the next waits at least retry, however short the
// interval: a site that is down is not hammered.
func TestScheduleRetryWaitsAfterFailure(t *testing.T) {
	retry := 400 * time.Millisecond
	// Each failed cycle takes 100 ms: the next starts at least retry after
	// it ended, so at least retry after it started however late that was seen.
	s := scheduleStarts(t, 50*time.Millisecond, retry, 100*time.Millisecond, errors.New("peer down"), 3)
	for i := 1; i < len(s); i++ {
		if gap := s[i].Sub(s[i-1]); gap < retry {
			t.Errorf("cycle %d started %s after a failed one: want at least %s", i, gap, retry)
		}
	}
}

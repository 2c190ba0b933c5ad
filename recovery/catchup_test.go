package recovery

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
)

// Open catches up the retention of every VM past keep one VM after another:
// a site with hundreds of VMs restarted with a lower keep must not start a
// merge (a qemu-img commit and a qemu-storage-daemon) for each of them at
// once. Before, it started one goroutine per VM, every merge together.
func TestOpenCatchesUpOneVMAtATime(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 100)
	vms := []string{"c1", "c2", "c3", "c4"}
	for _, vm := range vms {
		writeSeries(t, s, vm, 3)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	merges := &mergeLog{}
	s2, err := Open(testCtx(t), dir, Options{Keep: 1, Logger: slog.New(merges)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Close() })
	s2.SettleRetention()
	for _, vm := range vms {
		if got := pointIDs(t, s2, vm); !slices.Equal(got, []uint64{3}) {
			t.Errorf("%s: points after Open with keep 1: %v, want [3]", vm, got)
		}
	}
	if most := merges.most(); most != 1 {
		t.Errorf("Open ran %d VMs' merges at once, want one at a time: %v", most, merges.events())
	}
}

// mergeLog records the store's "merging"/"merged" log lines, in order.
type mergeLog struct {
	mu  sync.Mutex
	evs []string
}

func (l *mergeLog) Enabled(context.Context, slog.Level) bool { return true }
func (l *mergeLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *mergeLog) WithGroup(string) slog.Handler            { return l }
func (l *mergeLog) Handle(_ context.Context, r slog.Record) error {
	var what string
	switch r.Message {
	case "retention: merging the oldest point into the next":
		what = "start"
	case "retention: merged":
		what = "end"
	default:
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "vm" {
			what += " " + a.Value.String()
		}
		return true
	})
	l.mu.Lock()
	l.evs = append(l.evs, what)
	l.mu.Unlock()
	return nil
}

func (l *mergeLog) events() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.evs)
}

// most is the most merges the log shows under way together.
func (l *mergeLog) most() int {
	n, most := 0, 0
	for _, e := range l.events() {
		var what, vm string
		fmt.Sscan(e, &what, &vm)
		if what == "start" {
			n++
		} else {
			n--
		}
		most = max(most, n)
	}
	return most
}

package recovery

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
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

// A VM whose retention holds its group's last common instant says so
// (RetentionHeld, which `status` shows): below twice keep it may hold its
// points past keep for good (its group's other member refused, its
// production lost), and the count alone does not say why. Before, only a
// log line said it. Once the bound gives the hold up, it no longer says so.
func TestRetentionHeldForGroupIsReported(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 2)
	groupPoint := func(vm string, id uint64) {
		t.Helper()
		disks := []DiskSpec{{Name: "vda", Size: 1 << 20, Resync: id == 1}}
		w, err := s.Begin(testCtx(t), BeginSpec{VM: vm, ID: id, Instant: time.Unix(int64(1000+id), 0).UTC(),
			Consistency: lifeboat.Filesystem, Group: fmt.Sprintf("tier@%d", id), Disks: follow(t, s, vm, id, disks)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { w.Abort(context.Background()) })
		p := &pointWriter{t: t, w: w, m: model{"vda": make([]byte, 1<<20)}, rng: rand.New(rand.NewPCG(testenv.Seed(t), id))}
		p.data("vda", int64(id), 2)
		p.commit()
	}
	groupPoint("db1", 1)
	groupPoint("app1", 1) // app1's later group points are refused
	for id := uint64(2); id <= 4; id++ {
		groupPoint("db1", id)
	}
	if got := pointIDs(t, s, "db1"); len(got) != 4 {
		t.Fatalf("db1 points: %v, want all 4 (the hold)", got)
	}
	if why, ok := s.RetentionHeld("db1"); !ok || !strings.Contains(why, `"app1"`) {
		t.Errorf("db1 holds 4 points with keep 2: RetentionHeld = %q, %v; want the group hold, naming app1", why, ok)
	}
	groupPoint("db1", 5) // past twice keep: the hold is given up
	if got := pointIDs(t, s, "db1"); len(got) != 2 {
		t.Fatalf("db1 points past twice keep: %v, want 2", got)
	}
	if why, ok := s.RetentionHeld("db1"); ok {
		t.Errorf("db1's hold was given up, yet RetentionHeld = %q", why)
	}
}

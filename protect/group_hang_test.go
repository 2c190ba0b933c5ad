package protect_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// atFreeze is a member's quiescer with the test's actions around its freeze
// and thaw: the moments of a group's instant a test reaches from outside
// (the Quiescer seam; no hook in the product).
type atFreeze struct {
	protect.Quiescer
	before, after, beforeThaw func()
}

func (q *atFreeze) Freeze(ctx context.Context) (*protect.Frozen, error) {
	if q.before != nil {
		q.before()
	}
	f, err := q.Quiescer.Freeze(ctx)
	if err != nil || f == nil {
		return f, err
	}
	if q.after != nil {
		q.after()
	}
	if thaw := f.Thaw; thaw != nil && q.beforeThaw != nil {
		f.Thaw = func(ctx context.Context) (bool, error) {
			q.beforeThaw()
			return thaw(ctx)
		}
	}
	return f, nil
}

// silentAgent is a guest agent's socket that takes connections and never
// answers: an agent hung in the guest, which SIGSTOP from outside cannot
// reach (the one mock here; everything else is real QEMU and qemu-ga). It
// never calls accept: the kernel completes a client's connect into the
// listen queue, and what the client sends is never read.
func silentAgent(t *testing.T) string {
	l, err := net.Listen("unix", filepath.Join(testsite.ShortDir(t), "qga.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.Addr().String()
}

// A consistency group of two real guests (TCG, qemu-ga, each disk in its
// own qemu-storage-daemon) whose member "db" hangs (SIGSTOP of its
// qemu-system and its storage daemon: QMP, agent and block layer stop) at
// each moment of the group's instant: before the freeze, after the others
// froze, in flight in its fleece transaction, during the thaw. Each time the
// other member's guest is thawed within freeze_limit plus a small bound
// (confirmed by guest-fsfreeze-status, and seen from inside the guest as
// the longest gap of a probe writing to /data), the cycle fails within a
// bound while db is still stopped, naming db, and commits nothing; after
// SIGCONT db's QEMU holds nothing of lifeboat's and its guest is thawed; the
// next group cycle is filesystem consistent and incremental, and a cycle of
// the paused group is byte-identical to both disks. (db's agent alone
// hanging is TestGroupFreezesMembersConcurrently's "silent agent".)
func TestGroupMemberHangs(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	web := bootFreezeGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "web"})
	db := bootFreezeGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "db"})
	t.Cleanup(func() { db.Signal(syscall.SIGCONT, true) }) // before the guests stop
	if _, err := web.Shell(ctx(t), "cat > /run/probe <<'EOF'\n"+probeScript+"EOF\nsh /run/probe </dev/null >/dev/null 2>&1 &"); err != nil {
		t.Fatal(err)
	}
	site := testsite.Start(t, recovery.Options{Keep: 100})
	pw, pd := guestProtector(t, web, site, "web"), guestProtector(t, db, site, "db")
	const (
		limit = 2 * time.Second
		// thawWithin bounds a frozen guest's thaw past the limit: the
		// timer's thaw is one agent round trip; the rest is margin for a
		// loaded machine running TCG.
		thawWithin = 3 * time.Second
		// failWithin bounds the failed cycle while db is stopped: a freeze
		// (up to the limit), the instant or the thaw's wait (up to the
		// limit) and a bounded step on db (up to the limit), plus margin.
		failWithin = 3*limit + 6*time.Second
	)
	markers := t.TempDir()
	qw := &protect.AgentQuiescer{VM: "web", Socket: web.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
	qd := &protect.AgentQuiescer{VM: "db", Socket: db.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
	group := &protect.Group{Name: "tier", Members: []*protect.Protector{pw, pd}}
	if _, err := group.Cycle(ctx(t)); err != nil { // the initial sync
		t.Fatal(err)
	}
	dbQMP := pd.VM.QMPSocket

	cases := []struct {
		name string
		// wire makes stop run at the moment; it returns what undoes it.
		wire func(t *testing.T, stop func()) func()
	}{
		{"before the freeze", func(t *testing.T, stop func()) func() {
			pw.Quiescer = &atFreeze{Quiescer: qw, before: stop}
			return func() {}
		}},
		{"after the others froze", func(t *testing.T, stop func()) func() {
			pd.Quiescer = &atFreeze{Quiescer: qd, after: stop}
			return func() {}
		}},
		{"in the transaction", func(t *testing.T, stop func()) func() {
			var once sync.Once
			pd.VM.QMPSocket = testvm.TapQMPSocket(t, filepath.Join(testsite.ShortDir(t), "qmp.sock"), dbQMP, func(line []byte) {
				if bytes.Contains(line, []byte(`"transaction"`)) && bytes.Contains(line, []byte(`"blockdev-backup"`)) {
					once.Do(stop) // before QEMU reads it: it runs at SIGCONT
				}
			})
			return func() { pd.VM.QMPSocket = dbQMP }
		}},
		{"during the thaw", func(t *testing.T, stop func()) func() {
			pw.Quiescer = &atFreeze{Quiescer: qw, beforeThaw: stop}
			return func() {}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pw.Quiescer, pd.Quiescer = qw, qd
			before := pointCount(t, site, "web", "db")
			var stoppedAt atomic.Int64 // set where the moment is: the cycle's goroutine, or the QMP tap's
			stop := func() {
				if err := db.Signal(syscall.SIGSTOP, true); err != nil {
					t.Error(err)
				}
				stoppedAt.Store(time.Now().UnixNano())
			}
			undo := tc.wire(t, stop)
			// web's freeze, and when guest-fsfreeze-status confirmed its thaw.
			var frozeAt time.Time
			wq := pw.Quiescer
			pw.Quiescer = &atFreeze{Quiescer: wq, after: func() { frozeAt = time.Now() }}
			thawed := watchMarker(filepath.Join(markers, "web.frozen"))
			from := guestUptime(t, web)

			start := time.Now()
			done := startGroupCycle(group)
			var r groupResult
			hung := false
			select {
			case r = <-done:
			case <-time.After(failWithin):
				hung = true
				t.Errorf("the group cycle still ran %v after it began, db stopped: a hung member holds the group (and the others' fleece) until it answers", failWithin)
				db.Signal(syscall.SIGCONT, true)
				r = <-done
			}
			err, stopped := r.err, time.Unix(0, stoppedAt.Load())
			t.Logf("the group cycle returned after %v (db stopped %v in): %v", time.Since(start).Round(time.Millisecond), stopped.Sub(start).Round(time.Millisecond), err)
			pw.Quiescer, pd.Quiescer = qw, qd
			undo()
			if stoppedAt.Load() == 0 {
				t.Fatal("db was never stopped: the moment was not reached")
			}
			if err == nil || !strings.Contains(err.Error(), `vm "db"`) {
				t.Errorf("group cycle with db hung: error %v; want one naming vm \"db\"", err)
			}
			if got := pointCount(t, site, "web", "db"); got != before {
				t.Errorf("a failed group cycle committed points: %d before, %d after", before, got)
			}
			// web: thawed within the bound, seen from the host and inside.
			at := <-thawed
			if frozeAt.IsZero() || at.IsZero() {
				t.Fatalf("web frozen at %v, thaw confirmed at %v", frozeAt, at)
			}
			held := at.Sub(frozeAt)
			gap := longestGap(probeTicks(t, web, from, func(ts []int64) bool { return len(ts) > 1 }))
			t.Logf("web: freeze -> thaw confirmed by guest-fsfreeze-status %v (host); the probe's longest gap in /data %v (guest); bound %v", held.Round(time.Millisecond), gap, limit+thawWithin)
			if held > limit+thawWithin || gap > limit+thawWithin {
				t.Errorf("web stayed frozen %v (host) / %v (guest) with db hung; bound %v", held, gap, limit+thawWithin)
			}
			if !hung {
				testvm.AssertNoLeftovers(t, web.Storage().Monitor())
			}

			// SIGCONT: db's QEMU ends up holding nothing of lifeboat's, its
			// guest thawed, and the group goes on.
			if err := db.Signal(syscall.SIGCONT, true); err != nil {
				t.Fatal(err)
			}
			if left := waitNoLeftovers(t, db.Storage().Monitor(), 10*time.Second); len(left) > 0 {
				t.Errorf("10 s after SIGCONT db's QEMU still holds %v", left)
			}
			if st, err := db.WaitThawed(ctx(t), 10*time.Second); err != nil {
				t.Errorf("db after SIGCONT: guest-fsfreeze-status %q: %v", st, err)
			}
			if _, ok := waitMarkerGone(filepath.Join(markers, "db.frozen"), 15*time.Second); !ok {
				t.Errorf("db's freeze is not confirmed thawed 15 s after SIGCONT")
			}
			pts := groupCycle(t, group)
			for _, pt := range pts {
				if pt.Consistency != lifeboat.Filesystem || pt.Disks[0].Resync {
					t.Errorf("the group cycle after: vm %s point %d is %s (%s), resync %v; want filesystem consistent and incremental", pt.VM, pt.ID, pt.Consistency, pt.Note, pt.Disks[0].Resync)
				}
			}
			checkPausedGroup(t, site, group, web, db)
		})
	}
}

type groupResult struct {
	pts []lifeboat.Point
	err error
}

// startGroupCycle runs a group cycle in the background (bounded by 5
// minutes, more than any QMP wait of the test) and sends its result.
func startGroupCycle(g *protect.Group) <-chan groupResult {
	done := make(chan groupResult, 1)
	go func() {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		pts, err := g.Cycle(c)
		done <- groupResult{pts, err}
	}()
	return done
}

// groupCycle runs a group cycle that must commit a point of every member
// at one group instant.
func groupCycle(t *testing.T, g *protect.Group) []lifeboat.Point {
	t.Helper()
	pts, err := g.Cycle(ctx(t))
	if err != nil {
		t.Fatalf("group cycle: %v", err)
	}
	if len(pts) != len(g.Members) || pts[0].Group == "" || pts[0].Group != pts[len(pts)-1].Group {
		t.Fatalf("group cycle: points %+v; want one of each member at one group instant", pts)
	}
	return pts
}

// checkPausedGroup runs a group cycle, crash consistent, with every guest's
// CPUs stopped (SIGSTOP of its qemu-system: its disk stays as the instant
// has it) and checks that each point is byte-identical to its disk.
func checkPausedGroup(t *testing.T, site *testsite.Site, g *protect.Group, guests ...*testguest.Guest) {
	t.Helper()
	qs := make([]protect.Quiescer, len(g.Members))
	for i, p := range g.Members {
		qs[i], p.Quiescer = p.Quiescer, nil
	}
	defer func() {
		for i, p := range g.Members {
			p.Quiescer = qs[i]
		}
	}()
	for _, gu := range guests {
		if err := gu.Signal(syscall.SIGSTOP, false); err != nil {
			t.Fatal(err)
		}
		defer gu.Signal(syscall.SIGCONT, false)
	}
	pts := groupCycle(t, g)
	for i, gu := range guests {
		src, err := workload.Open(ctx(t), gu.StorageNBDSocket(), 0, workload.Disk{Name: gu.DiskNode(), Size: 32 << 20})
		if err != nil {
			t.Fatal(err)
		}
		want, err := src.Hashes(ctx(t))
		src.Close()
		if err != nil {
			t.Fatal(err)
		}
		pt := pts[i]
		if got := site.PointHash(t, pt.VM, pt.ID, gu.DiskNode()); got != want[gu.DiskNode()] {
			t.Errorf("vm %s point %d is not its disk", pt.VM, pt.ID)
		}
		if pt.Disks[0].Resync {
			t.Errorf("vm %s point %d resent its disk whole", pt.VM, pt.ID)
		}
	}
}

// longestGap is the longest time between two of the probe's ticks: how
// long /data stayed frozen, seen from inside the guest.
func longestGap(ticks []int64) time.Duration {
	var gap time.Duration
	for i := 1; i < len(ticks); i++ {
		gap = max(gap, centis(ticks[i]-ticks[i-1]))
	}
	return gap
}

// pointCount is how many points the VMs hold at the recovery site.
func pointCount(t *testing.T, site *testsite.Site, vms ...string) int {
	t.Helper()
	n := 0
	for _, vm := range vms {
		pts, err := site.Store.Points(vm)
		if err != nil {
			t.Fatal(err)
		}
		n += len(pts)
	}
	return n
}

// watchMarker sends when a freeze marker that appears within 30 s is gone
// again (the quiescer removes it once guest-fsfreeze-status says thawed),
// or the zero time if it does not appear or stays a minute.
func watchMarker(marker string) <-chan time.Time {
	out := make(chan time.Time, 1)
	go func() {
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(marker); err == nil {
				break
			}
			if time.Now().After(deadline) {
				out <- time.Time{}
				return
			}
		}
		at, _ := waitMarkerGone(marker, time.Minute)
		out <- at
	}()
	return out
}

// waitNoLeftovers waits until QEMU holds nothing of a fleece, for at most
// within, and returns what it still holds then.
func waitNoLeftovers(t *testing.T, m *qemu.Monitor, within time.Duration) []string {
	t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(100 * time.Millisecond) {
		left, err := testvm.Leftovers(ctx(t), m)
		if err != nil {
			t.Fatal(err)
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
	}
}

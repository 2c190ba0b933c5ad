package protect_test

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// slowFreezeHook is a guest fsfreeze hook whose freeze takes slowFreeze
// before qemu-ga freezes the file systems: an application flushing first.
const (
	slowFreezeHook = "#!/bin/sh\n[ \"$1\" = freeze ] && sleep 3\nexit 0\n"
	slowFreeze     = 3 * time.Second
)

// frozenSpan is how long one member's guest stayed frozen in a group cycle:
// on the host from its freeze's return to guest-fsfreeze-status confirming
// the thaw (the quiescer removes its marker only then), and inside the
// guest the longest gap of the probe writing to /data.
type frozenSpan struct{ host, guest time.Duration }

// watched is a member whose real guest a measured group cycle watches.
type watched struct {
	p *protect.Protector
	g *testguest.Guest
}

// measureGroupCycle runs one group cycle, which must return within
// within, and measures how long each watched member was frozen.
func measureGroupCycle(t *testing.T, group *protect.Group, markers string, within time.Duration, ws ...watched) (groupResult, time.Duration, []frozenSpan) {
	t.Helper()
	var mu sync.Mutex // the members' freezes run concurrently
	frozeAt := make([]time.Time, len(ws))
	thawed := make([]<-chan time.Time, len(ws))
	from := make([]int64, len(ws))
	for i, w := range ws {
		q := w.p.Quiescer
		w.p.Quiescer = &atFreeze{Quiescer: q, after: func() {
			mu.Lock()
			frozeAt[i] = time.Now()
			mu.Unlock()
		}}
		defer func() { w.p.Quiescer = q }()
		thawed[i] = watchMarker(filepath.Join(markers, w.p.VM.Name+".frozen"))
		from[i] = guestUptime(t, w.g)
	}
	start := time.Now()
	var r groupResult
	select {
	case r = <-startGroupCycle(group):
	case <-time.After(within):
		t.Fatalf("the group cycle still ran %v after it began", within)
	}
	took := time.Since(start)
	spans := make([]frozenSpan, len(ws))
	for i, w := range ws {
		at := <-thawed[i]
		mu.Lock()
		froze := frozeAt[i]
		mu.Unlock()
		if froze.IsZero() || at.IsZero() {
			t.Fatalf("vm %s frozen at %v, thaw confirmed at %v", w.p.VM.Name, froze, at)
		}
		// The guest is thawed by now: a tick after now closes the gap.
		now := guestUptime(t, w.g)
		ticks := probeTicks(t, w.g, from[i], func(ts []int64) bool { return len(ts) > 1 && ts[len(ts)-1] > now })
		spans[i] = frozenSpan{host: at.Sub(froze), guest: longestGap(ticks)}
		t.Logf("vm %s: freeze -> thaw confirmed by guest-fsfreeze-status %v (host); the probe's longest gap in /data %v (guest)",
			w.p.VM.Name, spans[i].host.Round(time.Millisecond), spans[i].guest)
	}
	return r, took, spans
}

// A consistency group of two real guests (TCG, qemu-ga) freezes its members
// at once, not one after the other: with each guest's fsfreeze hook taking
// 3 s (an application's flush), the first member stays frozen for about
// the instant, not for the second member's freeze too (before: web frozen
// 3.3 s, its probe in /data stalled as long). With the second member's
// agent silent (a socket that takes connections and never answers: the one
// mock here), the first member stays frozen less than its freeze limit and
// its point stays filesystem consistent: it is still frozen at the instant,
// since the group cuts the silent member's freeze short of the first
// member's limit (before: web frozen the whole limit, thawed by its timer,
// its point crash consistent). Each time the points are byte-identical to
// the disks of the paused guests, and the next cycle incremental.
func TestGroupFreezesMembersConcurrently(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	web := bootFreezeGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "web"})
	db := bootFreezeGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "db"})
	for _, g := range []*testguest.Guest{web, db} {
		if _, err := g.Shell(ctx(t), "cat > /run/probe <<'EOF'\n"+probeScript+"EOF\nsh /run/probe </dev/null >/dev/null 2>&1 &"); err != nil {
			t.Fatal(err)
		}
	}
	site := testsite.Start(t, recovery.Options{Keep: 100})
	pw, pd := guestProtector(t, web, site, "web"), guestProtector(t, db, site, "db")
	markers := t.TempDir()
	// limit holds two slow freezes, so that the old one-after-the-other
	// freeze kept web frozen through db's whole freeze.
	const limit = 8 * time.Second
	qw := &protect.AgentQuiescer{VM: "web", Socket: web.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
	qd := &protect.AgentQuiescer{VM: "db", Socket: db.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
	pw.Quiescer, pd.Quiescer = qw, qd
	group := &protect.Group{Name: "tier", Members: []*protect.Protector{pw, pd}}
	all := []watched{{pw, web}, {pd, db}}

	filesystem := func(t *testing.T, pts []lifeboat.Point, vms ...string) {
		t.Helper()
		for _, pt := range pts {
			for _, vm := range vms {
				if pt.VM == vm && pt.Consistency != lifeboat.Filesystem {
					t.Errorf("vm %s point %d is %s (%s); want filesystem consistent", pt.VM, pt.ID, pt.Consistency, pt.Note)
				}
			}
		}
	}

	t.Run("normal", func(t *testing.T) { // the initial sync: its transfer comes after the thaw
		r, took, spans := measureGroupCycle(t, group, markers, 30*time.Second, all...)
		if r.err != nil || len(r.pts) != 2 {
			t.Fatalf("group cycle: %v", r.err)
		}
		t.Logf("cycle took %v", took.Round(time.Millisecond))
		filesystem(t, r.pts, "web", "db")
		// No bound tighter than the limit: the instant's two transactions,
		// and the thaw, under TCG on a loaded machine.
		for i, s := range spans {
			if s.host > limit || s.guest > limit {
				t.Errorf("vm %s frozen %v (host) / %v (guest), limit %v", all[i].p.VM.Name, s.host, s.guest, limit)
			}
		}
	})

	t.Run("slow freezes", func(t *testing.T) {
		for _, g := range []*testguest.Guest{web, db} {
			if _, err := g.Shell(ctx(t), "mkdir -p /etc/qemu/fsfreeze-hook.d && cat > /etc/qemu/fsfreeze-hook.d/slow <<'EOF'\n"+slowFreezeHook+"EOF\nchmod +x /etc/qemu/fsfreeze-hook.d/slow"); err != nil {
				t.Fatal(err)
			}
			defer g.Shell(ctx(t), "rm -f /etc/qemu/fsfreeze-hook.d/slow")
		}
		r, took, spans := measureGroupCycle(t, group, markers, 30*time.Second, all...)
		if r.err != nil || len(r.pts) != 2 {
			t.Fatalf("group cycle: %v", r.err)
		}
		t.Logf("cycle took %v with each guest's freeze hook taking %v", took.Round(time.Millisecond), slowFreeze)
		filesystem(t, r.pts, "web", "db")
		// Frozen at once, each member is frozen for the instant and the
		// skew of the freezes' ends; one after the other, web was frozen
		// through db's whole freeze (its hook's 3 s and more).
		for i, s := range spans {
			if bound := slowFreeze / 2; s.host > bound || s.guest > bound {
				t.Errorf("vm %s frozen %v (host) / %v (guest) with each freeze taking %v: bound %v; the members are frozen one after another",
					all[i].p.VM.Name, s.host, s.guest, slowFreeze, bound)
			}
		}
		// And the cycle takes one freeze, not the sum.
		if took > 2*slowFreeze {
			t.Errorf("the group cycle took %v with each freeze taking %v: the freezes ran one after another", took, slowFreeze)
		}
	})

	t.Run("silent agent", func(t *testing.T) {
		// Limits short enough for the test; db's quiescer keeps its own
		// marker directory, since its marker stays for as long as the thaw
		// loop tries the silent socket.
		const limit = 2 * time.Second
		pw.Quiescer = &protect.AgentQuiescer{VM: "web", Socket: web.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
		pd.Quiescer = &protect.AgentQuiescer{VM: "db", Socket: silentAgent(t), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: t.TempDir()}
		defer func() { pw.Quiescer, pd.Quiescer = qw, qd }()
		// thawWithin bounds the thaw past the limit: one agent round trip,
		// and margin for a loaded machine running TCG.
		const thawWithin = 3 * time.Second
		r, took, spans := measureGroupCycle(t, group, markers, 3*limit+6*time.Second, watched{pw, web})
		if r.err != nil || len(r.pts) != 2 {
			t.Fatalf("group cycle with db's agent silent: %v", r.err)
		}
		t.Logf("cycle took %v; points %s: %s, %s: %s (%s)", took.Round(time.Millisecond), r.pts[0].VM, r.pts[0].Consistency, r.pts[1].VM, r.pts[1].Consistency, r.pts[1].Note)
		if s := spans[0]; s.host > limit+thawWithin || s.guest > limit+thawWithin {
			t.Errorf("web frozen %v (host) / %v (guest) with db's agent silent; bound %v", s.host, s.guest, limit+thawWithin)
		}
		// web was frozen through the instant: its point is filesystem
		// consistent; db's says why it is only crash consistent.
		filesystem(t, r.pts, "web")
		for _, pt := range r.pts {
			if pt.VM == "db" && (pt.Consistency != lifeboat.Crash || pt.Note == "") {
				t.Errorf("db's point with its agent silent: %s (%q); want crash consistent, saying why", pt.Consistency, pt.Note)
			}
			if pt.Disks[0].Resync {
				t.Errorf("vm %s point %d resent its disk whole", pt.VM, pt.ID)
			}
		}
	})

	t.Run("strict member silent", func(t *testing.T) {
		// db's policy forbids a crash-consistent point: the cut freeze
		// fails the group, which commits nothing, and web is thawed.
		const limit = 2 * time.Second
		pw.Quiescer = &protect.AgentQuiescer{VM: "web", Socket: web.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
		pd.Quiescer = &protect.AgentQuiescer{VM: "db", Socket: silentAgent(t), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: t.TempDir(), Strict: true}
		defer func() { pw.Quiescer, pd.Quiescer = qw, qd }()
		before := pointCount(t, site, "web", "db")
		r, took, spans := measureGroupCycle(t, group, markers, 3*limit+6*time.Second, watched{pw, web})
		t.Logf("cycle took %v: %v", took.Round(time.Millisecond), r.err)
		if r.err == nil || !strings.Contains(r.err.Error(), `vm "db"`) || !strings.Contains(r.err.Error(), "policy") {
			t.Errorf("group cycle with strict db's agent silent: %v; want an error naming vm \"db\" and its policy", r.err)
		}
		if got := pointCount(t, site, "web", "db"); got != before {
			t.Errorf("a failed group cycle committed points: %d before, %d after", before, got)
		}
		if s := spans[0]; s.host > limit+3*time.Second || s.guest > limit+3*time.Second {
			t.Errorf("web frozen %v (host) / %v (guest) with strict db's agent silent; bound %v", s.host, s.guest, limit+3*time.Second)
		}
		testvm.AssertNoLeftovers(t, web.Storage().Monitor())
		testvm.AssertNoLeftovers(t, db.Storage().Monitor())
	})

	t.Run("freeze ignores the cut", func(t *testing.T) {
		// db's quiescer returns only 5 s in, whatever its context says,
		// and then freezes the real guest: the group fails within
		// cutWait (3 s) of the cut (web's limit less a quarter: 0.75 s),
		// commits nothing, and thaws db's freeze the moment it lands.
		const limit = time.Second
		dbMarkers := t.TempDir()
		pw.Quiescer = &protect.AgentQuiescer{VM: "web", Socket: web.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
		pd.Quiescer = &ignoresCut{after: 5 * time.Second, q: &protect.AgentQuiescer{VM: "db", Socket: db.AgentSocket(), Level: lifeboat.Filesystem, Limit: 30 * time.Second, MarkerDir: dbMarkers}}
		defer func() { pw.Quiescer, pd.Quiescer = qw, qd }()
		before := pointCount(t, site, "web", "db")
		begin := time.Now()
		r, took, _ := measureGroupCycle(t, group, markers, 3*limit+6*time.Second, watched{pw, web})
		t.Logf("cycle took %v: %v", took.Round(time.Millisecond), r.err)
		if r.err == nil || !strings.Contains(r.err.Error(), `"db"`) || !strings.Contains(r.err.Error(), "did not return") {
			t.Errorf("group cycle with db's freeze ignoring the cut: %v; want an error naming db's freeze", r.err)
		}
		if took > limit+3*time.Second+3*time.Second {
			t.Errorf("the group cycle took %v: the wait for a freeze that ignores its cut is not bounded", took)
		}
		if got := pointCount(t, site, "web", "db"); got != before {
			t.Errorf("a failed group cycle committed points: %d before, %d after", before, got)
		}
		// db's freeze lands 5 s in and is thawed at once: its marker goes.
		thawed := watchMarker(filepath.Join(dbMarkers, "db.frozen"))
		// (Its own timer would thaw it only 30 s after it landed.)
		if at := <-thawed; at.IsZero() || at.Sub(begin) > 5*time.Second+5*time.Second {
			t.Fatalf("db's late freeze (landing 5 s in) confirmed thawed %v after the cycle began; want at once", at.Sub(begin))
		}
		if st, err := db.WaitThawed(ctx(t), 5*time.Second); err != nil {
			t.Fatalf("db after its late freeze: guest-fsfreeze-status %q: %v", st, err)
		}
	})
	checkPausedGroup(t, site, group, web, db)
	filesystem(t, groupCycle(t, group), "web", "db")
}

// ignoresCut is a quiescer that ignores its context: it waits, then freezes
// the real guest through q on a context of its own (a quiescer with a bug;
// both of lifeboat's return at once when their context ends).
type ignoresCut struct {
	after time.Duration
	q     protect.Quiescer
}

func (q *ignoresCut) Freeze(context.Context) (*protect.Frozen, error) {
	time.Sleep(q.after)
	return q.q.Freeze(context.Background())
}

package protect_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qga"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// bootGuest boots the tiny test guest; the race-detector pass (-short) leaves
// these to the full run, which drives the same code.
func bootGuest(t *testing.T, opts testguest.Options) *testguest.Guest {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	return testguest.Boot(t, opts)
}

// bootFreezeGuest boots the guest of a freeze test: concurrency-heavy, so
// it runs under the race detector, in the suite's -race -short pass, and
// is skipped in the plain pass (make test runs it once).
func bootFreezeGuest(t *testing.T, opts testguest.Options) *testguest.Guest {
	t.Helper()
	if testing.Short() && !testenv.Race {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	return testguest.Boot(t, opts)
}

func guestProtector(t *testing.T, g *testguest.Guest, site *testsite.Site, name string) *protect.Protector {
	return &protect.Protector{
		VM: protect.VM{Name: name, QMPSocket: g.StorageQMPSocket(), NBDSocket: g.StorageNBDSocket(),
			Disks: []string{g.DiskNode()}, WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4, ChunkSize: 1 << 20,
	}
}

// checkFS looks at a point's ext4 file system from the host.
func checkFS(t *testing.T, site *testsite.Site, vm string, id uint64, disk string) testguest.FSCheck {
	t.Helper()
	img := filepath.Join(t.TempDir(), "p.raw")
	if err := site.Store.Export(ctx(t), vm, id, disk, img, "raw"); err != nil {
		t.Fatal(err)
	}
	return testguest.CheckFS(t, img)
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// With filesystem consistency, a guest that keeps writing files with fsync yields
// points that are all clean: no journal recovery needed, e2fsck finds nothing,
// every file is whole. The same guest without quiescing shows the difference,
// and the freeze stays short.
func TestFilesystemConsistentPoints(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "e2fsck", "dumpe2fs", "debugfs")
	g := bootGuest(t, testguest.Options{Workload: testguest.FsyncWriter, DiskSize: 96 << 20})
	site := testsite.Start(t, recovery.Options{Keep: 1000})
	p := guestProtector(t, g, site, "g1")
	p.Quiescer = &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, MarkerDir: t.TempDir()}

	// 30 cycles: the freeze p99 is their longest; 12 of them checked (the
	// guest rewrites its files between cycles, so each check is a new state).
	cycles, checked := 30, 12
	var freezes []time.Duration
	var fsPoints []uint64
	for i := range cycles {
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if pt.Consistency != lifeboat.Filesystem {
			t.Fatalf("point %d is %s (%s), want filesystem", pt.ID, pt.Consistency, pt.Note)
		}
		freezes = append(freezes, pt.Freeze)
		fsPoints = append(fsPoints, pt.ID)
		time.Sleep(50 * time.Millisecond)
	}
	p50, p99 := percentile(freezes, 0.5), percentile(freezes, 0.99)
	t.Logf("freeze duration over %d cycles under TCG: p50 %v, p99 %v, max %v", len(freezes), p50, p99, percentile(freezes, 1))
	if p99 > 2*time.Second {
		t.Errorf("freeze p99 %v: the freeze window holds more than the transaction", p99)
	}
	var files int
	for _, id := range fsPoints[len(fsPoints)-checked:] {
		c := checkFS(t, site, "g1", id, g.DiskNode())
		if c.NeedsRecovery || !c.FsckClean || c.Bad > 0 {
			t.Errorf("filesystem-consistent point %d: needs recovery %v, e2fsck clean %v, %d of %d files broken", id, c.NeedsRecovery, c.FsckClean, c.Bad, c.Files)
		}
		files += c.Files
	}
	if files == 0 {
		t.Fatal("the guest wrote no file: the workload did not run")
	}

	// The same guest, crash consistent.
	p.Quiescer = nil
	var recovery, unclean, broken int
	for i := range checked {
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("crash cycle %d: %v", i, err)
		}
		if pt.Consistency != lifeboat.Crash || pt.Freeze != 0 {
			t.Fatalf("point without quiescing recorded as %s, freeze %v", pt.Consistency, pt.Freeze)
		}
		c := checkFS(t, site, "g1", pt.ID, g.DiskNode())
		if c.NeedsRecovery {
			recovery++
		}
		if !c.FsckClean {
			unclean++
		}
		broken += c.Bad
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("of %d filesystem-consistent points: 0 needed journal recovery; of %d crash-consistent points: %d needed journal recovery, %d failed e2fsck -fn, %d files broken",
		checked, checked, recovery, unclean, broken)
	if recovery == 0 {
		t.Errorf("no crash-consistent point needed journal recovery: the comparison shows nothing")
	}
}

// A guest whose agent does not answer, or whose freeze hangs, gets a
// crash-consistent point within the bound, recorded as such, and is never left
// frozen.
func TestQuiesceFailureFallsBackAndThaws(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	g := bootFreezeGuest(t, testguest.Options{Workload: testguest.FsyncWriter, DiskSize: 64 << 20})
	site := testsite.Start(t, recovery.Options{})
	p := guestProtector(t, g, site, "g1")
	const limit = 2 * time.Second
	q := &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: t.TempDir()}
	p.Quiescer = q

	// Application consistency: host hooks run around the freeze, in order, and
	// the point says so; a failing pre-freeze hook falls back to crash.
	t.Run("application hooks", func(t *testing.T) {
		log := filepath.Join(t.TempDir(), "hooks.log")
		aq := &protect.AgentQuiescer{VM: q.VM, Socket: q.Socket, Level: lifeboat.Application, Limit: q.Limit, MarkerDir: q.MarkerDir,
			PreFreeze: []string{"echo pre $LIFEBOAT_VM >> " + log},
			PostThaw:  []string{"echo post $LIFEBOAT_VM >> " + log}}
		p.Quiescer = aq
		defer func() { p.Quiescer = q }()
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(log)
		if pt.Consistency != lifeboat.Application || string(b) != "pre g1\npost g1\n" {
			t.Fatalf("point %s, hooks ran %q", pt.Consistency, b)
		}
		aq.PreFreeze = []string{"echo database refuses >&2; exit 3"}
		pt, err = p.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "database refuses") {
			t.Fatalf("failed pre-freeze hook: point %s, note %q", pt.Consistency, pt.Note)
		}
	})

	cases := []struct {
		name  string
		setup string // run in the guest before the cycle
	}{
		// The agent is stopped for a while: it answers nothing within the bound.
		// (In the background: the shell itself runs through the agent.)
		{"agent silent", agentSilentFor(5)},
		// A guest fsfreeze hook hangs: the freeze does not return within the bound.
		{"freeze hangs", "mkdir -p /etc/qemu/fsfreeze-hook.d && printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep 6\\nexit 0\\n' > /etc/qemu/fsfreeze-hook.d/slow && chmod +x /etc/qemu/fsfreeze-hook.d/slow"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := g.Shell(ctx(t), tc.setup); err != nil {
				t.Fatal(err)
			}
			if tc.name == "agent silent" {
				waitAgentSilent(t, g)
			}
			start := time.Now()
			pt, err := p.Cycle(ctx(t))
			took := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if pt.Consistency != lifeboat.Crash || pt.Note == "" {
				t.Fatalf("point recorded as %s (note %q), want crash with a note", pt.Consistency, pt.Note)
			}
			t.Logf("point %d: %s in %v: %s", pt.ID, pt.Consistency, took.Round(time.Millisecond), pt.Note)
			if took > 3*limit+5*time.Second {
				t.Fatalf("the fallback took %v, bound %v", took, limit)
			}
			// Never left frozen: once the agent answers again, the guest is thawed.
			begin := time.Now()
			if _, err := g.WaitThawed(ctx(t), 40*time.Second); err != nil {
				t.Fatalf("%v; console:\n%s", err, g.Console())
			}
			t.Logf("guest confirmed thawed %v after the cycle returned", time.Since(begin).Round(time.Millisecond))
			g.Shell(ctx(t), "rm -f /etc/qemu/fsfreeze-hook.d/slow")
		})
	}
	// Strict policy: the cycle fails instead, and nothing is committed.
	q.Strict = true
	before, _ := site.Store.Points("g1")
	g.Shell(ctx(t), agentSilentFor(4))
	waitAgentSilent(t, g)
	if _, err := p.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), "policy") {
		t.Fatalf("strict policy: cycle error %v", err)
	}
	if after, _ := site.Store.Points("g1"); len(after) != len(before) {
		t.Fatal("a point was committed although quiescing failed under a strict policy")
	}
}

// A guest with no file system the agent can freeze (here /data unmounted;
// in the field ZFS or FUSE, which qemu-ga skips) answers guest-fsfreeze-freeze
// with success and 0: nothing was quiesced, so the point is recorded crash
// consistent with a note saying why, also when application hooks ran around
// it; a strict policy fails the cycle. The agent is left thawed every time.
func TestFreezeOfNoFileSystemIsCrashConsistent(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	g := bootGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "nofs"})
	if out, err := g.Shell(ctx(t), "umount /data && grep -c ' /data ' /proc/mounts || true"); err != nil || strings.TrimSpace(out) != "0" {
		t.Fatalf("umount /data: %q, %v", out, err)
	}
	a, err := qga.Dial(ctx(t), g.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	n, err := a.Freeze(ctx(t))
	a.Thaw(ctx(t)) // a freeze of nothing leaves the agent in its frozen state all the same
	a.Close()
	if err != nil || n != 0 {
		t.Fatalf("the guest's agent froze %d file systems (%v); this test needs a guest where it freezes none", n, err)
	}
	if st, err := g.WaitThawed(ctx(t), 10*time.Second); err != nil {
		t.Fatalf("guest-fsfreeze-status %q: %v", st, err)
	}
	site := testsite.Start(t, recovery.Options{})
	p := guestProtector(t, g, site, "g1")
	hooks := filepath.Join(t.TempDir(), "hooks.log")

	for _, tc := range []struct {
		level lifeboat.Consistency
		note  string // in the point's note, beside the agent's count
		hooks string // what the host hooks logged
	}{
		{level: lifeboat.Filesystem, note: "froze no file system"},
		{level: lifeboat.Application, note: "application hooks ran", hooks: "pre g1\npost g1\n"},
	} {
		t.Run(string(tc.level), func(t *testing.T) {
			os.Remove(hooks)
			p.Quiescer = &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: tc.level, Limit: 5 * time.Second, MarkerDir: t.TempDir(),
				PreFreeze: []string{"echo pre $LIFEBOAT_VM >> " + hooks}, PostThaw: []string{"echo post $LIFEBOAT_VM >> " + hooks}}
			pt, err := p.Cycle(ctx(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("point %d: %s: %s", pt.ID, pt.Consistency, pt.Note)
			if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "froze no file system") || !strings.Contains(pt.Note, tc.note) {
				t.Errorf("asked for %s, the agent froze no file system: point recorded %s (note %q); want crash, saying why", tc.level, pt.Consistency, pt.Note)
			}
			if b, _ := os.ReadFile(hooks); string(b) != tc.hooks {
				t.Errorf("host hooks logged %q, want %q", b, tc.hooks)
			}
			if st, err := g.WaitThawed(ctx(t), 10*time.Second); err != nil {
				t.Fatalf("after the cycle: guest-fsfreeze-status %q: %v", st, err)
			}
		})
	}

	t.Run("strict", func(t *testing.T) {
		p.Quiescer = &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, Limit: 5 * time.Second, MarkerDir: t.TempDir(), Strict: true}
		before, _ := site.Store.Points("g1")
		_, err := p.Cycle(ctx(t))
		if err == nil || !strings.Contains(err.Error(), "froze no file system") {
			t.Errorf("strict policy, the agent froze no file system: cycle error %v; want the cycle to fail, saying why", err)
		}
		if after, _ := site.Store.Points("g1"); len(after) != len(before) {
			t.Errorf("a point was committed although the strict policy forbids a crash-consistent one")
		}
		if st, err := g.WaitThawed(ctx(t), 10*time.Second); err != nil {
			t.Fatalf("after the failed cycle: guest-fsfreeze-status %q: %v", st, err)
		}
	})
}

// A consistency group of two guests: each group point holds both guests at one
// instant. A host loop sends a counter to both guests, the next value only once
// both have fsynced the last, so at any instant their files differ by at most
// one, the first guest ahead.
func TestConsistencyGroupSharesOneInstant(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "debugfs")
	g1 := bootGuest(t, testguest.Options{Workload: testguest.Counter, DiskSize: 32 << 20, Name: "web"})
	g2 := bootGuest(t, testguest.Options{Workload: testguest.Counter, DiskSize: 32 << 20, Name: "db"})
	site := testsite.Start(t, recovery.Options{Keep: 100})
	p1, p2 := guestProtector(t, g1, site, "web"), guestProtector(t, g2, site, "db")
	for _, x := range []struct {
		p *protect.Protector
		g *testguest.Guest
	}{{p1, g1}, {p2, g2}} {
		x.p.Quiescer = &protect.AgentQuiescer{VM: x.p.VM.Name, Socket: x.g.AgentSocket(), Level: lifeboat.Filesystem, MarkerDir: t.TempDir()}
	}
	group := &protect.Group{Name: "tier1", Members: []*protect.Protector{p1, p2}}

	stop := make(chan struct{})
	var sent atomic.Int64
	done := make(chan error, 1)
	go func() {
		for i := 1; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			line := strconv.Itoa(i)
			for _, g := range []*testguest.Guest{g1, g2} {
				if err := g.SendCounter(line); err != nil {
					done <- err
					return
				}
			}
			for _, g := range []*testguest.Guest{g1, g2} {
				c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := g.WaitCounter(c, line)
				cancel()
				if err != nil {
					// A line sent while the guest's side of the port was not
					// open yet can be lost: send it once more (a repeated
					// line leaves the guest's counter as it is).
					if err = g.SendCounter(line); err == nil {
						c, cancel = context.WithTimeout(context.Background(), 30*time.Second)
						err = g.WaitCounter(c, line)
						cancel()
					}
				}
				if err != nil {
					done <- err
					return
				}
			}
			sent.Store(int64(i))
		}
	}()
	// The workload's end, once: a failure of it ends the test with its error
	// instead of leaving the test waiting for counts that never come.
	var (
		workDone bool
		workErr  error
	)
	finished := func() bool {
		if !workDone {
			select {
			case workErr = <-done:
				workDone = true
			default:
			}
		}
		return workDone
	}
	defer func() {
		close(stop)
		if !finished() {
			select {
			case workErr = <-done:
			case <-time.After(time.Minute):
				t.Error("the counter workload did not stop within a minute")
			}
		}
	}()
	waitSent := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for sent.Load() < n {
			if finished() {
				t.Fatalf("the counter workload stopped at %d of %d: %v", sent.Load(), n, workErr)
			}
			if time.Now().After(deadline) {
				t.Fatalf("the counter workload reached %d of %d in 2 minutes", sent.Load(), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	counter := func(vm string, id uint64) int {
		img := filepath.Join(t.TempDir(), "p.raw")
		if err := site.Store.Export(ctx(t), vm, id, "vda", img, "raw"); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("debugfs", "-R", "cat /counter", img).Output()
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Fields(string(out))
		if len(lines) == 0 {
			return 0
		}
		n, _ := strconv.Atoi(lines[len(lines)-1])
		return n
	}
	for round := 0; round < 4; round++ {
		waitSent(int64(5 * (round + 1)))
		pts, err := group.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(pts) != 2 || pts[0].Group == "" || pts[0].Group != pts[1].Group {
			t.Fatalf("group point: %+v", pts)
		}
		for _, pt := range pts {
			if pt.Consistency != lifeboat.Filesystem {
				t.Fatalf("vm %s point %d is %s: %s", pt.VM, pt.ID, pt.Consistency, pt.Note)
			}
		}
		c1, c2 := counter("web", pts[0].ID), counter("db", pts[1].ID)
		t.Logf("group point %s: web counter %d, db counter %d (sent %d)", pts[0].Group, c1, c2, sent.Load())
		if c1 == 0 || c2 == 0 || c1-c2 < -1 || c1-c2 > 1 {
			t.Fatalf("group point %s: web at %d, db at %d: not one instant", pts[0].Group, c1, c2)
		}
	}
	// The control: the same two VMs taken one after the other, a second apart,
	// are not at one instant.
	a, err := p1.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	b, err := p2.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	c1, c2 := counter("web", a.ID), counter("db", b.ID)
	t.Logf("separate points a second apart: web %d, db %d", c1, c2)
	if c2-c1 <= 1 {
		t.Fatalf("separate points a second apart are at %d and %d: the counter does not move, so the group check proves nothing", c1, c2)
	}
}

// The guest-side probe and freeze hook of TestLateFreeze. The probe truncates
// a file in /data every 200 ms (that blocks while /data is frozen) and appends the
// guest's uptime after each touch, in centiseconds, to /run/probe.log (a
// tmpfs, never frozen): a gap in it is how long /data stayed frozen, seen from
// inside the guest. The hook prints the uptime when it starts and when it
// ends, and qemu-ga freezes right after it ends.
const (
	probeScript = `while :; do
  : > /data/probe
  read u _ < /proc/uptime
  echo "${u%.*}${u#*.}" >> /run/probe.log
  usleep 200000
done
`
	lateHook = `#!/bin/sh
[ "$1" = freeze ] || exit 0
cs() { u=$(cut -d' ' -f1 /proc/uptime); echo "${u%.*}${u#*.}"; }
echo "LB-HOOK-START $(cs)" > /dev/console
sleep 12
echo "LB-HOOK-DONE $(cs)" > /dev/console
`
	hookDuration = 12 * time.Second
)

// consoleLine waits, for at most within, for a console line after offset
// that starts with word and whose numbers pass ok; it returns the numbers and
// when the line was seen.
func consoleLine(g *testguest.Guest, offset int, word string, within time.Duration, ok func([]int64) bool) ([]int64, time.Time, bool) {
	for deadline := time.Now().Add(within); ; time.Sleep(20 * time.Millisecond) {
		seen := time.Now()
		con := g.Console()
		if len(con) > offset {
			for _, l := range strings.Split(con[offset:], "\n") {
				f := strings.Fields(l)
				if len(f) < 2 || f[0] != word {
					continue
				}
				var nums []int64
				for _, s := range f[1:] {
					n, err := strconv.ParseInt(s, 10, 64)
					if err != nil {
						break
					}
					nums = append(nums, n)
				}
				if len(nums) == len(f)-1 && (ok == nil || ok(nums)) {
					return nums, seen, true
				}
			}
		}
		if seen.After(deadline) {
			return nil, seen, false
		}
	}
}

func centis(cs int64) time.Duration { return time.Duration(cs) * 10 * time.Millisecond }

// guestUptime is the guest's uptime in centiseconds, the probe's clock.
func guestUptime(t *testing.T, g *testguest.Guest) int64 {
	t.Helper()
	out, err := g.Shell(ctx(t), "u=$(cut -d' ' -f1 /proc/uptime); echo ${u%.*}${u#*.}")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatalf("guest uptime %q: %v", out, err)
	}
	return n
}

// probeTicks are the probe's ticks (guest uptime, centiseconds) since from,
// and the latest before from, once enough says they are enough (the probe
// ticks slowly on a loaded machine).
func probeTicks(t *testing.T, g *testguest.Guest, from int64, enough func([]int64) bool) []int64 {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(300 * time.Millisecond) {
		out, err := g.Shell(ctx(t), "cat /run/probe.log")
		if err != nil {
			t.Fatal(err)
		}
		var all []int64 // in order: the probe appends
		for _, f := range strings.Fields(out) {
			if n, err := strconv.ParseInt(f, 10, 64); err == nil {
				all = append(all, n)
			}
		}
		i := sort.Search(len(all), func(i int) bool { return all[i] >= from })
		ticks := all[max(0, i-1):]
		if enough(ticks) {
			return ticks
		}
		if time.Now().After(deadline) {
			t.Fatalf("the probe ticked only at %v since guest uptime %d: it does not run", ticks, from)
		}
	}
}

// waitMarkerGone waits until the freeze marker is gone: the quiescer removes it
// once guest-fsfreeze-status has said "thawed".
func waitMarkerGone(marker string, within time.Duration) (time.Time, bool) {
	for deadline := time.Now().Add(within); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(marker); os.IsNotExist(err) {
			return time.Now(), true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
	}
}

// A guest whose fsfreeze hook takes 12 s under a 2 s freeze limit: the cycle
// falls back to a crash-consistent point at the limit, and the freeze that
// lands when the hook ends is thawed a few seconds later by the thaw loop,
// confirmed by guest-fsfreeze-status (the freeze marker goes only then) and
// seen from inside the guest (a probe's writes resume). The other subtests
// cover the loop's other callers: the freeze timer (a freeze nobody thaws is
// thawed at the limit), the thaw guard and a site's start (ThawLeftovers).
func TestLateFreeze(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	g := bootFreezeGuest(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "late"})
	if _, err := g.Shell(ctx(t), "cat > /run/probe <<'EOF'\n"+probeScript+"EOF\nsh /run/probe </dev/null >/dev/null 2>&1 &"); err != nil {
		t.Fatal(err)
	}
	site := testsite.Start(t, recovery.Options{})
	p := guestProtector(t, g, site, "g1")
	if _, err := p.Cycle(ctx(t)); err != nil { // the initial sync, so that the cycles below are short
		t.Fatal(err)
	}
	const limit = 2 * time.Second
	// thawWithin bounds freeze landed -> guest confirmed thawed: the loop's
	// attempt waiting on the busy agent gets its answer as soon as the freeze
	// lands, or the loop dials again within a second; the rest is margin for
	// a loaded machine running TCG.
	const thawWithin = 5 * time.Second
	markers := t.TempDir()
	marker := filepath.Join(markers, "g1.frozen")
	q := &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: markers}
	p.Quiescer = q

	t.Run("freeze timer", func(t *testing.T) {
		from := guestUptime(t, g)
		f, err := q.Freeze(ctx(t))
		if err != nil || f.Level != lifeboat.Filesystem {
			t.Fatalf("freeze: %+v, %v", f, err)
		}
		// Nobody calls Thaw: the timer thaws at the limit.
		if _, ok := waitMarkerGone(marker, limit+thawWithin); !ok {
			t.Fatalf("the guest is not confirmed thawed %v after a freeze limited to %v", limit+thawWithin, limit)
		}
		held, err := f.Thaw(ctx(t))
		if held || err != nil {
			t.Fatalf("Thaw after the timer: held %v, %v; want not held, no error", held, err)
		}
		// The guest is thawed by now: a tick after now closes the gap.
		thawed := guestUptime(t, g)
		ticks := probeTicks(t, g, from, func(ts []int64) bool { return len(ts) > 0 && ts[len(ts)-1] > thawed })
		var frozen time.Duration
		for i := 1; i < len(ticks); i++ {
			frozen = max(frozen, centis(ticks[i]-ticks[i-1]))
		}
		t.Logf("freeze timer: the probe's longest gap %v (guest clock), limit %v", frozen, limit)
		if frozen < limit/2 || frozen > limit+thawWithin {
			t.Fatalf("the probe's longest gap is %v (ticks %v, guest uptime %d before the freeze, %d after the thaw): /data was not held frozen for the %v limit and thawed then",
				frozen, ticks, from, thawed, limit)
		}
	})

	t.Run("hook outlasts the limit", func(t *testing.T) {
		if _, err := g.Shell(ctx(t), "mkdir -p /etc/qemu/fsfreeze-hook.d && cat > /etc/qemu/fsfreeze-hook.d/slow <<'EOF'\n"+lateHook+"EOF\nchmod +x /etc/qemu/fsfreeze-hook.d/slow"); err != nil {
			t.Fatal(err)
		}
		offset := len(g.Console())
		start := time.Now()
		pt, err := p.Cycle(ctx(t))
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("point %d: %s in %v: %s", pt.ID, pt.Consistency, took.Round(time.Millisecond), pt.Note)
		if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "guest-fsfreeze-freeze") {
			t.Fatalf("point recorded as %s (note %q), want crash consistent with a note on the freeze", pt.Consistency, pt.Note)
		}
		if took > limit+6*time.Second || took > hookDuration {
			t.Fatalf("the cycle took %v under a %v freeze limit (the hook takes %v)", took, limit, hookDuration)
		}
		// While the hook still runs, the next cycle does not queue a second
		// freeze behind the first (whose thaw could land in its instant): it
		// falls back at once.
		start = time.Now()
		pt, err = p.Cycle(ctx(t))
		took = time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "previous freeze") || took > limit {
			t.Errorf("a cycle while the late freeze is pending: %s in %v (note %q); want crash consistent at once, saying why", pt.Consistency, took, pt.Note)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Fatalf("the freeze marker went before the late freeze was thawed: %v", err)
		}
		done, landed, ok := consoleLine(g, offset, "LB-HOOK-DONE", hookDuration+20*time.Second, nil)
		if !ok {
			t.Fatalf("the freeze hook never ended; console:\n%s", g.Console()[offset:])
		}
		confirmed, ok := waitMarkerGone(marker, thawWithin)
		if !ok {
			// Seen from inside too, if the agent answers at all.
			c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			st, _ := g.WaitThawed(c, 2*time.Second)
			cancel()
			t.Fatalf("the guest is not confirmed thawed %v after the late freeze landed (marker %s stays; the agent says %q)", thawWithin, marker, st)
		}
		if st, err := g.WaitThawed(ctx(t), 5*time.Second); err != nil {
			t.Fatalf("guest-fsfreeze-status %q: %v", st, err)
		}
		ticks := probeTicks(t, g, done[0], func(ts []int64) bool { return len(ts) > 0 && ts[len(ts)-1] > done[0] })
		var before, after int64 = -1, -1
		for _, tk := range ticks {
			if tk <= done[0] {
				before = tk
			} else if after < 0 {
				after = tk
			}
		}
		if before < 0 || after < 0 {
			t.Fatalf("probe ticks %v around the hook's end at %d: none before or after", ticks, done[0])
		}
		inGuest := centis(after - done[0])
		t.Logf("late freeze: freeze landed -> confirmed thawed by guest-fsfreeze-status %v (host clock); -> the probe's first write %v (guest clock; its gap %v); bound %v",
			confirmed.Sub(landed).Round(time.Millisecond), inGuest, centis(after-before), thawWithin)
		if inGuest > thawWithin {
			t.Fatalf("/data stayed frozen %v after the late freeze landed, bound %v", inGuest, thawWithin)
		}
		// The freeze did land, and the agent thawed it (its hook runs "thaw" after).
		if log, err := g.Shell(ctx(t), "cat /run/lifeboat-fsfreeze.log; rm -f /etc/qemu/fsfreeze-hook.d/slow"); err != nil || !strings.HasSuffix(log, "freeze\nthaw\n") {
			t.Fatalf("fsfreeze hook log %q, %v: want freeze then thaw", log, err)
		}
		// The agent is in step again: the next cycle is filesystem consistent.
		pt, err = p.Cycle(ctx(t))
		if err != nil || pt.Consistency != lifeboat.Filesystem {
			t.Fatalf("the cycle after: point %+v, %v; want filesystem consistent", pt, err)
		}
	})

	// The two other callers of the thaw loop, on a guest frozen by a site
	// that died: the thaw guard (its stdin ended) and the site's next start
	// (a marker names the agent).
	t.Run("guard and leftovers", func(t *testing.T) {
		freezeBehindOurBack := func() {
			t.Helper()
			a, err := qga.Dial(ctx(t), g.AgentSocket())
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			if _, err := a.Freeze(ctx(t)); err != nil {
				t.Fatal(err)
			}
		}
		confirmThawed := func(who string) {
			t.Helper()
			if st, err := g.WaitThawed(ctx(t), 2*time.Second); err != nil {
				t.Fatalf("after %s: guest-fsfreeze-status %q: %v", who, st, err)
			}
			if _, err := os.Stat(marker); !os.IsNotExist(err) {
				t.Fatalf("%s left the marker: %v", who, err)
			}
		}
		freezeBehindOurBack()
		os.WriteFile(marker, []byte(g.AgentSocket()+"\n"), 0o600)
		if err := protect.RunThawGuard(ctx(t), protect.FrozenGuest{Socket: g.AgentSocket()}, marker, strings.NewReader(""), 30*time.Second, slog.Default()); err != nil {
			t.Fatal(err)
		}
		confirmThawed("the thaw guard")
		freezeBehindOurBack()
		os.WriteFile(marker, []byte(g.AgentSocket()+"\n"), 0o600)
		protect.ThawLeftovers(markers, nil, slog.Default())
		confirmThawed("ThawLeftovers")
	})
}

// agentSilentFor is a guest shell script that stops the guest's agent for
// secs seconds, in the background: the shell itself runs through the agent.
func agentSilentFor(secs int) string {
	return fmt.Sprintf("(kill -STOP $(pidof qemu-ga); sleep %d; kill -CONT $(pidof qemu-ga)) >/dev/null 2>&1 &", secs)
}

// waitAgentSilent waits until the guest's agent stops answering (the
// background stop of agentSilentFor has landed): on a loaded machine the
// cycle's freeze could otherwise reach the agent first.
func waitAgentSilent(t *testing.T, g *testguest.Guest) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		pctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		a, err := qga.Dial(pctx, g.AgentSocket())
		if err == nil {
			err = a.Ping(pctx)
			a.Close()
		}
		cancel()
		if err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("the guest's agent still answers 10 s after it was to be stopped")
}

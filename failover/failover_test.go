package failover_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// counterLines sends lines from..to (each acknowledged after the guest's
// fsync) and returns them.
func counterLines(t *testing.T, g *testguest.Guest, from, to int) []string {
	t.Helper()
	var out []string
	for i := from; i <= to; i++ {
		line := fmt.Sprintf("line-%03d", i)
		if err := g.SendCounter(line); err != nil {
			t.Fatal(err)
		}
		if err := g.WaitCounter(testCtx(t, 10*time.Second), line); err != nil {
			// A line sent while the guest's side of the port is between two
			// opens can be lost (lb-counter reopens it): send it once more.
			// Should the first arrive after all, the line is in the file
			// twice in a row, which sameLines reads as once.
			t.Logf("no ack of %q in 10 s (%v): sending it again", line, err)
			if err := g.SendCounter(line); err != nil {
				t.Fatal(err)
			}
			if err := g.WaitCounter(testCtx(t, 30*time.Second), line); err != nil {
				t.Fatal(err)
			}
		}
		out = append(out, line)
	}
	return out
}

// sameLines reports whether the counter file got holds exactly want's
// lines in order, a line repeated in a row counted once (a resent line).
func sameLines(got string, want []string) bool {
	var lines []string
	for _, l := range strings.Split(strings.TrimSuffix(got, "\n"), "\n") {
		if len(lines) == 0 || lines[len(lines)-1] != l {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n") == strings.Join(want, "\n")
}

// guestFile reads a file inside a run's guest, through its agent.
func guestFile(t *testing.T, r *failover.Run, path string) string {
	t.Helper()
	ctx := testCtx(t, 30*time.Second)
	a, err := qga.Dial(ctx, r.Agent)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	out, err := a.Output(ctx, "/bin/cat", path)
	if err != nil {
		t.Fatalf("cat %s in the recovered guest: %v", path, err)
	}
	return string(out)
}

func manager(t *testing.T, site *testsite.Site) *failover.Manager {
	return &failover.Manager{Store: site.Store, Dir: testsite.ShortDir(t), Site: "dr"}
}

// A real failover after the production site is lost: the guest comes up at
// the recovery site from the latest point with exactly the lines it had
// fsynced by then (none written after the point), writes more, and the old
// production site, back again, is refused and told why. A test failover of
// an earlier point shows that point's lines, not the latest's.
func TestFailoverAfterProductionLost(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "fo", Workload: testguest.Counter})
	site := testsite.Start(t, recovery.Options{Keep: 10})
	p := &protect.Protector{
		VM:     protect.VM{Name: "web1", QMPSocket: g.VMQMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	first := counterLines(t, g, 1, 5)
	p1, err := p.Cycle(testCtx(t, 2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	second := append(first, counterLines(t, g, 6, 10)...)
	p2, err := p.Cycle(testCtx(t, 2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	counterLines(t, g, 11, 12) // acknowledged, never replicated
	g.Kill()

	m := manager(t, site)
	m.CommitAfter = time.Hour
	ctx := testCtx(t, 3*time.Minute)
	r, err := m.Start(ctx, "web1", failover.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Stop(context.Background(), r) })
	if want := r.Started.Add(time.Hour); !r.CommitBy.Equal(want) {
		t.Errorf("the failover commits itself at %v, want an hour after its start, %v", r.CommitBy, want)
	}
	if err := m.WaitAgent(ctx, r); err != nil {
		t.Fatal(err)
	}
	t.Logf("failover of point %d: QEMU running %v after the command, agent answering after %v", r.Point, r.ToRunning, r.ToAgent)
	if r.Point != p2.ID {
		t.Errorf("failover chose point %d, want the latest, %d", r.Point, p2.ID)
	}
	if got := guestFile(t, r, "/data/counter"); !sameLines(got, second) {
		t.Errorf("the recovered guest's /data/counter:\n%s\nwant exactly the lines of point %d:\n%s", got, p2.ID, strings.Join(second, "\n"))
	}
	checkFailbackGenerations(ctx, t, r, p2)
	// It writes more, on its overlay.
	a, err := qga.Dial(ctx, r.Agent)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Output(ctx, "/bin/sh", "-c", "echo after-failover >> /data/counter && sync"); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if got := guestFile(t, r, "/data/counter"); !strings.HasSuffix(got, "after-failover\n") {
		t.Errorf("the recovered guest could not write: %q", got)
	}

	// The recovery site owns the VM now; the old production site is refused.
	o, ok, err := site.Store.Owner("web1")
	if err != nil || !ok || o.Site != "dr" || !o.FailedOver || o.FromPoint != p2.ID || o.Epoch != 2 {
		t.Errorf("owner after the failover: %+v %v %v, want dr, failed over from point %d, epoch 2", o, ok, err, p2.ID)
	}
	g2 := testguest.Boot(t, testguest.Options{Name: "fo2", Image: g.DiskImage()})
	p.VM.QMPSocket = g2.VMQMPSocket()
	_, err = p.Cycle(testCtx(t, 2*time.Minute))
	if err == nil || !strings.Contains(err.Error(), "failed over") {
		t.Fatalf("the old production site's cycle after the failover: %v, want it refused as failed over", err)
	}
	if !strings.Contains(err.Error(), "failed over to recovery site \"dr\"") || !strings.Contains(err.Error(), "--undo") {
		t.Errorf("the refusal does not say what happened and what to do: %v", err)
	}
	t.Logf("old production site told: %v", err)

	// A test of the earlier point, beside the failover: that point's lines.
	// It is chosen by time, as a plan's --point TIME does.
	if _, err := m.Start(ctx, "web1", failover.Options{Before: p1.Instant.Add(-time.Hour), Test: true}); err == nil || !strings.Contains(err.Error(), "no point taken at or before") {
		t.Errorf("a test from before the first point: %v, want it refused as having no point then", err)
	}
	// A millisecond before the first point: the refusal's two times must not
	// read alike (they did when printed to the second).
	justBefore := p1.Instant.Add(-time.Millisecond)
	_, err = m.Start(ctx, "web1", failover.Options{Before: justBefore, Test: true})
	if err == nil || !strings.Contains(err.Error(), justBefore.UTC().Format(time.RFC3339Nano)) || !strings.Contains(err.Error(), p1.Instant.UTC().Format(time.RFC3339Nano)) {
		t.Errorf("a test from just before the first point: %v, want it refused naming both times exactly (%s, %s)", err,
			justBefore.UTC().Format(time.RFC3339Nano), p1.Instant.UTC().Format(time.RFC3339Nano))
	}
	tr, err := m.Start(ctx, "web1", failover.Options{Before: p1.Instant, Test: true})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Point != p1.ID {
		t.Errorf("the latest point at or before point %d's instant is %d", p1.ID, tr.Point)
	}
	if err := m.WaitAgent(ctx, tr); err != nil {
		t.Fatal(err)
	}
	if got := guestFile(t, tr, "/data/counter"); !sameLines(got, first) {
		t.Errorf("the test of point %d shows:\n%s\nwant its lines:\n%s", p1.ID, got, strings.Join(first, "\n"))
	}
	if err := m.Stop(ctx, tr); err != nil {
		t.Fatal(err)
	}
	// The tested point says so (what `points` shows), the others do not.
	if pt, err := site.Store.Point("web1", p1.ID); err != nil || pt.Tested == nil || pt.Tested.Run != tr.ID || pt.Tested.ToAgent != tr.ToAgent {
		t.Errorf("point %d after its test: %+v %v, want it marked tested by %s", p1.ID, pt.Tested, err, tr.ID)
	}
	if pt, _ := site.Store.Point("web1", p2.ID); pt.Tested != nil {
		t.Errorf("point %d, failed over but never tested, is marked tested: %+v", p2.ID, pt.Tested)
	}
	if _, err := os.Stat(tr.Dir); !os.IsNotExist(err) {
		t.Errorf("the test's directory is left: %v", err)
	}
	if pins, _ := site.Store.Pins("web1"); len(pins) != 1 {
		t.Errorf("pins after the test ended: %v, want only the failover's", pins)
	}
	runs, _ := m.Runs("web1")
	if len(runs) != 1 || runs[0].ID != r.ID {
		t.Errorf("runs: %v, want only the failover", runs)
	}

	// Committed, the failover is kept: an undo would discard what the VM
	// wrote here, and is refused.
	if err := m.Commit(r); err != nil {
		t.Fatal(err)
	}
	if runs, _ := m.Runs("web1"); len(runs) != 1 || !runs[0].Committed {
		t.Errorf("runs after the commit: %+v", runs)
	}
	if err := m.Stop(ctx, r); err == nil || !strings.Contains(err.Error(), "committed") {
		t.Errorf("undo of a committed failover: %v, want it refused", err)
	}
	if !r.Alive() {
		t.Error("the refused undo stopped the VM")
	}
	syscall.Kill(r.PID, syscall.SIGKILL) // the test's own cleanup
}

// A test failover while replication goes on: points keep arriving during the
// test (retention waits meanwhile, so nothing under the test is merged), the
// test's guest writes only its throwaway overlay, and --stop leaves every
// point verifying and byte-identical to before. Ownership never moves.
func TestTestFailoverWhileReplicating(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "tf", Workload: testguest.Counter})
	site := testsite.Start(t, recovery.Options{Keep: 2})
	p := &protect.Protector{
		VM:     protect.VM{Name: "web1", QMPSocket: g.VMQMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	cycle := func() uint64 {
		t.Helper()
		pt, err := p.Cycle(testCtx(t, 2*time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		return pt.ID
	}
	counterLines(t, g, 1, 3)
	cycle()
	counterLines(t, g, 4, 6)
	tested := cycle()
	hashes := map[uint64]string{}
	for _, id := range []uint64{1, 2} {
		hashes[id] = site.PointHash(t, "web1", id, "vda")
	}

	m := manager(t, site)
	ctx := testCtx(t, 3*time.Minute)
	r, err := m.Start(ctx, "web1", failover.Options{Test: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Point != tested || r.Owner != nil {
		t.Errorf("test run %+v: want point %d and no change of owner", r, tested)
	}
	if err := m.WaitAgent(ctx, r); err != nil {
		t.Fatal(err)
	}
	a, err := qga.Dial(ctx, r.Agent)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Output(ctx, "/bin/sh", "-c", "echo written-by-the-test >> /data/counter && dd if=/dev/urandom of=/data/junk bs=64k count=16 2>/dev/null && sync"); err != nil {
		t.Fatal(err)
	}
	a.Close()
	// A second test at once, of the earlier point.
	r2, err := m.Start(ctx, "web1", failover.Options{Point: 1, Test: true})
	if err != nil {
		t.Fatalf("a second test beside the first: %v", err)
	}
	if r2.ID == r.ID || r2.Dir == r.Dir || !r2.Alive() || !r.Alive() || r2.Point != 1 {
		t.Errorf("two tests at once: %+v and %+v, want both running, apart", r, r2)
	}
	// Replication goes on: three more points while the test runs; with
	// keep: 2 retention would merge, but waits for the test.
	for i := 7; i <= 9; i++ {
		counterLines(t, g, i, i)
		cycle()
	}
	if got := pointIDs(t, site); len(got) != 5 {
		t.Errorf("points during the test: %v, want all 5 (retention waits while the test reads the chain)", got)
	}
	for id, want := range hashes {
		if got := site.PointHash(t, "web1", id, "vda"); got != want {
			t.Errorf("point %d changed while the test ran", id)
		}
	}
	// Every point as it reads before the tests end: retention, which
	// waited for them, catches up as the last one stops (keep: 2).
	all := pointIDs(t, site)
	for _, id := range all {
		hashes[id] = site.PointHash(t, "web1", id, "vda")
	}
	for _, run := range []*failover.Run{r, r2} {
		if err := m.Stop(ctx, run); err != nil {
			t.Fatal(err)
		}
	}
	site.Store.SettleRetention()
	got := pointIDs(t, site)
	if len(got) != 2 || got[0] != all[len(all)-2] || got[1] != all[len(all)-1] {
		t.Errorf("points after the tests ended: %v, want the newest 2 of %v (retention catches up by itself)", got, all)
	}
	for _, id := range got {
		if h := site.PointHash(t, "web1", id, "vda"); h != hashes[id] {
			t.Errorf("point %d is not byte-identical after the tests and retention", id)
		}
		rep, err := site.Store.Verify(ctx, "web1", id, nil)
		if err != nil {
			t.Errorf("point %d does not verify after the tests: %v (%+v)", id, err, rep)
		}
	}
	if o, _, _ := site.Store.Owner("web1"); o.Site != "prod" || o.Epoch != 1 || o.FailedOver {
		t.Errorf("owner after a test: %+v, want prod, epoch 1", o)
	}
}

// An undone failover: the VM goes back to its production site under a new
// epoch, and the next cycle there is incremental (its bitmap survived), with
// a byte-exact replica.
func TestUndoResumesIncrementally(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "ud", Workload: testguest.Counter})
	site := testsite.Start(t, recovery.Options{Keep: 10})
	p := &protect.Protector{
		VM:     protect.VM{Name: "web1", QMPSocket: g.VMQMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	counterLines(t, g, 1, 3)
	if _, err := p.Cycle(testCtx(t, 2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	m := manager(t, site)
	// The recovery site gives the VM more vCPUs and memory than production.
	m.Overrides = map[string]failover.Override{"web1": {CPUs: 2, MemoryMiB: 640}}
	ctx := testCtx(t, 3*time.Minute)
	r, err := m.Start(ctx, "web1", failover.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mon, err := qemu.Dial(ctx, r.QMP)
	if err != nil {
		t.Fatal(err)
	}
	got, err := mon.Definition(ctx, nil)
	mon.Close()
	if err != nil || got.CPUs != 2 || got.MemoryMiB != 640 || r.CPUs != 2 || r.MemoryMiB != 640 {
		t.Errorf("the failed-over VM has %d vCPUs and %d MiB (run record: %d, %d; %v), want the override's 2 and 640", got.CPUs, got.MemoryMiB, r.CPUs, r.MemoryMiB, err)
	}
	if pt, _ := site.Store.Point("web1", r.Point); pt.Definition != nil && pt.Definition.CPUs == 2 {
		t.Errorf("the override changed the point's stored definition: %+v", pt.Definition)
	}
	if _, err := p.Cycle(testCtx(t, time.Minute)); err == nil || !strings.Contains(err.Error(), "failed over") {
		t.Fatalf("a cycle during the failover: %v, want it refused", err)
	}
	if err := m.Stop(ctx, r); err != nil {
		t.Fatal(err)
	}
	if o, _, _ := site.Store.Owner("web1"); o.Site != "prod" || o.Epoch != 3 || o.FailedOver {
		t.Errorf("owner after the undo: %+v, want prod under epoch 3", o)
	}
	counterLines(t, g, 4, 6)
	vmCommand(t, g, "stop") // CPUs stopped: the disk can be hashed at the instant
	pt, err := p.Cycle(testCtx(t, 2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	src, err := workload.Open(ctx, g.StorageNBDSocket(), 0, workload.Disk{Name: g.DiskNode(), Size: testguest.DefaultDiskSize})
	if err != nil {
		t.Fatal(err)
	}
	want, err := src.Hashes(ctx)
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	vmCommand(t, g, "cont")
	if got := site.PointHash(t, "web1", pt.ID, "vda"); got != want[g.DiskNode()] {
		t.Errorf("point %d after the undo is not the production disk", pt.ID)
	}
	if pt.Disks[0].Resync {
		t.Errorf("the cycle after the undo resent the disk whole: %+v", pt.Disks[0])
	}
	t.Logf("cycle after the undo: point %d, changed %d bytes, sent %d", pt.ID, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if pt.Stats.BytesChanged >= testguest.DefaultDiskSize/2 {
		t.Errorf("the cycle after the undo changed %d bytes of a %d-byte disk: not incremental", pt.Stats.BytesChanged, testguest.DefaultDiskSize)
	}
}

func pointIDs(t *testing.T, site *testsite.Site) []uint64 {
	t.Helper()
	pts, err := site.Store.Points("web1")
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, p := range pts {
		ids = append(ids, p.ID)
	}
	return ids
}

func vmCommand(t *testing.T, g *testguest.Guest, cmd string) {
	t.Helper()
	m, err := qemu.Dial(testCtx(t, 10*time.Second), g.VMQMPSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Execute(testCtx(t, 10*time.Second), cmd, nil, nil); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
}

// A planned migration loses nothing: every line the guest acknowledged
// before the command is in the recovered guest, the production QEMU is gone,
// and the recovery site owns the VM. Through the agent the guest powers off
// (a filesystem-consistent point); pressing the power button, which the test
// guest ignores (no ACPI daemon), ends in its CPUs stopped after the timeout.
func TestPlannedMigrationLosesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	t.Run("guest powers off through its agent", func(t *testing.T) { plannedMigration(t, true) })
	t.Run("guest ignores the power button", func(t *testing.T) { plannedMigration(t, false) })
}

func plannedMigration(t *testing.T, agent bool) {
	g := testguest.Boot(t, testguest.Options{Name: "pm", Workload: testguest.Counter})
	site := testsite.Start(t, recovery.Options{Keep: 10})
	p := &protect.Protector{
		VM:     protect.VM{Name: "web1", QMPSocket: g.VMQMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	m := manager(t, site)
	var started *failover.Run
	site.SetStartVM(func(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error) {
		r, err := m.Start(ctx, vm, failover.Options{Point: point})
		if err != nil {
			return wire.FailoverResult{}, err
		}
		started = r
		return wire.FailoverResult{Run: r.ID, Point: r.Point, ToRunning: r.ToRunning, Epoch: r.Owner.Epoch}, nil
	})
	lines := counterLines(t, g, 1, 3)
	if _, err := p.Cycle(testCtx(t, 2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	lines = append(lines, counterLines(t, g, 4, 8)...) // acknowledged after the last cycle
	ctx := testCtx(t, 4*time.Minute)
	opts := protect.MigrateOptions{ShutdownTimeout: 3 * time.Second}
	if agent {
		opts.ShutdownTimeout, opts.Agent = time.Minute, g.AgentSocket()
	}
	mig, err := p.Migrate(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if mig.ShutDown != agent {
		t.Errorf("the guest shut down: %v, want %v", mig.ShutDown, agent)
	}
	if want := map[bool]lifeboat.Consistency{true: lifeboat.Filesystem, false: lifeboat.Crash}[agent]; mig.Point.Consistency != want || !strings.Contains(mig.Point.Note, "planned migration") {
		t.Errorf("the migration's point: %s (%s), want %s and a note saying why", mig.Point.Consistency, mig.Point.Note, want)
	}
	t.Logf("planned migration: point %d (%s: %s), shut down %v, run %s, took %v", mig.Point.ID, mig.Point.Consistency, mig.Point.Note, mig.ShutDown, mig.Run.Run, mig.Took)
	if started == nil || started.Point != mig.Point.ID {
		t.Fatalf("the recovery site started %+v, want point %d", started, mig.Point.ID)
	}
	t.Cleanup(func() { m.Stop(context.Background(), started) })
	if err := m.WaitAgent(ctx, started); err != nil {
		t.Fatal(err)
	}
	if got := guestFile(t, started, "/data/counter"); !sameLines(got, lines) {
		t.Errorf("after the migration /data/counter holds:\n%s\nwant every acknowledged line:\n%s", got, strings.Join(lines, "\n"))
	}
	if o, _, _ := site.Store.Owner("web1"); o.Site != "dr" || !o.FailedOver {
		t.Errorf("owner after the migration: %+v", o)
	}
	// The production QEMU quit.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(g.VMQMPSocket()); err != nil {
			break
		}
		if c, err := qemu.Dial(testCtx(t, time.Second), g.VMQMPSocket()); err != nil {
			break
		} else {
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatal("the production QEMU still answers after the migration")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The commit policy commits a real failover nobody decided on by its
// CommitBy, and nothing else: not a test, not one still within its time, not
// one that never commits itself. (Run records only: no VM is needed.)
func TestCommitPolicy(t *testing.T) {
	m := &failover.Manager{Dir: t.TempDir(), Site: "dr"}
	now := time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC)
	runs := []failover.Run{
		{ID: "due", VM: "web1", CommitBy: now.Add(-time.Second)},
		{ID: "later", VM: "db1", CommitBy: now.Add(time.Minute)},
		{ID: "never", VM: "app1"},
		{ID: "test", VM: "app2", Test: true, CommitBy: now.Add(-time.Hour)},
	}
	for _, r := range runs {
		recordRun(t, m, r)
	}
	done, err := m.CommitDue(now)
	if err != nil || len(done) != 1 || done[0].ID != "due" {
		t.Fatalf("CommitDue committed %v (%v), want run due only", done, err)
	}
	got, err := m.Runs("")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range got {
		if r.Committed != (r.ID == "due") {
			t.Errorf("run %s committed %v", r.ID, r.Committed)
		}
	}
	// An hour later, the site restarted meanwhile: what is left of a run's
	// time is what its CommitBy says.
	m = &failover.Manager{Dir: m.Dir, Site: "dr"}
	if again, err := m.CommitDue(now.Add(time.Hour)); err != nil || len(again) != 1 || again[0].ID != "later" {
		t.Errorf("an hour later CommitDue committed %v (%v), want run later only", again, err)
	}
}

// The recovery site's wall clock steps forward (an NTP step after the
// host's boot, `date -s`) while a failover waits for its decision: it still
// commits itself commit_after after it was seen undecided, not at once. Its
// time is measured by the monotonic clock, which no step moves; the steps
// are the times the daemon's ticker hands CommitDue. Before, the first tick
// after the step committed it, and it could no longer be undone.
func TestCommitPolicyAcrossAClockStep(t *testing.T) {
	m := &failover.Manager{Dir: t.TempDir(), Site: "dr"}
	now := time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC)
	recordRun(t, m, failover.Run{ID: "fo", VM: "web1", Started: now, CommitBy: now.Add(time.Hour)})
	// First seen at 06:00, then stepped to 08:00, then back to 07:00.
	for _, tick := range []time.Time{now, now.Add(2 * time.Hour), now.Add(time.Hour)} {
		if done, err := m.CommitDue(tick); err != nil || len(done) != 0 {
			t.Fatalf("CommitDue at %s (an hour left when first seen, moments ago) committed %v (%v), want nothing", tick.Format(time.TimeOnly), done, err)
		}
	}
	// A run first seen with no time left commits at once (a test cannot
	// wait for the hour of the first).
	recordRun(t, m, failover.Run{ID: "fo2", VM: "db1", Started: now, CommitBy: now})
	if done, err := m.CommitDue(now.Add(time.Hour)); err != nil || len(done) != 1 || done[0].ID != "fo2" {
		t.Errorf("CommitDue committed %v (%v), want run fo2 only, with no time left when first seen", done, err)
	}
}

// recordRun writes r as m's run record, as a failover's start leaves it
// (no VM is needed).
func recordRun(t *testing.T, m *failover.Manager, r failover.Run) {
	t.Helper()
	r.Dir = filepath.Join(m.Dir, r.ID)
	if err := os.Mkdir(r.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(r)
	if err := os.WriteFile(filepath.Join(r.Dir, "run.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// checkFailbackGenerations: each overlay of run r carries, recording, a
// generation of its disk's lineage in point pt for the site that owned the
// VM: what a failback to that site takes as its base.
func checkFailbackGenerations(ctx context.Context, t *testing.T, r *failover.Run, pt lifeboat.Point) {
	t.Helper()
	mon, err := qemu.Dial(ctx, r.QMP)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	nodes, err := mon.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	recording := map[string]bool{}
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			recording[b.Name] = b.Recording && !b.Inconsistent
		}
	}
	if r.Previous == nil || r.Previous.Site == "" {
		t.Fatalf("run %s names no previous owner", r.ID)
	}
	for _, d := range pt.Disks {
		g := r.Generations[d.Name]
		prefix := fmt.Sprintf("%s%s.%d.", lifeboat.GenerationPrefix, d.Lineage, pt.ID)
		if !strings.HasPrefix(g, prefix) || !strings.HasSuffix(g, "@"+r.Previous.Site) {
			t.Errorf("disk %s: the run's generation %q, want %s<nonce>@%s", d.Name, g, prefix, r.Previous.Site)
		}
		if !recording[g] {
			t.Errorf("disk %s: generation %q is not a recording bitmap of the recovered VM (its bitmaps: %v)", d.Name, g, recording)
		}
	}
}

// A point whose image was cut short since it was written (a failing disk, an
// operator's truncate) reads its lost clusters as zeros: QEMU pads reads past
// a file's end without a word. A failover from it is refused, naming the
// disk, the file and --accept-damage; the runs and pins are as before. With
// AcceptDamage it starts all the same (a last resort).
func TestFailoverRefusesATruncatedPoint(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, "tr")
	pt, err := site.Store.Point("tr", 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(pt.Disks[0].File)
	if err != nil {
		t.Fatal(err)
	}
	cut := st.Size() / 2 &^ (64<<10 - 1)
	if err := os.Truncate(pt.Disks[0].File, cut); err != nil {
		t.Fatal(err)
	}
	m := manager(t, site)
	ctx := testCtx(t, 2*time.Minute)
	r, err := m.Start(ctx, "tr", failover.Options{Test: true})
	if err == nil {
		m.Stop(context.Background(), r)
		t.Fatalf("a test failover started from point %d, whose image lost its last %d of %d bytes", pt.ID, st.Size()-cut, st.Size())
	}
	if !errors.Is(err, qemu.ErrTruncated) || !strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), "--accept-damage") {
		t.Errorf("refused with %v; want ErrTruncated naming disk vda and --accept-damage", err)
	}
	if runs, _ := m.Runs("tr"); len(runs) != 0 {
		t.Errorf("runs after the refusal: %v", runs)
	}
	if pins, _ := site.Store.Pins("tr"); len(pins) != 0 {
		t.Errorf("pins after the refusal: %v", pins)
	}
	r, err = m.Start(ctx, "tr", failover.Options{Test: true, AcceptDamage: true})
	if err != nil {
		t.Fatalf("with AcceptDamage: %v", err)
	}
	if err := m.Stop(context.Background(), r); err != nil {
		t.Fatal(err)
	}
}

// A point a verify found damaged (a byte changed in a data cluster of its
// image) is refused like a cut one, naming the disk and --accept-damage:
// before, only a cut image was, and a test or real failover started from a
// point verify had just called damaged.
func TestFailoverRefusesAPointVerifyFoundDamaged(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, "dm")
	pt, err := site.Store.Point("dm", 0)
	if err != nil {
		t.Fatal(err)
	}
	img := pt.Disks[0].File
	out, err := exec.Command("qemu-img", "map", "--output=json", "-U", img).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var extents []struct {
		Data, Zero bool
		Depth      int
		Offset     *int64
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatal(err)
	}
	host := int64(-1)
	for _, e := range extents {
		if e.Depth == 0 && e.Data && !e.Zero && e.Offset != nil {
			host = *e.Offset
			break
		}
	}
	if host < 0 {
		t.Fatalf("no data cluster in %s: %s", img, out)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, host+100); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{^b[0]}, host+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ctx := testCtx(t, 2*time.Minute)
	if _, err := site.Store.Verify(ctx, "dm", pt.ID, nil); err == nil {
		t.Fatal("verify passed a point with a changed byte")
	}
	m := manager(t, site)
	r, err := m.Start(ctx, "dm", failover.Options{Test: true})
	if err == nil {
		m.Stop(context.Background(), r)
		t.Fatalf("a test failover started from point %d, which verify found damaged", pt.ID)
	}
	if !errors.Is(err, recovery.ErrDamaged) || !strings.Contains(err.Error(), `disk "vda"`) || !strings.Contains(err.Error(), "--accept-damage") {
		t.Errorf("refused with %v; want ErrDamaged naming disk vda and --accept-damage", err)
	}
	if pins, _ := site.Store.Pins("dm"); len(pins) != 0 {
		t.Errorf("pins after the refusal: %v", pins)
	}
	r, err = m.Start(ctx, "dm", failover.Options{Test: true, AcceptDamage: true})
	if err != nil {
		t.Fatalf("with AcceptDamage: %v", err)
	}
	if err := m.Stop(context.Background(), r); err != nil {
		t.Fatal(err)
	}
}

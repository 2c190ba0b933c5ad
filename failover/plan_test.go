package failover_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// replicateDataDisk gives site one point of vm: a fresh ext4 data disk of
// the test guest, served by a storage daemon (no guest runs at production),
// its definition from the config: the test guest's kernel, no workload.
func replicateDataDisk(t *testing.T, site *testsite.Site, vm string) {
	t.Helper()
	if _, err := dataDiskProtector(t, site, vm).Cycle(testCtx(t, time.Minute)); err != nil {
		t.Fatal(err)
	}
}

// dataDiskProtector is replicateDataDisk's protector of vm, before any cycle.
func dataDiskProtector(t *testing.T, site *testsite.Site, vm string) *protect.Protector {
	t.Helper()
	dir := testsite.ShortDir(t)
	image := filepath.Join(dir, "vda.qcow2")
	testguest.MakeDisk(t, image, 64<<20, "qcow2")
	ctx := testCtx(t, time.Minute)
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, Args: qemu.DiskArgs("vda", image, "qcow2"), NBD: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Stop(context.Background()) })
	kernel, initrd := testguest.Build(t)
	p := &protect.Protector{
		VM: protect.VM{Name: vm, QMPSocket: d.ClientQMPSocket(), NBDSocket: d.NBDSocket(), Disks: []string{"vda"}, WorkDir: testsite.ShortDir(t),
			Definition: lifeboat.Definition{Source: "config", Machine: "q35", CPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: initrd,
				Append: "console=ttyS0 panic=-1 lb.workload=none", Disks: []lifeboat.DefinitionDisk{{Name: "vda", Device: "virtio-blk-pci"}}}},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	return p
}

// A plan of three VMs in two steps, each waiting for its agents: the second
// step's VMs start only once the first's agent answers (timestamps in the
// summary), the hooks run per VM with its name and run in the environment,
// and `StopPlan` ends every test the plan started.
func TestPlanStartsInOrder(t *testing.T) {
	if testing.Short() {
		t.Skip("boots guests under TCG: covered by the full (non -short) run")
	}
	site := testsite.Start(t, recovery.Options{Keep: 10})
	for _, vm := range []string{"db1", "app1", "app2"} {
		replicateDataDisk(t, site, vm)
	}
	m := manager(t, site)
	hookOut := filepath.Join(t.TempDir(), "hooks")
	hook := filepath.Join(t.TempDir(), "reip")
	os.WriteFile(hook, []byte("#!/bin/sh\necho \"$LIFEBOAT_VM $LIFEBOAT_TEST $LIFEBOAT_PLAN $LIFEBOAT_RUN\" >> "+hookOut+"\n"), 0o755)
	plan := failover.Plan{Name: "web-tier", Hooks: []string{hook}, Steps: []failover.Step{
		{VMs: []string{"db1"}, WaitAgent: true, Timeout: 3 * time.Minute},
		{VMs: []string{"app1", "app2"}, WaitAgent: true, Timeout: 3 * time.Minute},
	}}
	var events []failover.PlanEvent
	rows, err := m.RunPlan(testCtx(t, 8*time.Minute), plan, failover.PlanOptions{Test: true}, func(e failover.PlanEvent) { events = append(events, e) })
	for _, e := range events {
		t.Logf("%s step %d %s %s", e.At.Format("15:04:05.000"), e.Step, e.VM, e.What)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 3 || rows[0].VM != "db1" || rows[0].Step != 1 || rows[1].Step != 2 || rows[2].Step != 2 {
		t.Fatalf("summary %+v", rows)
	}
	for _, r := range rows {
		t.Logf("%s: step %d, point %d (%v old), QEMU running after %v, agent after %v", r.VM, r.Step, r.Point, r.PointAge, r.ToRunning, r.ToAgent)
		if r.Error != "" || r.ToRunning <= 0 || r.ToAgent < r.ToRunning || r.Agent.IsZero() {
			t.Errorf("%s: %+v", r.VM, r)
		}
	}
	for _, r := range rows[1:] {
		if r.Started.Before(rows[0].Agent) {
			t.Errorf("%s started at %s, before db1's agent answered at %s", r.VM, r.Started.Format(time.StampMilli), rows[0].Agent.Format(time.StampMilli))
		}
	}
	b, _ := os.ReadFile(hookOut)
	for _, r := range rows {
		if !strings.Contains(string(b), r.VM+" 1 web-tier "+r.Run) {
			t.Errorf("the hook did not run for %s with its environment:\n%s", r.VM, b)
		}
	}
	n, err := m.StopPlan(testCtx(t, time.Minute), "web-tier")
	if err != nil || n != 3 {
		t.Fatalf("StopPlan: %d %v, want 3 stopped", n, err)
	}
	if runs, _ := m.Runs(""); len(runs) != 0 {
		t.Errorf("runs after StopPlan: %v", runs)
	}
}

// A real failover while the production site is in contact is refused (it
// would run the VM at two sites), says what to do, and changes nothing; a
// test is not refused.
func TestFailoverRefusedWhileProductionInContact(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, "db1")
	m := manager(t, site)
	m.LastContact = site.Server.LastContact
	_, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{})
	if !errors.Is(err, failover.ErrSplitBrain) || !strings.Contains(err.Error(), "--planned") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("failover while production is in contact: %v, want it refused with what to do", err)
	}
	if o, _, _ := site.Store.Owner("db1"); o.Site != "prod" || o.Epoch != 1 {
		t.Errorf("owner after the refused failover: %+v", o)
	}
	if pins, _ := site.Store.Pins("db1"); len(pins) != 0 {
		t.Errorf("pins after the refused failover: %v", pins)
	}
	r, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{Test: true})
	if err != nil {
		t.Fatalf("a test failover while production is in contact: %v", err)
	}
	if err := m.Stop(testCtx(t, time.Minute), r); err != nil {
		t.Fatal(err)
	}

	// Three forced failovers at once (three commands): one VM starts.
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		started []*failover.Run
		refused []error
	)
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := m.Start(testCtx(t, time.Minute), "db1", failover.Options{Force: true})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				refused = append(refused, err)
			} else {
				started = append(started, r)
			}
		}()
	}
	wg.Wait()
	for _, r := range started {
		defer m.Stop(context.Background(), r)
	}
	if len(started) != 1 || len(refused) != 2 {
		t.Fatalf("three failovers at once: %d started, refused: %v; want one started", len(started), refused)
	}
	for _, err := range refused {
		if !strings.Contains(err.Error(), "starting here now") && !strings.Contains(err.Error(), "already runs here") {
			t.Errorf("a concurrent failover refused with %v, want it told another runs or starts", err)
		}
	}
	if o, _, _ := site.Store.Owner("db1"); o.Site != "dr" || o.Epoch != 2 {
		t.Errorf("owner after one failover of three: %+v, want dr at epoch 2", o)
	}
}

// A plan whose later step's VM has no point at or before --point TIME
// starts nothing: before, the first step's VMs were started (a real plan
// failed them over) and the plan then failed at the step with no point.
func TestPlanWithoutAPointBeforeStartsNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU: covered by the full (non -short) run")
	}
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, "db1")
	before := time.Now()
	replicateDataDisk(t, site, "app1") // its only point is after before
	m := manager(t, site)
	plan := failover.Plan{Name: "web-tier", Steps: []failover.Step{{VMs: []string{"db1"}}, {VMs: []string{"app1"}}}}
	rows, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{Test: true, Before: before}, nil)
	runs, _ := m.Runs("")
	for _, r := range runs {
		m.Stop(context.Background(), r)
	}
	if err == nil || !strings.Contains(err.Error(), `"app1"`) || !strings.Contains(err.Error(), "nothing started") {
		t.Errorf("plan with app1 having no point before %s: %v, want it refused naming app1", before.Format(time.RFC3339Nano), err)
	}
	if len(runs) != 0 || len(rows) != 0 {
		t.Errorf("runs after the refused plan: %v (summary %+v), want none", runs, rows)
	}
	for _, vm := range []string{"db1", "app1"} {
		if pins, _ := site.Store.Pins(vm); len(pins) != 0 {
			t.Errorf("vm %s: pins after the refused plan: %v", vm, pins)
		}
	}
}

// The VMs of a consistency group start from one group instant: db1's own
// cycle after the group point (`lifeboat sync db1`) made its latest point
// newer than app1's, and the plan started each from its latest.
func TestPlanStartsAGroupFromOneInstant(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU: covered by the full (non -short) run")
	}
	site, g, tag := tierGroup(t, 10)
	if _, err := g.Members[0].Cycle(testCtx(t, time.Minute)); err != nil {
		t.Fatal(err)
	}
	m := runTierPlan(t, site, tag)
	if n, err := m.StopPlan(testCtx(t, time.Minute), "web-tier"); err != nil || n != 2 {
		t.Errorf("StopPlan: %d %v", n, err)
	}
	for _, vm := range []string{"db1", "app1"} {
		if pins, _ := site.Store.Pins(vm); len(pins) != 0 {
			t.Errorf("vm %s: pins after the plan: %v", vm, pins)
		}
	}
}

// `plan stop` during a drill ends the drill before its runs: before, the
// stop ended the runs there were, and the drill went on to start the next
// step's VMs after it, which ran on. A second run of the plan while one
// runs is refused: before, it started a second copy of every VM.
func TestPlanStopDuringADrill(t *testing.T) {
	m := twoVMPlanSite(t)
	plan := failover.Plan{Name: "web-tier", Steps: []failover.Step{{VMs: []string{"db1"}, Delay: 5 * time.Second}, {VMs: []string{"app1"}}}}
	// drill starts the plan's drill and returns once its first step waits.
	drill := func() <-chan error {
		running := make(chan struct{})
		var once sync.Once
		done := make(chan error, 1)
		go func() {
			_, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{Test: true}, func(e failover.PlanEvent) {
				if strings.HasPrefix(e.What, "waiting") {
					once.Do(func() { close(running) })
				}
			})
			done <- err
		}()
		select {
		case <-running:
		case err := <-done:
			t.Fatalf("the drill ended before its first step's wait: %v", err)
		}
		return done
	}
	done := drill()
	n, err := m.StopPlan(testCtx(t, time.Minute), "web-tier")
	if err != nil {
		t.Fatal(err)
	}
	err = <-done
	if err == nil || !strings.Contains(err.Error(), "plan stop") {
		t.Errorf("the stopped drill ended with %v, want it told it was stopped", err)
	}
	if runs, _ := m.Runs(""); n != 1 || len(runs) != 0 {
		t.Errorf("StopPlan stopped %d run(s); runs once the drill ended: %d, want none", n, len(runs))
		for _, r := range runs {
			t.Logf("left running: %s", r.ID)
		}
	}

	done = drill()
	rows, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{Test: true}, nil)
	if err == nil || !strings.Contains(err.Error(), "running here now") {
		t.Errorf("a second run of the plan while a drill runs: %v (summary %+v), want it refused", err, rows)
	}
	if _, err := m.StopPlan(testCtx(t, time.Minute), "web-tier"); err != nil {
		t.Fatal(err)
	}
	<-done
}

// A real plan after the operator failed one of its VMs over by hand (the
// database first, as a runbook may say): that VM counts as started, with its
// run and point, and the plan goes on with the later steps. Before, the
// plan failed at that step ("already runs here") and started nothing after.
func TestPlanCountsAVMFailedOverByHand(t *testing.T) {
	m := twoVMPlanSite(t)
	byHand, err := m.Start(testCtx(t, 2*time.Minute), "db1", failover.Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan := failover.Plan{Name: "web-tier", Steps: []failover.Step{{VMs: []string{"db1"}}, {VMs: []string{"app1"}}}}
	var events []string
	rows, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{}, func(e failover.PlanEvent) { events = append(events, e.VM+": "+e.What) })
	if err != nil {
		t.Fatalf("plan with db1 failed over by hand: %v\nevents: %q", err, events)
	}
	if len(rows) != 2 || !rows[0].Already || rows[0].Run != byHand.ID || rows[0].Point != byHand.Point || rows[1].VM != "app1" || rows[1].Already || rows[1].Run == "" {
		t.Fatalf("summary %+v; want db1 counted as started by its run %s, app1 started by the plan", rows, byHand.ID)
	}
	if !slices.ContainsFunc(events, func(e string) bool { return strings.Contains(e, "already failed over here") }) {
		t.Errorf("no event says db1 was already failed over: %q", events)
	}
	if runs, _ := m.Runs("db1"); len(runs) != 1 {
		t.Errorf("db1 has %d runs after the plan, want its one by hand", len(runs))
	}
}

// twoVMPlanSite is a recovery site holding one point of db1 and of app1, and
// its manager, whose runs end with the test.
func twoVMPlanSite(t *testing.T) *failover.Manager {
	t.Helper()
	if testing.Short() {
		t.Skip("starts QEMU: covered by the full (non -short) run")
	}
	site := testsite.Start(t, recovery.Options{Keep: 10})
	replicateDataDisk(t, site, "db1")
	replicateDataDisk(t, site, "app1")
	m := manager(t, site)
	t.Cleanup(func() {
		runs, _ := m.Runs("")
		for _, r := range runs {
			m.Stop(context.Background(), r)
		}
	})
	return m
}

// A group cycle that the recovery site accepts for one member and refuses
// for the other (here: app1 handed over to another site mid-cycle) leaves
// db1 ahead; db1's retention (keep 2) then must not merge away the last
// instant it shares with app1. Before, it did: the two held no common group
// point, and the plan of the group started nothing.
func TestPlanStartsAGroupAfterRetentionOfPartialGroupPoints(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU: covered by the full (non -short) run")
	}
	site, g, first := tierGroup(t, 2)
	owner, _, err := site.Store.Owner("app1")
	if err != nil {
		t.Fatal(err)
	}
	// The recovery site refuses app1's point once db1's is under way: app1
	// is handed over to another site between its plan and its Begin, and
	// back before the next cycle.
	g.Members[1].Hooks.AfterPlan = func(context.Context) error {
		_, err := site.Store.Handover("app1", "elsewhere")
		return err
	}
	for range 3 {
		if _, err := site.Store.Handover("app1", owner.Site); err != nil {
			t.Fatal(err)
		}
		pts, err := g.Cycle(testCtx(t, time.Minute))
		if err == nil || len(pts) != 1 || pts[0].VM != "db1" {
			t.Fatalf("group cycle with app1 refused: %v %v, want db1's point only and app1's refusal", pts, err)
		}
	}
	site.Store.SettleRetention()
	if _, err := site.Store.Handover("app1", owner.Site); err != nil {
		t.Fatal(err)
	}
	m := runTierPlan(t, site, first)
	// Retention merges the oldest point into the next: while the shared
	// instant is db1's oldest, db1 keeps every point, as under a pin.
	if pts, _ := site.Store.Points("db1"); len(pts) != 4 || pts[0].Group != first {
		t.Errorf("db1 holds %d points, want all 4, its oldest the group point it shares with app1", len(pts))
	}
	if _, err := m.StopPlan(testCtx(t, time.Minute), "web-tier"); err != nil {
		t.Fatal(err)
	}
	// Bounded: past twice keep points the hold is given up, so a member
	// refused for good does not fill the store. The group's VMs then hold
	// no instant in common: a plan starts nothing, saying what to do, and
	// --apart starts each from its own point, saying they are not
	// consistent with one another.
	if _, err := site.Store.Handover("app1", owner.Site); err != nil {
		t.Fatal(err)
	}
	if pts, err := g.Cycle(testCtx(t, time.Minute)); err == nil || len(pts) != 1 {
		t.Fatalf("group cycle with app1 refused: %v %v", pts, err)
	}
	site.Store.SettleRetention()
	if pts, _ := site.Store.Points("db1"); len(pts) != 2 || pts[0].Group == first {
		t.Fatalf("db1 past twice keep: %d points (oldest %q), want 2: the hold bounded", len(pts), pts[0].Group)
	}
	if _, err := site.Store.Handover("app1", owner.Site); err != nil {
		t.Fatal(err)
	}
	plan := failover.Plan{Name: "web-tier", Steps: []failover.Step{{VMs: []string{"db1", "app1"}}}}
	if _, err := m.RunPlan(testCtx(t, time.Minute), plan, failover.PlanOptions{Test: true}, nil); err == nil || !strings.Contains(err.Error(), "--apart") {
		t.Fatalf("plan of a group with no common instant: %v; want nothing started, naming --apart", err)
	}
	var events []string
	rows, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{Test: true, Apart: true}, func(e failover.PlanEvent) { events = append(events, e.What) })
	if err != nil || len(rows) != 2 {
		t.Fatalf("plan --apart: %v %+v", err, rows)
	}
	if !slices.ContainsFunc(events, func(e string) bool { return strings.Contains(e, "NOT consistent") }) {
		t.Errorf("plan --apart does not say its VMs are not consistent with one another: %q", events)
	}
}

// tierGroup replicates db1 and app1 as consistency group "tier" to a new site
// that keeps keep points: one group point, whose tag it returns.
func tierGroup(t *testing.T, keep int) (*testsite.Site, *protect.Group, string) {
	t.Helper()
	site := testsite.Start(t, recovery.Options{Keep: keep})
	g := &protect.Group{Name: "tier", Members: []*protect.Protector{dataDiskProtector(t, site, "db1"), dataDiskProtector(t, site, "app1")}}
	pts, err := g.Cycle(testCtx(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	return site, g, pts[0].Group
}

// runTierPlan runs a drill of db1 and app1 (plan "web-tier", ended at the
// test's end) and checks that both started from the group point tag.
func runTierPlan(t *testing.T, site *testsite.Site, tag string) *failover.Manager {
	t.Helper()
	m := manager(t, site)
	plan := failover.Plan{Name: "web-tier", Steps: []failover.Step{{VMs: []string{"db1", "app1"}}}}
	rows, err := m.RunPlan(testCtx(t, 2*time.Minute), plan, failover.PlanOptions{Test: true}, nil)
	t.Cleanup(func() { m.StopPlan(context.Background(), "web-tier") })
	if err != nil {
		for _, vm := range []string{"db1", "app1"} {
			pts, _ := site.Store.Points(vm)
			for _, pt := range pts {
				t.Logf("%s point %d group %q", vm, pt.ID, pt.Group)
			}
		}
		t.Fatal(err)
	}
	for _, r := range rows {
		pt, err := site.Store.Point(r.VM, r.Point)
		if err != nil {
			t.Fatal(err)
		}
		if pt.Group != tag {
			t.Errorf("%s started from point %d (group %q), want the group point %q", r.VM, r.Point, pt.Group, tag)
		}
	}
	return m
}

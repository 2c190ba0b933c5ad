package protect_test

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// hangStall is the protectors' StallLimit in the hang tests, and
// hangFailWithin how long a cycle whose QEMU hangs may take to fail: the
// stall, plus margin for a loaded machine (before, the cycle waited for as
// long as its context: 5 minutes here, 6 hours in the daemon).
const (
	hangStall      = 2 * time.Second
	hangFailWithin = 15 * time.Second
)

// hangVM is a stand-in VM (a qemu-storage-daemon, one qcow2 disk) that a
// test can stop (SIGSTOP: its QMP and NBD stop answering, as a hung QEMU's
// do) and resume, its protector and its writer.
type hangVM struct {
	name  string
	vm    *testvm.VM
	p     *protect.Protector
	guest *workload.Guest
}

const hangDisk = 16 << 20

func startHangVM(t *testing.T, site *testsite.Site, name string, seed uint64) *hangVM {
	t.Helper()
	v := &hangVM{name: name, vm: testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: hangDisk})}
	v.p = &protect.Protector{
		VM:     protect.VM{Name: name, QMPSocket: v.vm.QMPSocket(), NBDSocket: v.vm.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4, ChunkSize: 1 << 20, StallLimit: hangStall,
	}
	g, err := workload.Open(ctx(t), v.vm.NBDSocket(), seed, workload.Disk{Name: "vda", Size: hangDisk})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	v.guest = g
	t.Cleanup(func() { v.signal(t, syscall.SIGCONT) }) // before the daemon stops
	return v
}

func (v *hangVM) signal(t *testing.T, sig syscall.Signal) {
	if err := syscall.Kill(v.vm.Daemon.Pid(), sig); err != nil {
		t.Errorf("%s: %v", v.name, err)
	}
}

// tapAt makes the VM's protector reach QEMU through a QMP tap that runs
// stop once, as the first command containing every one of marks is sent
// (before QEMU reads it); it returns what undoes it.
func (v *hangVM) tapAt(t *testing.T, stop func(), marks ...string) func() {
	qmp := v.p.VM.QMPSocket
	var once sync.Once
	v.p.VM.QMPSocket = testvm.TapQMPSocket(t, filepath.Join(testsite.ShortDir(t), "qmp.sock"), qmp, func(line []byte) {
		for _, m := range marks {
			if !bytes.Contains(line, []byte(m)) {
				return
			}
		}
		once.Do(stop)
	})
	return func() { v.p.VM.QMPSocket = qmp }
}

// failsWhileHung runs cycle (bounded by 5 minutes, more than any wait of
// the test) and returns its error; a cycle that has not returned within
// hangFailWithin fails the test, and is waited for once v is resumed.
func failsWhileHung(t *testing.T, v *hangVM, cycle func(context.Context) error) error {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		done <- cycle(c)
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(hangFailWithin):
		t.Errorf("the cycle still ran %v after it began, vm %q's QEMU stopped: it waits for the hung QEMU (a group's healthy members with it)", hangFailWithin, v.name)
		v.signal(t, syscall.SIGCONT)
		err = <-done
	}
	t.Logf("the cycle returned after %v: %v", time.Since(start).Round(time.Millisecond), err)
	return err
}

// refusedWhileHung checks that a cycle of a VM whose QEMU still does not
// answer, lifeboat waiting for it to clean up, says so rather than that a
// cycle runs.
func refusedWhileHung(t *testing.T, p *protect.Protector) {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), hangFailWithin)
	defer cancel()
	_, err := p.Cycle(c)
	if err == nil || !strings.Contains(err.Error(), "did not answer") || !strings.Contains(err.Error(), "since") {
		t.Errorf("a cycle of vm %q while its QEMU is still stopped: %v; want it refused saying its QEMU did not answer, since when", p.VM.Name, err)
	}
}

// cycleOnceFree runs cycle until it is not refused for a cleanup still
// under way (a hung QEMU's, just resumed), for at most 15 s.
func cycleOnceFree[T any](t *testing.T, cycle func() (T, error)) T {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		r, err := cycle()
		if err == nil {
			return r
		}
		if !strings.Contains(err.Error(), "did not answer") || time.Now().After(deadline) {
			t.Fatalf("the cycle after the hung QEMU answered again: %v", err)
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// hashesOf is each VM's disks' hashes, by VM.
func hashesOf(t *testing.T, vms ...*hangVM) map[string]map[string]string {
	t.Helper()
	want := map[string]map[string]string{}
	for _, v := range vms {
		h, err := v.guest.Hashes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		want[v.name] = h
	}
	return want
}

// checkIncremental checks that pt is an incremental point of the disk as
// want had it.
func checkIncremental(t *testing.T, site *testsite.Site, pt lifeboat.Point, want map[string]string) {
	t.Helper()
	if got := site.PointHash(t, pt.VM, pt.ID, "vda"); got != want["vda"] {
		t.Errorf("vm %s point %d is not its disk", pt.VM, pt.ID)
	}
	if pt.Disks[0].Resync {
		t.Errorf("vm %s point %d resent its disk whole", pt.VM, pt.ID)
	}
}

// A consistency group whose member "db" hangs (SIGSTOP of its QEMU: QMP
// and NBD stop answering) outside the group's instant: while its cycle
// connects, prepares its disks, prepares its fleece, and while its point
// is sent (db sent first, so web's fleece waits in web's write path). Each
// time the group's cycle fails within the stall bound while db is still
// stopped, naming db and the phase; nothing is committed; web's QEMU holds
// nothing of lifeboat's at once; a cycle of db meanwhile is refused saying
// its QEMU did not answer; after SIGCONT db's QEMU holds nothing of
// lifeboat's within 10 s, and the next group cycle is incremental and
// byte-exact for both.
func TestGroupMemberHangsOutsideTheInstant(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 100})
	web, db := startHangVM(t, site, "web", 1), startHangVM(t, site, "db", 2)
	for _, v := range []*hangVM{web, db} {
		if err := v.guest.Fill(ctx(t), 0.5); err != nil {
			t.Fatal(err)
		}
	}
	webFirst := &protect.Group{Name: "tier", Members: []*protect.Protector{web.p, db.p}}
	dbFirst := &protect.Group{Name: "tier", Members: []*protect.Protector{db.p, web.p}}
	groupCycle(t, webFirst) // the initial sync

	cases := []struct {
		name  string
		group *protect.Group
		phase string // in the error
		// wire makes stop run at the moment; it returns what undoes it.
		wire func(t *testing.T, stop func()) func()
		// hungStep: a step on db's QEMU is left waiting (db's next cycle
		// is refused until it answers).
		hungStep bool
	}{
		{"connecting", webFirst, "QMP", func(t *testing.T, stop func()) func() {
			stop()
			return func() {}
		}, false},
		{"preparing its disks", webFirst, "prepar", func(t *testing.T, stop func()) func() {
			return db.tapAt(t, stop, `"execute":"query-block"`)
		}, true},
		{"preparing its fleece", webFirst, "prepar", func(t *testing.T, stop func()) func() {
			return db.tapAt(t, stop, `"execute":"blockdev-add"`)
		}, true},
		{"sending", dbFirst, "sen", func(t *testing.T, stop func()) func() {
			db.p.Hooks.AfterPlan = func(context.Context) error { stop(); return nil }
			return func() { db.p.Hooks.AfterPlan = nil }
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, v := range []*hangVM{web, db} {
				if _, err := v.guest.Mixed(ctx(t), 10); err != nil {
					t.Fatal(err)
				}
			}
			before := pointCount(t, site, "web", "db")
			var stopped atomic.Bool // set where the moment is: the cycle's goroutine, or the QMP tap's
			undo := tc.wire(t, func() { db.signal(t, syscall.SIGSTOP); stopped.Store(true) })
			err := failsWhileHung(t, db, func(c context.Context) error {
				_, err := tc.group.Cycle(c)
				return err
			})
			undo()
			if !stopped.Load() {
				t.Fatal("db was never stopped: the moment was not reached")
			}
			if err == nil || !strings.Contains(err.Error(), `vm "db"`) || !strings.Contains(err.Error(), tc.phase) {
				t.Errorf("group cycle with db hung: error %v; want one naming vm \"db\" and the phase (%q)", err, tc.phase)
			}
			if got := pointCount(t, site, "web", "db"); got != before {
				t.Errorf("a failed group cycle committed points: %d before, %d after", before, got)
			}
			testvm.AssertNoLeftovers(t, web.vm.Monitor())
			if tc.hungStep {
				refusedWhileHung(t, db.p)
			}

			db.signal(t, syscall.SIGCONT)
			if left := waitNoLeftovers(t, db.vm.Monitor(), 10*time.Second); len(left) > 0 {
				t.Errorf("10 s after SIGCONT db's QEMU still holds %v", left)
			}
			want := hashesOf(t, web, db)
			pts := cycleOnceFree(t, func() ([]lifeboat.Point, error) { return webFirst.Cycle(ctx(t)) })
			if len(pts) != 2 || pts[0].Group == "" || pts[0].Group != pts[1].Group {
				t.Fatalf("the group cycle after: points %+v; want one of each member at one group instant", pts)
			}
			for _, pt := range pts {
				checkIncremental(t, site, pt, want[pt.VM])
			}
		})
	}
}

// A VM's own cycle whose QEMU hangs (SIGSTOP) while the cycle prepares,
// with its fleece transaction in flight, while its point is sent, and
// while its fleece is taken down once every block is read: the cycle fails
// within the stall bound (twice it in the last case) naming the phase,
// commits nothing (but in the last case, where every block was read),
// and a cycle meanwhile is refused saying the QEMU did not answer; after
// SIGCONT, and with no other cycle run, the QEMU holds nothing of
// lifeboat's within 10 s (no copy-before-write left in its write path),
// and the next cycle is incremental and byte-exact.
func TestCycleWhoseQEMUHangs(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 100})
	v := startHangVM(t, site, "vm1", 3)
	if err := v.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	if _, err := v.p.Cycle(ctx(t)); err != nil { // the initial sync
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		phase string
		wire  func(t *testing.T, stop func()) func()
		// commits: every block was read before the hang, and the point is
		// committed (the cycle still fails: its fleece is not down yet).
		commits bool
	}{
		{"preparing", "prepar", func(t *testing.T, stop func()) func() {
			return v.tapAt(t, stop, `"execute":"query-block"`)
		}, false},
		{"in the transaction", "transaction", func(t *testing.T, stop func()) func() {
			return v.tapAt(t, stop, `"transaction"`, `"blockdev-backup"`)
		}, false},
		{"sending", "sen", func(t *testing.T, stop func()) func() {
			v.p.Hooks.AfterPlan = func(context.Context) error { stop(); return nil }
			return func() { v.p.Hooks.AfterPlan = nil }
		}, false},
		{"taking its fleece down", "taken down", func(t *testing.T, stop func()) func() {
			return v.tapAt(t, stop, `"execute":"block-export-del"`)
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := v.guest.Mixed(ctx(t), 10); err != nil {
				t.Fatal(err)
			}
			before := pointCount(t, site, "vm1")
			var stopped atomic.Bool // set where the moment is: the cycle's goroutine, or the QMP tap's
			undo := tc.wire(t, func() { v.signal(t, syscall.SIGSTOP); stopped.Store(true) })
			err := failsWhileHung(t, v, func(c context.Context) error {
				_, err := v.p.Cycle(c)
				return err
			})
			undo()
			if !stopped.Load() {
				t.Fatal("the VM was never stopped: the moment was not reached")
			}
			if err == nil || !strings.Contains(err.Error(), "did not answer") || !strings.Contains(err.Error(), tc.phase) {
				t.Errorf("cycle with its QEMU hung: error %v; want one saying its QEMU did not answer, and the phase (%q)", err, tc.phase)
			}
			if got, want := pointCount(t, site, "vm1"), before+btoi(tc.commits); got != want {
				t.Errorf("the cycle with its QEMU hung: %d points before, %d after; want %d", before, got, want)
			}
			refusedWhileHung(t, v.p)

			v.signal(t, syscall.SIGCONT)
			if left := waitNoLeftovers(t, v.vm.Monitor(), 10*time.Second); len(left) > 0 {
				t.Errorf("10 s after SIGCONT the VM's QEMU still holds %v", left)
			}
			want, err := v.guest.Hashes(ctx(t))
			if err != nil {
				t.Fatal(err)
			}
			pt := cycleOnceFree(t, func() (lifeboat.Point, error) { return v.p.Cycle(ctx(t)) })
			checkIncremental(t, site, pt, want)
		})
	}
}

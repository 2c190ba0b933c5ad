package protect_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Lifeboat beside another tool's backups (libvirt's pull and push backups, as
// virtnbdbackup drives them): it leaves no NBD server behind, never stops or
// uses another's, and never takes another's nodes for the VM's disks.

const (
	sysDisk     = "virtio-disk0" // the disk's device id, libvirt's way
	sysDiskNode = "libvirt-1-format"
	sysDiskSize = 8 << 20
)

// libvirtVM is a qemu-system as libvirt starts one: a qcow2 disk on device
// virtio-disk0 (node libvirt-1-format) and no NBD server (args are more of
// qemu-system's). model is the disk's content as the guest wrote it.
type libvirtVM struct {
	*testvm.System
	model []byte
	site  *testsite.Site
	log   *testenv.LogBuffer
	p     *protect.Protector
}

func startLibvirtVM(t *testing.T, site *testsite.Site, name string, args ...string) *libvirtVM {
	t.Helper()
	dir := testsite.ShortDir(t)
	image := filepath.Join(dir, "vda.qcow2")
	if err := qemu.CreateImage(ctx(t), image, "qcow2", sysDiskSize, "", ""); err != nil {
		t.Fatal(err)
	}
	v := &libvirtVM{
		System: testvm.StartSystem(t, dir, append([]string{
			"-blockdev", fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"file":{"driver":"file","filename":%q,"node-name":"libvirt-1-storage"}}`, sysDiskNode, image),
			"-device", "virtio-blk-pci,drive=" + sysDiskNode + ",id=" + sysDisk}, args...)...),
		model: make([]byte, sysDiskSize),
		site:  site,
		log:   &testenv.LogBuffer{},
	}
	v.p = &protect.Protector{
		VM:     protect.VM{Name: name, QMPSocket: v.QMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 2,
		Log: slog.New(slog.NewTextHandler(v.log, nil)),
	}
	v.write(t, 0x11, 0, 1<<20)
	return v
}

// write is a guest write of pattern over n bytes at off.
func (v *libvirtVM) write(t *testing.T, pattern byte, off, n int64) {
	t.Helper()
	if err := v.Write(ctx(t), sysDisk, pattern, off, n); err != nil {
		t.Fatal(err)
	}
	copy(v.model[off:off+n], bytes.Repeat([]byte{pattern}, int(n)))
}

// cycle runs a cycle that must succeed, protecting the disk alone, byte-exact.
func (v *libvirtVM) cycle(t *testing.T) lifeboat.Point {
	t.Helper()
	want := sha256.Sum256(v.model)
	pt, err := v.p.Cycle(ctx(t))
	if err != nil {
		t.Fatalf("cycle: %v\nlog:\n%s", err, v.log)
	}
	v.checkPoint(t, pt, hex.EncodeToString(want[:]))
	return pt
}

func (v *libvirtVM) checkPoint(t *testing.T, pt lifeboat.Point, want string) {
	t.Helper()
	if len(pt.Disks) != 1 || pt.Disks[0].Name != sysDisk {
		t.Fatalf("point %d disks %+v: want the VM's disk %s alone", pt.ID, pt.Disks, sysDisk)
	}
	r := &rig{site: v.site, disks: []workload.Disk{{Name: sysDisk, Size: sysDiskSize}}}
	r.checkPoint(t, pt.ID, map[string]string{sysDisk: want})
}

// assertNoNBDServer checks that the QEMU runs no NBD server, so that another
// tool can start one: what a libvirt pull backup does first.
func assertNoNBDServer(t *testing.T, m *qemu.Monitor, dir, after string) {
	t.Helper()
	if err := m.NBDServerStart(ctx(t), filepath.Join(dir, "other-tool.sock")); err != nil {
		t.Fatalf("after %s, another tool cannot start its NBD server: %v", after, err)
	}
	if err := m.NBDServerStop(ctx(t)); err != nil {
		t.Fatal(err)
	}
}

// Every cycle stops the NBD server it started, whatever its end: success,
// failure after the instant, cancellation, a failure before the fleece, and
// the same for a consistency group. Nothing is lost on the way.
func TestNBDServerStoppedAfterEveryCycle(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 20})
	v := startLibvirtVM(t, site, "vm1")
	m := v.Monitor()
	v.cycle(t)
	assertNoNBDServer(t, m, v.Dir, "an initial sync")
	v.write(t, 0x22, 2<<20, 64<<10)
	if pt := v.cycle(t); pt.Disks[0].Resync {
		t.Fatalf("point %d resynchronised the disk: want it incremental", pt.ID)
	}
	assertNoNBDServer(t, m, v.Dir, "an incremental cycle")

	errInjected := errors.New("injected")
	v.write(t, 0x33, 3<<20, 64<<10)
	v.p.Hooks.AfterInstant = func(context.Context) error { return errInjected }
	if _, err := v.p.Cycle(ctx(t)); !errors.Is(err, errInjected) {
		t.Fatalf("cycle with a failure after the instant: err = %v, want the injected one", err)
	}
	v.p.Hooks.AfterInstant = nil
	assertNoNBDServer(t, m, v.Dir, "a failed cycle")

	cctx, cancel := context.WithCancel(ctx(t))
	v.p.Hooks.AfterPlan = func(context.Context) error { cancel(); return nil }
	if _, err := v.p.Cycle(cctx); err == nil {
		t.Fatal("cancelled cycle succeeded")
	}
	v.p.Hooks.AfterPlan = nil
	assertNoNBDServer(t, m, v.Dir, "a cancelled cycle")

	v.p.VM.Disks = []string{"vdz"}
	if _, err := v.p.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), `"vdz"`) {
		t.Fatalf("cycle naming a missing disk: err = %v, want it to name vdz", err)
	}
	v.p.VM.Disks = nil
	assertNoNBDServer(t, m, v.Dir, "a cycle that failed before its fleece")

	if pt := v.cycle(t); pt.Disks[0].Resync {
		t.Fatalf("point %d after the failures resynchronised the disk: want it incremental", pt.ID)
	}
	assertNoNBDServer(t, m, v.Dir, "the cycle after the failures")

	t.Run("group", func(t *testing.T) {
		w := startLibvirtVM(t, site, "vm2")
		g := &protect.Group{Name: "tier", Members: []*protect.Protector{v.p, w.p}}
		if _, err := g.Cycle(ctx(t)); err != nil {
			t.Fatalf("group cycle: %v", err)
		}
		assertNoNBDServer(t, v.Monitor(), v.Dir, "a group cycle (first member)")
		assertNoNBDServer(t, w.Monitor(), w.Dir, "a group cycle (second member)")
		w.p.Hooks.AfterInstant = func(context.Context) error { return errInjected }
		if _, err := g.Cycle(ctx(t)); !errors.Is(err, errInjected) {
			t.Fatalf("group cycle with a member failing: err = %v, want the injected one", err)
		}
		w.p.Hooks.AfterInstant = nil
		assertNoNBDServer(t, v.Monitor(), v.Dir, "a failed group cycle (first member)")
		assertNoNBDServer(t, w.Monitor(), w.Dir, "a failed group cycle (second member)")
		// A member failing before the fleece of the others is prepared.
		w.p.VM.Disks = []string{"vdz"}
		if _, err := g.Cycle(ctx(t)); err == nil {
			t.Fatal("group cycle with a member naming a missing disk succeeded")
		}
		w.p.VM.Disks = nil
		for _, x := range []*libvirtVM{v, w} {
			assertNoNBDServer(t, x.Monitor(), x.Dir, "a group cycle that failed before its fleece")
			testvm.AssertNoLeftovers(t, x.Monitor())
		}
	})
}

// A lifeboat that died mid-cycle left its NBD server running on its own
// socket: the next cycle recognises it as lifeboat's (this QEMU listens on
// lifeboat's socket), stops it, and stops its own at the end.
func TestStaleNBDServerOfDeadLifeboatIsStopped(t *testing.T) {
	v := startLibvirtVM(t, testsite.Start(t, recovery.Options{Keep: 5}), "vm1")
	m := v.Monitor()
	if err := m.NBDServerStart(ctx(t), filepath.Join(v.p.VM.WorkDir, "nbd.sock")); err != nil {
		t.Fatal(err)
	}
	v.cycle(t)
	assertNoNBDServer(t, m, v.Dir, "a cycle that found a dead lifeboat's NBD server")
}

// exportHash is the sha256 of an NBD export's content.
func exportHash(t *testing.T, sock, export string, size int64) string {
	t.Helper()
	g, err := workload.Open(ctx(t), sock, 0, workload.Disk{Name: export, Size: size})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	h, err := g.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	return h[export]
}

// During a libvirt pull backup, the VM's QEMU runs libvirt's NBD server: a
// cycle neither stops nor uses it (QEMU cannot say where it listens, and
// libvirt stops it at the backup's end, with every export on it). It waits,
// says why, and fails clearly when the wait runs out, leaving the backup
// whole; once the backup ends it goes on, and protects the disk alone, not the
// backup's scratch node.
func TestForeignNBDServerIsWaitedFor(t *testing.T) {
	v := startLibvirtVM(t, testsite.Start(t, recovery.Options{Keep: 5}), "vm1")
	m := v.Monitor()
	v.cycle(t)
	sock := filepath.Join(v.Dir, "backup.sock")
	b := testvm.PullBackup(t, m, sysDiskNode, v.Dir, "vda", sock)
	atBackup := sha256.Sum256(v.model)
	v.write(t, 0x44, 0, 256<<10) // copied before write into libvirt's scratch

	v.p.BusyWait = 1500 * time.Millisecond
	_, err := v.p.Cycle(ctx(t))
	if err == nil || !strings.Contains(err.Error(), "NBD server lifeboat did not start") || !strings.Contains(err.Error(), `backup "backup-vda"`) || !strings.Contains(err.Error(), "nbd_socket") {
		t.Fatalf("cycle during another's pull backup: err = %v; want it to say another NBD server runs, name the backup job, and when to set nbd_socket", err)
	}
	if !strings.Contains(v.log.String(), "waiting for it to stop") {
		t.Errorf("the wait was not logged:\n%s", v.log)
	}
	if err := b.Running(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if got := exportHash(t, sock, "vda", sysDiskSize); got != hex.EncodeToString(atBackup[:]) {
		t.Fatal("the other tool's backup export no longer reads the disk as it was at its start")
	}

	// The backup ends while the next cycle waits: that cycle goes on.
	v.p.BusyWait = 30 * time.Second
	want := sha256.Sum256(v.model)
	type result struct {
		pt  lifeboat.Point
		err error
	}
	done := make(chan result, 1)
	cctx := ctx(t)
	go func() {
		pt, err := v.p.Cycle(cctx)
		done <- result{pt, err}
	}()
	waitLog(t, v.log, "waiting for it to stop", 2)
	b.End(t)
	res := <-done
	if res.err != nil {
		t.Fatalf("cycle that waited for the backup to end: %v\nlog:\n%s", res.err, v.log)
	}
	if res.pt.Disks[0].Resync {
		t.Fatalf("point %d resynchronised the disk: want it incremental", res.pt.ID)
	}
	v.checkPoint(t, res.pt, hex.EncodeToString(want[:]))
	assertNoNBDServer(t, m, v.Dir, "a cycle that waited for another's NBD server")
}

// waitLog waits until the log holds n lines saying what.
func waitLog(t *testing.T, log *testenv.LogBuffer, what string, n int) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); strings.Count(log.String(), what) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("the log never said %q %d times:\n%s", what, n, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A cycle during another tool's backup protects the VM's disks only, by their
// stable names, byte-exact, and leaves the backup running and whole.
func TestCycleDuringForeignBackup(t *testing.T) {
	t.Run("pull backup in a qemu-storage-daemon", func(t *testing.T) {
		r := newRig(t, wire.CompressionZstd)
		if err := r.guest.Fill(ctx(t), 0.2); err != nil {
			t.Fatal(err)
		}
		r.cycle(t)
		m := r.vm.Monitor()
		atBackup, err := r.guest.Hashes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		// On the daemon's own NBD server, as its only one.
		b := testvm.PullBackup(t, m, "vda", r.vm.Dir, "backup-vda", "")
		if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
			t.Fatal(err)
		}
		pt := r.cycle(t)
		if got := pointDisks(pt); got != "vda,vdb" {
			t.Fatalf("point %d during another's pull backup has disks %s, want vda,vdb", pt.ID, got)
		}
		if err := b.Running(ctx(t)); err != nil {
			t.Fatal(err)
		}
		if got := exportHash(t, r.vm.NBDSocket(), "backup-vda", vdaSize); got != atBackup["vda"] {
			t.Fatal("the other tool's backup export no longer reads vda as it was at its start")
		}
		b.End(t)
		if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
			t.Fatal(err)
		}
		if pt := r.cycle(t); pointDisks(pt) != "vda,vdb" || pt.Disks[0].Resync || pt.Disks[1].Resync {
			t.Fatalf("point %d after the backup: disks %+v, want vda,vdb sent incrementally", pt.ID, pt.Disks)
		}
	})
	t.Run("push backup in a qemu-system", func(t *testing.T) {
		v := startLibvirtVM(t, testsite.Start(t, recovery.Options{Keep: 5}), "vm1")
		v.cycle(t)
		b := testvm.PushBackup(t, v.Monitor(), sysDiskNode, v.Dir)
		v.write(t, 0x55, 1<<20, 128<<10)
		if pt := v.cycle(t); pt.Disks[0].Resync {
			t.Fatalf("point %d during another's push backup resynchronised the disk: want it incremental", pt.ID)
		}
		if err := b.Running(ctx(t)); err != nil {
			t.Fatal(err)
		}
		assertNoNBDServer(t, v.Monitor(), v.Dir, "a cycle during another's push backup")
		b.End(t)
	})
}

// pointDisks is the point's disk names, comma-separated.
func pointDisks(pt lifeboat.Point) string {
	var names []string
	for _, d := range pt.Disks {
		names = append(names, d.Name)
	}
	return strings.Join(names, ",")
}

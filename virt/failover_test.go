package virt_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// At a recovery site whose config names a libvirtd, a libvirt domain's point
// starts as a libvirt domain from the XML it carries: a test failover as a
// transient domain under another name while the production domain runs; a
// real failover, once production is lost, as the same domain (name, UUID),
// defined, with the failover checkpoint libvirt knows of. Inside each, the
// guest reads exactly the point's disk; stopping each removes the domain,
// and libvirt hands the point's images back to lifeboat. Between the two, a
// planned migration of the production domain.
func TestLibvirtFailoverAndPlannedMigration(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 96 << 20}, {Target: "vdb", Size: 16 << 20, Format: "raw"},
	}})
	guestExec(t, r.dom, "head -c 1048576 /dev/urandom > /tmp/r && dd if=/tmp/r of=/dev/vdb bs=64k seek=3 conv=fsync status=none")
	pt := r.cycle(t)
	want := r.pointHash(t, pt.ID, "vdb")
	// The site's state_dir would sit in /var/lib; t.TempDir's parent is 0700.
	for d := filepath.Dir(r.site.Dir); d != "/tmp" && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	m := &failover.Manager{Store: r.site.Store, Dir: filepath.Join(r.site.Dir, "failover"), Site: "dr", Libvirt: testlibvirt.URI}
	image, err := r.site.Store.ImagePath("web1", pt.ID, "vdb")
	if err != nil {
		t.Fatal(err)
	}
	uuid, err := testlibvirt.Virsh("domuuid", r.dom.Name)
	if err != nil {
		t.Fatal(err)
	}

	check := func(run *failover.Run, persistent bool) {
		t.Helper()
		info, err := testlibvirt.Virsh("dominfo", run.Domain)
		if err != nil {
			t.Fatalf("the run's domain %q: %v", run.Domain, err)
		}
		if got := strings.Contains(info, "Persistent:     yes"); got != persistent {
			t.Errorf("domain %q persistent %v, want %v:\n%s", run.Domain, got, persistent, info)
		}
		actx, cancel := context.WithTimeout(ctx(t), 3*time.Minute)
		defer cancel()
		if err := m.WaitAgent(actx, run); err != nil {
			t.Fatal(err)
		}
		out, code, err := testlibvirt.GuestExec(actx, run.Domain, "/bin/sh", "-c", "sha256sum /dev/vdb")
		if err != nil || code != 0 {
			t.Fatalf("sha256sum in the recovered guest: %v (exit %d) %s", err, code, out)
		}
		if got := strings.Fields(out)[0]; got != want {
			t.Errorf("%s: the recovered guest reads vdb as %s, point %d is %s", run.Kind(), got[:12], pt.ID, want[:12])
		}
		t.Logf("%s: domain %s, QEMU running %v after the command, agent %v", run.Kind(), run.Domain, run.ToRunning, run.ToAgent)
	}
	gone := func(run *failover.Run) {
		t.Helper()
		if out, _ := testlibvirt.Virsh("list", "--all", "--name"); strings.Contains(out, run.Domain+"\n") {
			t.Errorf("after its stop libvirt still lists domain %q:\n%s", run.Domain, out)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(image, &st); err != nil || st.Uid != 0 {
			t.Errorf("point %d's image %s is owned by uid %d (%v) after the run, want root's again", pt.ID, image, st.Uid, err)
		}
		// Others may pass the store's directories now: its images must be
		// readable by their owner only.
		if st.Mode&0o077 != 0 {
			t.Errorf("point %d's image %s has mode %o after the run: readable by others who may now pass its directory", pt.ID, image, st.Mode&0o777)
		}
		if _, err := os.Stat(run.Dir); !os.IsNotExist(err) {
			t.Errorf("the run's directory %s is still there (%v)", run.Dir, err)
		}
	}

	// A test while the production domain runs: another name, transient.
	run, err := m.Start(ctx(t), "web1", failover.Options{Test: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(run.Domain, r.dom.Name+"-lbtest-") {
		t.Errorf("the test runs as domain %q, want %s-lbtest-…", run.Domain, r.dom.Name)
	}
	check(run, false)
	if err := m.Stop(ctx(t), run); err != nil {
		t.Fatal(err)
	}
	gone(run)

	// A planned migration of the production domain: the guest frozen
	// through libvirt's agent and paused, a last file-system-consistent
	// point holding every write the guest had acknowledged, the recovery
	// site asked to start it, then the domain here powered off and kept
	// defined with autostart cleared. A refused start leaves the domain
	// paused here (the recovery site may have started it). The recovery
	// site's start is a stub recording the call here: the real start of a
	// libvirt domain there is what follows.
	if _, err := testlibvirt.Virsh("autostart", r.dom.Name); err != nil {
		t.Fatal(err)
	}
	var asked []uint64
	refuse := true
	r.site.SetStartVM(func(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error) {
		asked = append(asked, point)
		if refuse {
			return wire.FailoverResult{}, errors.New("no room here")
		}
		return wire.FailoverResult{Run: "web1-run", Point: point, Epoch: 2}, nil
	})
	write := func() {
		t.Helper()
		out, code, err := testlibvirt.GuestExec(ctx(t), r.dom.Name, "/bin/sh", "-c",
			"head -c 2097152 /dev/urandom > /tmp/r && dd if=/tmp/r of=/dev/vdb bs=64k seek=7 conv=fsync status=none")
		if err != nil || code != 0 {
			t.Fatalf("the guest's write: %v (exit %d) %s", err, code, out)
		}
	}
	write()
	if _, err := r.p.Migrate(ctx(t), protect.MigrateOptions{}); err == nil || !strings.Contains(err.Error(), "virsh resume") {
		t.Fatalf("a migration the recovery site refused: %v, want an error saying how to resume the domain here", err)
	}
	if st, _ := testlibvirt.Virsh("domstate", r.dom.Name); !strings.Contains(st, "paused") {
		t.Errorf("after a refused migration the domain is %q, want paused (the recovery site may run it)", strings.TrimSpace(st))
	}
	for _, cmd := range [][]string{{"resume", r.dom.Name}, {"domfsthaw", r.dom.Name}} {
		if _, err := testlibvirt.Virsh(cmd...); err != nil {
			t.Fatal(err)
		}
	}
	write() // the guest runs again, and writes more

	refuse = false
	mig, err := r.p.Migrate(ctx(t), protect.MigrateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("planned migration: point %d (%s: %s) in %v", mig.Point.ID, mig.Point.Consistency, mig.Point.Note, mig.Took)
	if mig.Point.Consistency != lifeboat.Filesystem {
		t.Errorf("the migration's point is %s (%s), want filesystem", mig.Point.Consistency, mig.Point.Note)
	}
	if len(asked) != 2 || asked[1] != mig.Point.ID || mig.Run.Run != "web1-run" {
		t.Errorf("the recovery site was asked to start points %v (result %+v), want the migration's point %d last", asked, mig.Run, mig.Point.ID)
	}
	info, err := testlibvirt.Virsh("dominfo", r.dom.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"shut off", "Persistent:     yes", "Autostart:      disable"} {
		if !strings.Contains(info, want) {
			t.Errorf("after the migration the domain here is not %q:\n%s", want, info)
		}
	}
	// Every write the guest acknowledged is in the point.
	for _, ds := range r.dom.Disks {
		if got, want := r.pointHash(t, mig.Point.ID, ds.Target), imageHash(t, r.dom.Image(ds.Target)); got != want {
			t.Errorf("point %d disk %s: sha256 %s, the domain's image %s", mig.Point.ID, ds.Target, got[:12], want[:12])
		}
	}
	pt = mig.Point
	want = r.pointHash(t, pt.ID, "vdb")

	// Production is lost: its domain is gone from this (shared) libvirtd.
	if _, err := testlibvirt.Virsh("undefine", r.dom.Name, "--checkpoints-metadata"); err != nil {
		t.Fatal(err)
	}
	run, err = m.Start(ctx(t), "web1", failover.Options{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if run.Domain != r.dom.Name {
		t.Errorf("the failover runs as domain %q, want the production domain's name %q", run.Domain, r.dom.Name)
	}
	check(run, true)
	if got, _ := testlibvirt.Virsh("domuuid", run.Domain); strings.TrimSpace(got) != strings.TrimSpace(uuid) {
		t.Errorf("the failed-over domain's UUID is %s, production's %s", got, uuid)
	}
	// What a failback reads (for prod) and folds (this site's own): two
	// checkpoints of lifeboat's, hidden from libvirt's tools (their records
	// kept for the failback's cycles, their bitmaps recording in QEMU).
	if cps, err := testlibvirt.Virsh("checkpoint-list", run.Domain, "--name"); err != nil || strings.Contains(cps, "lifeboat") {
		t.Errorf("libvirt's checkpoints of the failed-over domain: %q (%v), want lifeboat's hidden", cps, err)
	}
	if len(run.Generations) != 2 || len(run.Home) != 2 {
		t.Errorf("the run's generations %v, home %v: want both disks' of each", run.Generations, run.Home)
	}
	for disk, g := range run.Generations {
		for _, name := range []string{g, run.Home[disk]} {
			if _, err := os.Stat(filepath.Join(run.Dir, "failback", "checkpoints", name+".xml")); name == "" || err != nil {
				t.Errorf("disk %s: checkpoint %q: no record kept for the failback (%v)", disk, name, err)
			}
		}
	}
	if o, _, _ := r.site.Store.Owner("web1"); o.Site != "dr" {
		t.Errorf("after the failover web1's owner is %+v, want dr", o)
	}
	if err := m.Stop(ctx(t), run); err != nil { // undo
		t.Fatal(err)
	}
	gone(run)
}

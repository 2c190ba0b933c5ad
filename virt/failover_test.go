package virt_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
)

// At a recovery site whose config names a libvirtd, a libvirt domain's point
// starts as a libvirt domain from the XML it carries: a test failover as a
// transient domain under another name while the production domain runs; a
// real failover, once production is lost, as the same domain (name, UUID),
// defined, with the failover checkpoint libvirt knows of. Inside each, the
// guest reads exactly the point's disk; stopping each removes the domain,
// and libvirt hands the point's images back to lifeboat.
func TestLibvirtFailoverRunsTheDomain(t *testing.T) {
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

	// Production is lost: its domain is gone from this (shared) libvirtd.
	r.dom.Destroy()
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
	cps, err := testlibvirt.Virsh("checkpoint-list", run.Domain, "--name")
	if err != nil || !strings.Contains(cps, failover.Bitmap) {
		t.Errorf("libvirt's checkpoints of the failed-over domain: %q (%v), want %s (what a failback reads)", cps, err, failover.Bitmap)
	}
	if o, _, _ := r.site.Store.Owner("web1"); o.Site != "dr" {
		t.Errorf("after the failover web1's owner is %+v, want dr", o)
	}
	if err := m.Stop(ctx(t), run); err != nil { // undo
		t.Fatal(err)
	}
	gone(run)
}

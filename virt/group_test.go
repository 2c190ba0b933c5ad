package virt_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// member is another domain protected as vm beside r (the same recovery
// site and state_dir): a consistency group's second member.
func (r *libvirtRig) member(t *testing.T, vm string, opts testlibvirt.Options) *libvirtRig {
	t.Helper()
	m := &libvirtRig{dom: testlibvirt.Boot(t, opts), site: r.site}
	m.p = &protect.Protector{
		VM: protect.VM{Name: vm, Libvirt: &protect.LibvirtDomain{URI: testlibvirt.URI, Domain: m.dom.Name},
			WorkDir: filepath.Join(r.p.VM.StateDir, "protect", vm), StateDir: r.p.VM.StateDir},
		Target: r.p.Target, Readers: 4, ChunkSize: 1 << 20,
	}
	if err := os.MkdirAll(m.p.VM.WorkDir, 0o750); err != nil {
		t.Fatal(err)
	}
	return m
}

// A consistency group of two libvirt domains (a web tier and its database):
// both guests frozen through libvirt at once, each domain's backup begun with
// its next checkpoint inside that window, one group point per cycle whose
// members are both file-system consistent, incremental from the second
// cycle on, nothing left in either domain after a cycle, and byte-exact.
// A member that cannot be prepared (its domain went down) fails the group's
// cycle, naming it, and leaves nothing of the cycle in the other domain: no
// job, no checkpoint shown to libvirt, no point; the next cycle of the other
// member is still incremental. Before, the config refused libvirt domains in
// a group ("not built yet").
func TestLibvirtGroup(t *testing.T) {
	testenv.RequireTools(t, "e2fsck", "dumpe2fs", "debugfs")
	opts := testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 96 << 20}}}
	web := newLibvirtRig(t, opts)
	db := web.member(t, "db1", opts)
	rigs := []*libvirtRig{web, db}
	g := &protect.Group{Name: "tier"}
	var logs testenv.LogBuffer
	for _, r := range rigs {
		r.p.Quiescer = &protect.LibvirtQuiescer{VM: r.p.VM.Name, Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 10 * time.Second,
			Log: slog.New(slog.NewTextHandler(&logs, nil))}
		r.p.BusyWait = 5 * time.Second
		g.Members = append(g.Members, r.p)
		r.dom.WaitWriterFiles(time.Minute)
	}
	shown := func(r *libvirtRig) string {
		t.Helper()
		out, err := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name")
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	cycle := func(i int) []lifeboat.Point {
		t.Helper()
		pts, err := g.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("group cycle %d: %v", i, err)
		}
		if len(pts) != 2 {
			t.Fatalf("group cycle %d: %d points, want 2", i, len(pts))
		}
		for _, r := range rigs {
			r.checkLeftNothing(t)
			if s := shown(r); s != "" {
				t.Errorf("group cycle %d: libvirt shows checkpoints of %s between cycles: %s", i, r.p.VM.Name, s)
			}
		}
		if pts[0].Group == "" || pts[0].Group != pts[1].Group {
			t.Errorf("group cycle %d: points tagged %q and %q, want one group instant", i, pts[0].Group, pts[1].Group)
		}
		return pts
	}

	var taken [][]lifeboat.Point
	for i := range 4 {
		pts := cycle(i)
		for _, pt := range pts {
			if pt.Consistency != lifeboat.Filesystem {
				t.Errorf("group cycle %d: %s point %d is %s (%s), want filesystem", i, pt.VM, pt.ID, pt.Consistency, pt.Note)
			}
			if vda := diskOf(t, pt, "vda"); i > 0 && (vda.Resync || vda.BaseGeneration == "") {
				t.Errorf("group cycle %d: %s's vda was sent whole: %+v", i, pt.VM, vda)
			}
		}
		// Both domains' backups began while both guests were frozen: their
		// instants lie within the freeze bound of each other.
		if d := pts[0].Instant.Sub(pts[1].Instant).Abs(); d > 10*time.Second {
			t.Errorf("group cycle %d: the members' instants are %v apart", i, d)
		}
		t.Logf("group cycle %d: %s changed %d sent %d frozen %v; %s changed %d sent %d frozen %v", i,
			pts[0].VM, pts[0].Stats.BytesChanged, pts[0].Stats.BytesSent, pts[0].Freeze,
			pts[1].VM, pts[1].Stats.BytesChanged, pts[1].Stats.BytesSent, pts[1].Freeze)
		taken = append(taken, pts)
		time.Sleep(300 * time.Millisecond)
	}
	files := 0
	for _, pts := range taken {
		for _, pt := range pts {
			img := filepath.Join(t.TempDir(), "p.raw")
			if err := web.site.Store.Export(ctx(t), pt.VM, pt.ID, "vda", img, "raw"); err != nil {
				t.Fatal(err)
			}
			c := testguest.CheckFS(t, img)
			if c.NeedsRecovery || !c.FsckClean || c.Bad > 0 {
				t.Errorf("%s point %d: needs journal recovery %v, e2fsck clean %v, %d of %d files broken", pt.VM, pt.ID, c.NeedsRecovery, c.FsckClean, c.Bad, c.Files)
			}
			files += c.Files
		}
	}
	if files == 0 {
		t.Fatal("the guests wrote no file: the workload did not run")
	}

	// The database's domain goes down: the group's cycle fails, naming it,
	// and the web domain keeps nothing of it.
	latest, _, err := web.site.Store.Latest("web1")
	if err != nil {
		t.Fatal(err)
	}
	db.dom.Destroy()
	if _, err := g.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), `vm "db1"`) {
		t.Fatalf("group cycle with db1's domain down: %v, want an error naming db1", err)
	} else {
		t.Logf("with db1's domain down: %v", err)
	}
	web.checkLeftNothing(t)
	if s := shown(web); s != "" {
		t.Errorf("after the failed group cycle libvirt shows web1's checkpoints: %s", s)
	}
	if now, _, err := web.site.Store.Latest("web1"); err != nil || now.ID != latest.ID {
		t.Errorf("after the failed group cycle web1's latest point is %d (%v), want %d: a group point is all or nothing", now.ID, err, latest.ID)
	}
	db.dom.Start()
	db.dom.WaitWriterFiles(time.Minute)
	pts := cycle(4)
	if vda := diskOf(t, pts[0], "vda"); vda.Resync {
		t.Errorf("after the failed group cycle web1's vda was sent whole: %+v", vda)
	}

	// Byte-exact: both domains paused, a group point, then stopped.
	for _, r := range rigs {
		if _, err := testlibvirt.Virsh("suspend", r.dom.Name); err != nil {
			t.Fatal(err)
		}
	}
	pts = cycle(5)
	// A paused guest cannot be frozen (libvirt refuses the agent call before
	// it reaches the agent): its point is as consistent as it stopped, and
	// nothing was frozen. Before, the refusal was taken for a failed freeze,
	// and a thaw loop logged that the guest was left frozen until it resumed.
	for _, pt := range pts {
		if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "not running") {
			t.Errorf("%s point %d of the paused domain: %s (%s), want crash consistent, saying the domain is not running", pt.VM, pt.ID, pt.Consistency, pt.Note)
		}
	}
	if l := logs.String(); strings.Contains(l, "level=ERROR") {
		t.Errorf("the quiescers logged errors for the paused domains:\n%s", l)
	}
	for i, r := range rigs {
		r.dom.Destroy()
		out := filepath.Join(t.TempDir(), "vda.raw")
		if err := web.site.Store.Export(ctx(t), r.p.VM.Name, pts[i].ID, "vda", out, "raw"); err != nil {
			t.Fatal(err)
		}
		if got, want := fileHash(t, out), imageHash(t, r.dom.Image("vda")); got != want {
			t.Errorf("%s point %d: vda sha256 %s, the image %s", r.p.VM.Name, pts[i].ID, got[:12], want[:12])
		}
	}
}

// A group of a libvirt domain and a VM reached by its own QMP (a
// qemu-storage-daemon and a qemu-system with its agent): both frozen at
// once, each its own way, one group tag per cycle, both points file-system
// consistent and incremental from the second cycle, nothing of lifeboat's
// left in the domain.
func TestLibvirtAndQMPMembersInOneGroup(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "e2fsck", "dumpe2fs", "debugfs")
	web := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 96 << 20}}})
	g := testguest.Boot(t, testguest.Options{Workload: testguest.FsyncWriter, DiskSize: 96 << 20, Name: "db"})
	db := &protect.Protector{
		VM: protect.VM{Name: "db1", QMPSocket: g.StorageQMPSocket(), NBDSocket: g.StorageNBDSocket(),
			Disks: []string{g.DiskNode()}, WorkDir: filepath.Join(web.p.VM.StateDir, "protect", "db1")},
		Target: web.p.Target, Readers: 4, ChunkSize: 1 << 20,
		Quiescer: &protect.AgentQuiescer{VM: "db1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, Limit: 10 * time.Second, MarkerDir: t.TempDir()},
	}
	if err := os.MkdirAll(db.VM.WorkDir, 0o750); err != nil {
		t.Fatal(err)
	}
	web.p.Quiescer = &protect.LibvirtQuiescer{VM: "web1", Domain: *web.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 10 * time.Second}
	web.dom.WaitWriterFiles(time.Minute)
	group := &protect.Group{Name: "mixed", Members: []*protect.Protector{web.p, db}}
	for i := range 3 {
		pts, err := group.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("group cycle %d: %v", i, err)
		}
		web.checkLeftNothing(t)
		if len(pts) != 2 || pts[0].Group == "" || pts[0].Group != pts[1].Group {
			t.Fatalf("group cycle %d: points %+v, want two under one group tag", i, pts)
		}
		for _, pt := range pts {
			if pt.Consistency != lifeboat.Filesystem {
				t.Errorf("group cycle %d: %s point %d is %s (%s), want filesystem", i, pt.VM, pt.ID, pt.Consistency, pt.Note)
			}
			if d := pt.Disks[0]; i > 0 && d.Resync {
				t.Errorf("group cycle %d: %s's %s was sent whole", i, pt.VM, d.Name)
			}
			img := filepath.Join(t.TempDir(), "p.raw")
			if err := web.site.Store.Export(ctx(t), pt.VM, pt.ID, pt.Disks[0].Name, img, "raw"); err != nil {
				t.Fatal(err)
			}
			if c := testguest.CheckFS(t, img); c.NeedsRecovery || !c.FsckClean || c.Bad > 0 {
				t.Errorf("%s point %d: needs journal recovery %v, e2fsck clean %v, %d of %d files broken", pt.VM, pt.ID, c.NeedsRecovery, c.FsckClean, c.Bad, c.Files)
			}
		}
		t.Logf("group cycle %d: %s frozen %v, %s frozen %v", i, pts[0].VM, pts[0].Freeze, pts[1].VM, pts[1].Freeze)
		time.Sleep(300 * time.Millisecond)
	}
}

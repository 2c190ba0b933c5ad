package protect_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// newTier is a group "tier" of two VMs, web and db, each with an 8 MiB qcow2
// disk vda, protected to one recovery site.
func newTier(t *testing.T) (*testsite.Site, *protect.Group, map[string]*testvm.VM) {
	t.Helper()
	site := testsite.Start(t, recovery.Options{Keep: 10})
	g := &protect.Group{Name: "tier"}
	vms := map[string]*testvm.VM{}
	for _, name := range []string{"web", "db"} {
		vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20})
		vms[name] = vm
		g.Members = append(g.Members, &protect.Protector{
			VM:     protect.VM{Name: name, QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), WorkDir: testsite.ShortDir(t)},
			Target: site.Dial(t, wire.CompressionZstd), Readers: 2,
		})
	}
	return site, g, vms
}

// A group cycle records each member's disk images, as a VM's own cycle does:
// a member failed over alone fails back into them. Before, only a VM's own
// cycle recorded them, and a member that had only group points could not
// fail back ("no record of its images"), or one that joined the group after
// its disk moved would have failed back into the old file.
func TestGroupCycleRecordsImages(t *testing.T) {
	_, g, vms := newTier(t)
	members := g.Members
	if _, err := g.Cycle(ctx(t)); err != nil {
		t.Fatal(err)
	}
	for _, p := range members {
		images, err := protect.ReadImages(p.VM.WorkDir)
		if err != nil {
			t.Errorf("%s: %v", p.VM.Name, err)
			continue
		}
		if want := vms[p.VM.Name].ImagePath("vda"); len(images) != 1 || images[0].Name != "vda" || images[0].File != want {
			t.Errorf("%s: images recorded %+v, want vda at %s", p.VM.Name, images, want)
		}
	}
}

// A group member's disk resized after the member's disks were resolved and
// before the group's instant: the whole group's instant is rolled back, the
// error names the member and its disk, no member has a point of it, nothing
// of lifeboat's stays in either QEMU, and the next group point is whole.
func TestGroupMemberDiskResizedBeforeTheInstant(t *testing.T) {
	site, g, vms := newTier(t)
	members := g.Members
	if _, err := g.Cycle(ctx(t)); err != nil {
		t.Fatal(err)
	}
	members[0].Hooks.BeforeFleece = func(c context.Context) error {
		m := vms["web"].Monitor()
		if err := m.ExportDelForce(c, "vda"); err != nil {
			return err
		}
		if err := m.BlockResize(c, "vda", 16<<20); err != nil {
			return err
		}
		return m.ExportAdd(c, qemu.Export{ID: "vda", Node: "vda", Name: "vda", Writable: true})
	}
	_, err := g.Cycle(ctx(t))
	members[0].Hooks.BeforeFleece = nil
	if err == nil || !strings.Contains(err.Error(), `vm "web"`) || !strings.Contains(err.Error(), `disk "vda" was resized`) {
		t.Fatalf("a group cycle whose member web's disk was resized before the instant: %v", err)
	}
	t.Logf("the group cycle failed as it should: %v", err)
	for _, p := range members {
		if pts, err := site.Store.Points(p.VM.Name); err != nil || len(pts) != 1 {
			t.Fatalf("%s: %d points (%v), want 1", p.VM.Name, len(pts), err)
		}
		nodes, err := vms[p.VM.Name].Monitor().Nodes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if strings.HasPrefix(n.NodeName, qemu.OwnPrefix) {
				t.Fatalf("%s: lifeboat left node %s", p.VM.Name, n.NodeName)
			}
		}
	}
	pts, err := g.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, pt := range pts {
		if d := diskNamed(t, pt, "vda"); (pt.VM == "web") != d.Resync || d.Size != map[string]int64{"web": 16 << 20, "db": 8 << 20}[pt.VM] {
			t.Fatalf("%s point %d: vda resync %v, %d bytes", pt.VM, pt.ID, d.Resync, d.Size)
		}
	}
}

// A group whose first member's point fails to send (the recovery site
// refuses it: a hook's error stands in for that, the one failure here not
// of a real part) sends no other member: the members not sent yet are
// rolled back, their fleece out of their guests' write path, and commit
// nothing, so the failed cycle leaves no partial group point behind it;
// the next group cycle is incremental and byte-exact for both. Before,
// every later member was still sent and committed.
func TestGroupStopsAtAFailedMember(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 100})
	db, web := startHangVM(t, site, "db", 4), startHangVM(t, site, "web", 5)
	g := &protect.Group{Name: "tier", Members: []*protect.Protector{db.p, web.p}}
	groupCycle(t, g)
	for _, v := range []*hangVM{db, web} {
		if _, err := v.guest.Mixed(ctx(t), 10); err != nil {
			t.Fatal(err)
		}
	}
	db.p.Hooks.AfterPlan = func(context.Context) error { return errors.New("refused by the test") }
	_, err := g.Cycle(ctx(t))
	db.p.Hooks.AfterPlan = nil
	if err == nil || !strings.Contains(err.Error(), `vm "db"`) {
		t.Fatalf("group cycle with db's point refused: %v; want an error naming db", err)
	}
	if n := pointCount(t, site, "web"); n != 1 {
		t.Errorf("web holds %d points after the failed group cycle, want the first only: a member sent after a failed one made a partial group point", n)
	}
	testvm.AssertNoLeftovers(t, web.vm.Monitor())
	want := hashesOf(t, db, web)
	for _, pt := range groupCycle(t, g) {
		checkIncremental(t, site, pt, want[pt.VM])
	}
}

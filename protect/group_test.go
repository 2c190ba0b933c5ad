package protect_test

import (
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// A group cycle records each member's disk images, as a VM's own cycle does:
// a member failed over alone fails back into them. Before, only a VM's own
// cycle recorded them, and a member that had only group points could not
// fail back ("no record of its images"), or one that joined the group after
// its disk moved would have failed back into the old file.
func TestGroupCycleRecordsImages(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 10})
	var members []*protect.Protector
	vms := map[string]*testvm.VM{}
	for _, name := range []string{"web", "db"} {
		vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20})
		vms[name] = vm
		members = append(members, &protect.Protector{
			VM:     protect.VM{Name: name, QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), WorkDir: testsite.ShortDir(t)},
			Target: site.Dial(t, wire.CompressionZstd), Readers: 2,
		})
	}
	g := &protect.Group{Name: "tier", Members: members}
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

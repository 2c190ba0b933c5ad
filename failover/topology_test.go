package failover_test

import (
	"context"
	"path/filepath"
	"slices"
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

// A VM whose second disk was removed after a point: a test failover of the
// latest point starts it with the disks that point holds (the config's
// definition still names the removed one), and one of the earlier point
// with both, the removed disk's data among them.
func TestFailoverAcrossARemovedDisk(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 10})
	dir := testsite.ShortDir(t)
	var args []string
	for _, d := range []string{"vda", "vdb"} {
		image := filepath.Join(dir, d+".qcow2")
		testguest.MakeDisk(t, image, 16<<20, "qcow2")
		args = append(args, qemu.DiskArgs(d, image, "qcow2")...)
	}
	ctx := testCtx(t, 2*time.Minute)
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, Args: args, NBD: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Stop(context.Background()) })
	kernel, initrd := testguest.Build(t)
	p := &protect.Protector{
		VM: protect.VM{Name: "two", QMPSocket: d.ClientQMPSocket(), NBDSocket: d.NBDSocket(), WorkDir: testsite.ShortDir(t),
			Definition: lifeboat.Definition{Source: "config", Machine: "q35", CPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: initrd,
				Append: "console=ttyS0 panic=-1 lb.workload=none",
				Disks:  []lifeboat.DefinitionDisk{{Name: "vda", Device: "virtio-blk-pci"}, {Name: "vdb", Device: "virtio-blk-pci"}}}},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	p1, err := p.Cycle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Monitor().ExportDelForce(ctx, "vdb"); err != nil {
		t.Fatal(err)
	}
	p2, err := p.Cycle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(p2.Disks) != 1 {
		t.Fatalf("point %d after vdb was removed holds %+v", p2.ID, p2.Disks)
	}
	m := manager(t, site)
	for _, tc := range []struct {
		point uint64
		want  []string
	}{{p2.ID, []string{"vda"}}, {p1.ID, []string{"vda", "vdb"}}} {
		r, err := m.Start(ctx, "two", failover.Options{Point: tc.point, Test: true})
		if err != nil {
			t.Fatalf("test failover of point %d: %v", tc.point, err)
		}
		mon, err := qemu.Dial(ctx, r.QMP)
		if err != nil {
			t.Fatal(err)
		}
		disks, err := mon.Disks(ctx)
		mon.Close()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, d := range disks {
			names = append(names, d.Name)
		}
		if err := m.Stop(context.Background(), r); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(names, tc.want) {
			t.Fatalf("test failover of point %d runs with disks %v, want %v", tc.point, names, tc.want)
		}
	}
}

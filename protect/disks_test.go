package protect_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// A disk keeps its name when its node is renamed: a restart of the VM's
// qemu-storage-daemon with other node names (as libvirt renumbers them) goes on
// incrementally under the same disk name, and an external snapshot (a new top
// node; lifeboat's bitmaps stay on the old one and miss the writes to the new)
// makes a hash resync with a logged reason, never a point that misses writes.
func TestDiskNameSurvivesNodeRenameAndSnapshot(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon", "qemu-img")
	const size = 16 << 20
	seed := testenv.Seed(t)
	dir := testsite.ShortDir(t)
	image := filepath.Join(dir, "vda.qcow2")
	if err := qemu.CreateImage(ctx(t), image, "qcow2", size, "", ""); err != nil {
		t.Fatal(err)
	}
	var qsd *qemu.Daemon
	start := func(node string) {
		t.Helper()
		args := []string{
			"--blockdev", fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"file":{"driver":"file","filename":%q}}`, node, image),
			"--export", fmt.Sprintf(`{"type":"nbd","id":"vda","node-name":%q,"name":"vda","writable":true}`, node),
		}
		var err error
		if qsd, err = qemu.StartDaemon(ctx(t), qemu.DaemonConfig{Dir: filepath.Join(dir, "vm"), NBD: true, Args: args}); err != nil {
			t.Fatal(err)
		}
	}
	start("libvirt-1-format")
	t.Cleanup(func() { qsd.Stop(context.Background()) })
	var logs testenv.LogBuffer
	r := &rig{
		disks: []workload.Disk{{Name: "vda", Size: size}},
		site:  testsite.Start(t, recovery.Options{Keep: 100}),
	}
	r.p = &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: qsd.ClientQMPSocket(), NBDSocket: qsd.NBDSocket(), WorkDir: testsite.ShortDir(t)},
		Target: r.site.Dial(t, wire.CompressionZstd), Readers: 4, Connections: 2,
		Log: slog.New(slog.NewTextHandler(&logs, nil)),
	}
	open := func() {
		t.Helper()
		g, err := workload.Open(ctx(t), qsd.NBDSocket(), seed, r.disks...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(g.Close)
		r.guest = g
	}
	open()
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)

	// A clean restart (bitmaps saved) under another node name.
	ops, err := r.guest.Mixed(ctx(t), 8)
	if err != nil {
		t.Fatal(err)
	}
	r.guest.Close()
	if err := qsd.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	start("libvirt-2-format")
	open()
	last := workload.Op{Disk: "vda", Kind: "data", Offset: 12 << 20, Length: 1 << 20}
	if err := r.guest.Do(ctx(t), last); err != nil {
		t.Fatal(err)
	}
	// What an incremental cycle may handle, whatever the draw: the blocks the
	// writes since point 1 touched.
	touched := map[int64]bool{}
	for _, op := range append(ops, last) {
		for b := op.Offset / lifeboat.BlockSize; b*lifeboat.BlockSize < op.Offset+op.Length; b++ {
			touched[b] = true
		}
	}
	// `disks:` may still name the disk by its node, as configs did before.
	r.p.VM.Disks = []string{"libvirt-2-format"}
	pt := r.cycle(t)
	if len(pt.Disks) != 1 || pt.Disks[0].Name != "vda" || pt.Disks[0].Resync {
		t.Fatalf("after the node was renamed: point disks %+v, want vda, sent incrementally", pt.Disks)
	}
	if l := logs.String(); !strings.Contains(l, "by its node name") || !strings.Contains(l, "node=libvirt-2-format disk=vda") {
		t.Fatalf("a disk named by its node in `disks:` logs no advice to use its name:\n%s", l)
	}
	r.p.VM.Disks = []string{"vda"}
	if max := int64(len(touched)) * lifeboat.BlockSize; pt.Stats.BytesChanged > max {
		t.Fatalf("after the node was renamed the cycle handled %d bytes, more than the %d the writes touched: not incremental", pt.Stats.BytesChanged, max)
	}

	// An external snapshot: a new top node, which the export now serves.
	overlay := filepath.Join(dir, "vda-snap1.qcow2")
	if out, err := exec.CommandContext(ctx(t), "qemu-img", "create", "-f", "qcow2", overlay, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	m := qsd.Monitor()
	if err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "qcow2", "node-name": "snap1", "backing": nil,
		"file": map[string]any{"driver": "file", "filename": overlay}}); err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx(t), "blockdev-snapshot", map[string]any{"node": "libvirt-2-format", "overlay": "snap1"}, nil); err != nil {
		t.Fatal(err)
	}
	// Writes after the snapshot land in the new node only.
	if err := r.guest.Do(ctx(t), workload.Op{Disk: "vda", Kind: "data", Offset: 2 << 20, Length: 256 << 10}); err != nil {
		t.Fatal(err)
	}
	if err := r.guest.Do(ctx(t), workload.Op{Disk: "vda", Kind: "zero", Offset: 4 << 20, Length: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t) // the point's export equals the source: no write missed
	if len(pt.Disks) != 1 || pt.Disks[0].Name != "vda" || !pt.Disks[0].Resync {
		t.Fatalf("after an external snapshot: point disks %+v, want vda, resynchronised by hashes", pt.Disks)
	}
	if l := logs.String(); !strings.Contains(l, "external snapshot") || !strings.Contains(l, "node=snap1 old_node=libvirt-2-format") {
		t.Fatalf("the resync after the snapshot logs no reason naming the new node:\n%s", l)
	}
	// And on from there incrementally, on the new node.
	if _, err := r.guest.Mixed(ctx(t), 8); err != nil {
		t.Fatal(err)
	}
	if pt = r.cycle(t); pt.Disks[0].Name != "vda" || pt.Disks[0].Resync {
		t.Fatalf("the cycle after the resync: point disks %+v, want vda, sent incrementally", pt.Disks)
	}
	// Released: the generation on the new top is gone; the stale one the
	// snapshot left on the read-only node below it (QEMU will not change
	// it) is reported as left, with what to do.
	rel, err := r.p.Release(ctx(t), r.p.Target.Peer())
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	nodes, err := m.Nodes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			if strings.HasPrefix(b.Name, lifeboat.GenerationPrefix) && !n.ReadOnly {
				t.Errorf("after release, generation %q is left on node %q", b.Name, n.NodeName)
			}
		}
	}
	if len(rel.Removed) != 1 || len(rel.Left) != 1 || !strings.Contains(rel.Left[0], "qemu-img bitmap --remove") || !strings.Contains(rel.Left[0], "libvirt-2-format") {
		t.Errorf("release after an external snapshot reported %+v, want the top's generation removed and the read-only node's left with advice", rel)
	}
	os.Remove(overlay)
}

// vmCommand runs one QMP command on the guest's qemu-system process (its
// monitor serves one client at a time: lifeboat's cycle dials it too).
func vmCommand(t *testing.T, g *testguest.Guest, cmd string) {
	t.Helper()
	m, err := qemu.Dial(ctx(t), g.VMQMPSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Execute(ctx(t), cmd, nil, nil); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
}

// sourceHash is the sha256 of the guest's data disk as the storage daemon serves it.
func sourceHash(t *testing.T, g *testguest.Guest, size int64) string {
	t.Helper()
	return exportHash(t, g.StorageNBDSocket(), g.DiskNode(), size)
}

// Protecting a real qemu-system guest through its own QMP: its disk is named
// by its device's id ("vda"), not by its node ("nbd-vda"), and each point is
// the disk as the guest wrote it (CPUs stopped for each cycle, so the source
// can be hashed at the instant). The guest's agent is configured: with its
// CPUs stopped it cannot answer, so the cycle freezes nothing and says so in
// the point, without waiting for it (before: the whole freeze limit, each
// cycle, then a fall back).
func TestQEMUSystemGuestDiskNamedByDeviceID(t *testing.T) {
	const size = 64 << 20
	g := bootGuest(t, testguest.Options{Name: "devid", DiskSize: size})
	site := testsite.Start(t, recovery.Options{Keep: 10})
	r := &rig{site: site, disks: []workload.Disk{{Name: "vda", Size: size}}}
	p := &protect.Protector{
		VM: protect.VM{Name: "vm1", QMPSocket: g.VMQMPSocket(), WorkDir: testsite.ShortDir(t),
			// What the config adds to what QEMU tells: the disk's serial (its device has none).
			Definition: lifeboat.Definition{Source: "config", Disks: []lifeboat.DefinitionDisk{{Name: "vda", Serial: "CFG-1"}}}},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4,
	}
	const limit = 5 * time.Second
	p.Quiescer = &protect.AgentQuiescer{VM: "vm1", Socket: g.AgentSocket(), Level: lifeboat.Filesystem, Limit: limit, MarkerDir: t.TempDir()}
	for i, script := range []string{"", "dd if=/dev/urandom of=/data/devid bs=64k count=32 2>/dev/null && sync"} {
		if script != "" {
			if _, err := g.Shell(ctx(t), script); err != nil {
				t.Fatal(err)
			}
		}
		vmCommand(t, g, "stop")
		want := sourceHash(t, g, size)
		start := time.Now()
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("cycle %d: %v", i+1, err)
		}
		took := time.Since(start)
		vmCommand(t, g, "cont")
		if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, `run state "paused"`) || took >= limit {
			t.Errorf("point %d of the stopped guest: %s (%q) after %v; want crash consistent, saying its CPUs were stopped, without waiting the %v freeze limit",
				pt.ID, pt.Consistency, pt.Note, took.Round(time.Millisecond), limit)
		}
		if len(pt.Disks) != 1 || pt.Disks[0].Name != "vda" {
			t.Fatalf("point %d disks %+v: want one disk named vda, its device's id", pt.ID, pt.Disks)
		}
		if i > 0 && pt.Disks[0].Resync {
			t.Fatalf("point %d resynchronised the disk: want it sent incrementally", pt.ID)
		}
		r.checkPoint(t, pt.ID, map[string]string{"vda": want})
		checkDefinition(t, site, pt.ID)
	}
}

// checkDefinition checks that the point, as the recovery site's catalog
// holds it, says how to start the test guest: what its qemu-system was
// started with (testguest: q35, 1 vCPU, 512 MiB, a direct kernel boot, the
// data disk on virtio-blk) and the config's serial.
func checkDefinition(t *testing.T, site *testsite.Site, id uint64) {
	t.Helper()
	pt, err := site.Store.Point("vm1", id)
	if err != nil {
		t.Fatal(err)
	}
	d := pt.Definition
	if d == nil {
		t.Fatalf("point %d carries no VM definition", id)
	}
	kernel, _, err := testguest.Kernel()
	if err != nil {
		t.Fatal(err)
	}
	if d.Source != "qmp+config" || !strings.HasPrefix(d.Machine, "pc-q35-") || d.CPUs != 1 || d.MemoryMiB != 512 ||
		d.Kernel != kernel || !strings.Contains(d.Append, "console=ttyS0") {
		t.Errorf("point %d definition %+v: want qmp+config, pc-q35-*, 1 vCPU, 512 MiB, kernel %s", id, *d, kernel)
	}
	want := []lifeboat.DefinitionDisk{{Name: "vda", Device: "virtio-blk-pci", Serial: "CFG-1"}}
	if !reflect.DeepEqual(d.Disks, want) {
		t.Errorf("point %d definition disks %+v, want %+v", id, d.Disks, want)
	}
}

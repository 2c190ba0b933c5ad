package qemu_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestDisksOnStorageDaemon(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 8 << 20},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 4 << 20},
		testvm.DiskSpec{Name: "old", Format: "qcow2", Size: 1 << 20, Compat: "0.10"},
	)
	m, ctx := vm.Monitor(), testCtx(t)
	// A read-only node and one of lifeboat's own must not count as disks.
	if err := m.BlockdevAdd(ctx, map[string]any{"driver": "raw", "node-name": "cdrom", "read-only": true,
		"file": map[string]any{"driver": "file", "filename": vm.ImagePath("vdb"), "read-only": true}}); err != nil {
		t.Fatal(err)
	}
	if err := m.BlockdevAdd(ctx, map[string]any{"driver": "null-co", "node-name": qemu.OwnPrefix + "x", "size": 1 << 20}); err != nil {
		t.Fatal(err)
	}
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := diskNames(disks); got != "old,vda,vdb" {
		t.Fatalf("Disks() = %s, want old,vda,vdb", got)
	}
	want := []qemu.BlockNode{
		{Name: "old", NodeName: "old", Driver: "qcow2", Filename: vm.ImagePath("old"), Size: 1 << 20, Compat: "0.10"},
		{Name: "vda", NodeName: "vda", Driver: "qcow2", Filename: vm.ImagePath("vda"), Size: 8 << 20, Compat: "1.1"},
		{Name: "vdb", NodeName: "vdb", Driver: "raw", Filename: vm.ImagePath("vdb"), Size: 4 << 20},
	}
	for i, w := range want {
		g := disks[i]
		if g.Name != w.Name || g.NodeName != w.NodeName || g.Driver != w.Driver || g.Filename != w.Filename || g.Size != w.Size || g.Compat != w.Compat || g.ReadOnly {
			t.Errorf("disk %d = %+v, want %+v", i, g, w)
		}
	}
	if disks[0].PersistentBitmaps() || !disks[1].PersistentBitmaps() || disks[2].PersistentBitmaps() {
		t.Error("PersistentBitmaps: want only the qcow2 v3 disk to keep bitmaps")
	}
}

func TestNodeNotFoundListsNodes(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	_, err := vm.Monitor().Node(testCtx(t), "vdx")
	if err == nil || !strings.Contains(err.Error(), `"vdx"`) || !strings.Contains(err.Error(), "vda") {
		t.Errorf("Node(vdx) error = %v; want it to name vdx and list vda", err)
	}
}

// disksOf is "name=node" of every disk, sorted by name.
func disksOf(t *testing.T, ctx context.Context, m *qemu.Monitor) string {
	t.Helper()
	disks, err := m.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, d := range disks {
		s = append(s, d.Name+"="+d.NodeName)
	}
	return strings.Join(s, ",")
}

// A qemu-storage-daemon's disk is named by the id of the export serving it, so
// a restart that gives its nodes other names, or an external snapshot that puts
// a new node on top, leaves the name alone. A node no export serves is no disk.
func TestDiskNamesOnStorageDaemonSurviveNodeRenames(t *testing.T) {
	testenv.RequireTools(t, "qemu-storage-daemon", "qemu-img")
	dir := shortTempDir(t)
	ctx := testCtx(t)
	img := map[string]string{"web": filepath.Join(dir, "web.qcow2"), "db": filepath.Join(dir, "db.raw"), "spare": filepath.Join(dir, "spare.qcow2")}
	for _, n := range []string{"web", "spare"} {
		if err := qemu.CreateImage(ctx, img[n], "qcow2", 4<<20, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	if err := qemu.CreateImage(ctx, img["db"], "raw", 2<<20, "", ""); err != nil {
		t.Fatal(err)
	}
	start := func(gen string) *qemu.Daemon {
		var args []string
		for _, d := range []struct{ export, image, format string }{{"web", img["web"], "qcow2"}, {"db", img["db"], "raw"}, {"", img["spare"], "qcow2"}} {
			node := "libvirt-" + gen + "-" + filepath.Base(d.image)
			args = append(args, "--blockdev", `{"driver":"`+d.format+`","node-name":"`+node+`","file":{"driver":"file","filename":"`+d.image+`"}}`)
			if d.export != "" {
				args = append(args, "--export", `{"type":"nbd","id":"`+d.export+`","node-name":"`+node+`","name":"nbd-`+d.export+`","writable":true}`)
			}
		}
		qsd, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, NBD: true, Args: args})
		if err != nil {
			t.Fatal(err)
		}
		return qsd
	}
	qsd := start("1")
	if got, want := disksOf(t, ctx, qsd.Monitor()), "db=libvirt-1-db.raw,web=libvirt-1-web.qcow2"; got != want {
		t.Errorf("Disks() = %s, want %s", got, want)
	}
	if err := qsd.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	qsd = start("2")
	t.Cleanup(func() { qsd.Stop(context.Background()) })
	m := qsd.Monitor()
	if got, want := disksOf(t, ctx, m), "db=libvirt-2-db.raw,web=libvirt-2-web.qcow2"; got != want {
		t.Errorf("after a restart with new node names: Disks() = %s, want %s", got, want)
	}
	// An external snapshot: the export now serves the new top node.
	snapshot(t, ctx, m, "libvirt-2-web.qcow2", "snap1", filepath.Join(dir, "web-snap1.qcow2"))
	if got, want := disksOf(t, ctx, m), "db=libvirt-2-db.raw,web=snap1"; got != want {
		t.Errorf("after an external snapshot: Disks() = %s, want %s", got, want)
	}
}

// In a qemu-storage-daemon every export not lifeboat's serves a disk, but for
// another tool's pull backup: its scratch node, exported too, is a view of a
// disk (its backing is the disk's node), during the backup job and after it
// ends while the export lingers. A push backup's target is exported by no one.
func TestDisksDuringBackupsOnStorageDaemon(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 4 << 20},
		testvm.DiskSpec{Name: "vdb", Format: "raw", Size: 2 << 20},
		testvm.DiskSpec{Name: "vdc", Format: "qcow2", Size: 2 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	const want = "vda=vda,vdb=vdb,vdc=vdc"
	pulls := []*testvm.Backup{
		testvm.PullBackup(t, m, "vda", vm.Dir, "backup-vda", ""),
		testvm.PullBackup(t, m, "vdb", vm.Dir, "backup-vdb", ""),
	}
	testvm.PushBackup(t, m, "vdc", vm.Dir)
	if got := disksOf(t, ctx, m); got != want {
		t.Errorf("during pull backups of vda and vdb and a push backup of vdc: Disks() = %s, want %s", got, want)
	}
	for _, b := range pulls {
		if err := m.CancelJob(ctx, b.Job); err != nil {
			t.Fatal(err)
		}
	}
	if got := disksOf(t, ctx, m); got != want {
		t.Errorf("with the pull backups' jobs ended but their scratch nodes still exported: Disks() = %s, want %s", got, want)
	}
}

// snapshot is an external snapshot of node as a management tool takes it
// (blockdev-add of an overlay, then blockdev-snapshot): top is the new node.
func snapshot(t *testing.T, ctx context.Context, m *qemu.Monitor, node, top, file string) {
	t.Helper()
	n, err := m.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	// The overlay has no backing file yet: blockdev-snapshot makes node its backing.
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-f", "qcow2", file, fmt.Sprint(n.Size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	if err := m.BlockdevAdd(ctx, map[string]any{"driver": "qcow2", "node-name": top, "backing": nil,
		"file": map[string]any{"driver": "file", "filename": file}}); err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx, "blockdev-snapshot", map[string]any{"node": node, "overlay": top}, nil); err != nil {
		t.Fatal(err)
	}
}

func shortTempDir(t *testing.T) string {
	t.Helper()
	// t.TempDir() paths can outgrow the 107 bytes of a unix socket path.
	dir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// In a qemu-system a disk is a block device, named by its qdev id: libvirt's
// renumbering of node names at a restart and an external snapshot leave the
// name alone. A device without an id is named by its node, a -drive by its id;
// a read-only device, a node no device uses, a -drive no device uses, and
// another tool's pull backup (a copy-before-write filter in front of the disk,
// a scratch node exported over NBD) and push backup (a target node) are no
// disks, and the disk is still found behind the filters.
func TestDiskNamesOnQEMUSystem(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img")
	dir := shortTempDir(t)
	ctx := testCtx(t)
	img := func(n string) string { return filepath.Join(dir, n+".qcow2") }
	for _, n := range []string{"os", "data", "anon", "legacy", "loose", "orphan"} {
		if err := qemu.CreateImage(ctx, img(n), "qcow2", 2<<20, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	args := func(gen int) []string {
		node := func(i int) string { return fmt.Sprintf("libvirt-%d-format", gen*10+i) }
		blockdev := func(i int, image string) string {
			return fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"file":{"driver":"file","filename":%q,"node-name":"libvirt-%d-storage"}}`, node(i), image, gen*10+i)
		}
		return []string{
			"-blockdev", blockdev(1, img("os")), "-device", "virtio-blk-pci,drive=" + node(1) + ",id=virtio-disk0",
			"-blockdev", blockdev(2, img("data")), "-device", "virtio-blk-pci,drive=" + node(2) + ",id=virtio-disk1",
			"-blockdev", blockdev(3, img("anon")), "-device", "virtio-blk-pci,drive=" + node(3),
			"-blockdev", blockdev(4, img("loose")), // no device
			"-drive", "file=" + img("legacy") + ",if=none,id=drive-sata0-0-0", "-device", "ide-hd,drive=drive-sata0-0-0,bus=ide.0",
			"-drive", "file=" + img("orphan") + ",if=none,id=drive-orphan", // no device
			"-blockdev", `{"driver":"null-co","node-name":"cd0","read-only":true}`, "-device", "virtio-blk-pci,drive=cd0,id=cdrom0",
		}
	}
	vm := testvm.StartSystem(t, dir, args(1)...)
	got := disksOf(t, ctx, vm.Monitor())
	// The -drive's node has an automatic name (#blockNNN): check the rest.
	legacy, rest, _ := strings.Cut(got, ",")
	if !strings.HasPrefix(legacy, "drive-sata0-0-0=#block") {
		t.Errorf("Disks() = %s: want the -drive named drive-sata0-0-0", got)
	}
	if want := "libvirt-13-format=libvirt-13-format,virtio-disk0=libvirt-11-format,virtio-disk1=libvirt-12-format"; rest != want {
		t.Errorf("Disks() = %s, want drive-sata0-0-0=#block...,%s", got, want)
	}
	vm.Stop()

	// libvirt starts the VM again and numbers the nodes differently.
	m := testvm.StartSystem(t, dir, args(2)...).Monitor()
	_, rest, _ = strings.Cut(disksOf(t, ctx, m), ",")
	if want := "libvirt-23-format=libvirt-23-format,virtio-disk0=libvirt-21-format,virtio-disk1=libvirt-22-format"; rest != want {
		t.Errorf("after a restart with new node names: Disks() = ...,%s, want ...,%s", rest, want)
	}

	// An external snapshot of virtio-disk1: a new top node.
	snapshot(t, ctx, m, "libvirt-22-format", "libvirt-30-format", filepath.Join(dir, "data-snap.qcow2"))
	// Another tool's backups: a pull backup of virtio-disk0, a push backup of virtio-disk1.
	testvm.PullBackup(t, m, "libvirt-21-format", dir, "vda", filepath.Join(dir, "backup.sock"))
	testvm.PushBackup(t, m, "libvirt-30-format", dir)
	_, rest, _ = strings.Cut(disksOf(t, ctx, m), ",")
	if want := "libvirt-23-format=libvirt-23-format,virtio-disk0=libvirt-21-format,virtio-disk1=libvirt-30-format"; rest != want {
		t.Errorf("after an external snapshot and during another tool's backup: Disks() = ...,%s, want ...,%s", rest, want)
	}
}

func TestFindDisk(t *testing.T) {
	disks := []qemu.BlockNode{{Name: "virtio-disk0", NodeName: "libvirt-1-format"}, {Name: "virtio-disk1", NodeName: "libvirt-2-format"}}
	for _, tc := range []struct {
		name, want string
		byNode     bool
	}{
		{"virtio-disk1", "libvirt-2-format", false},
		{"libvirt-1-format", "libvirt-1-format", true},
	} {
		d, byNode, err := qemu.FindDisk(disks, tc.name)
		if err != nil || d.NodeName != tc.want || byNode != tc.byNode {
			t.Errorf("FindDisk(%q) = %s, %v, %v; want node %s, byNode %v", tc.name, d.NodeName, byNode, err, tc.want, tc.byNode)
		}
	}
	_, _, err := qemu.FindDisk(disks, "vdz")
	if err == nil || !strings.Contains(err.Error(), `"vdz"`) || !strings.Contains(err.Error(), "virtio-disk0 (node libvirt-1-format)") {
		t.Errorf("FindDisk(vdz) error = %v; want it to name vdz and list the disks with their nodes", err)
	}
}

// A device without an id is named after its node; if that is another
// device's id, Disks says so rather than give two disks one name.
func TestDiskNamesCollide(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	dir := shortTempDir(t)
	ctx := testCtx(t)
	m := testvm.StartSystem(t, dir,
		"-blockdev", `{"driver":"null-co","node-name":"vda"}`, "-device", "virtio-blk-pci,drive=vda",
		"-blockdev", `{"driver":"null-co","node-name":"other"}`, "-device", "virtio-blk-pci,drive=other,id=vda").Monitor()
	_, err := m.Disks(ctx)
	if err == nil || !strings.Contains(err.Error(), `"vda"`) || !strings.Contains(err.Error(), "id=NAME") {
		t.Fatalf("Disks() error = %v; want it to name vda and say to give the device an id", err)
	}
}

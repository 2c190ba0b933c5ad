package qemu_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

// startQEMUSystem starts a real qemu-system-x86_64 (q35, CPUs stopped: its
// block layer and devices answer QMP like a running VM's, no guest needed)
// and returns its monitor; the process ends with the test or with stop.
func startQEMUSystem(t *testing.T, ctx context.Context, dir string, args ...string) (m *qemu.Monitor, stop func()) {
	t.Helper()
	testenv.RequireTools(t, "qemu-system-x86_64")
	sock := filepath.Join(dir, "vm-qmp.sock")
	os.Remove(sock)
	cmd := exec.Command("qemu-system-x86_64", append([]string{"-M", "q35", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stopped := false
	stop = func() {
		if m != nil {
			m.Close()
		}
		if !stopped {
			stopped = true
			cmd.Process.Kill()
			<-exited
		}
	}
	t.Cleanup(stop)
	var err error
	for deadline := time.Now().Add(10 * time.Second); m == nil; {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		m, err = qemu.Dial(dctx, sock)
		cancel()
		if err != nil {
			select {
			case <-exited:
				t.Fatalf("qemu-system-x86_64 exited: %s", stderr.String())
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("qemu-system-x86_64 QMP never answered: %v", err)
			}
		}
	}
	return m, stop
}

// In a qemu-system a disk is a block device, named by its qdev id: libvirt's
// renumbering of node names at a restart and an external snapshot leave the
// name alone. A device without an id is named by its node, a -drive by its id;
// a read-only device, a node no device uses, and another tool's pull backup
// (a copy-before-write filter in front of the disk, a scratch node exported
// over NBD) are no disks, and the disk is still found behind the filter.
func TestDiskNamesOnQEMUSystem(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img")
	dir := shortTempDir(t)
	ctx := testCtx(t)
	img := func(n string) string { return filepath.Join(dir, n+".qcow2") }
	for _, n := range []string{"os", "data", "anon", "legacy", "loose"} {
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
			"-blockdev", `{"driver":"null-co","node-name":"cd0","read-only":true}`, "-device", "virtio-blk-pci,drive=cd0,id=cdrom0",
		}
	}
	m, stop := startQEMUSystem(t, ctx, dir, args(1)...)
	got := disksOf(t, ctx, m)
	// The -drive's node has an automatic name (#blockNNN): check the rest.
	legacy, rest, _ := strings.Cut(got, ",")
	if !strings.HasPrefix(legacy, "drive-sata0-0-0=#block") {
		t.Errorf("Disks() = %s: want the -drive named drive-sata0-0-0", got)
	}
	if want := "libvirt-13-format=libvirt-13-format,virtio-disk0=libvirt-11-format,virtio-disk1=libvirt-12-format"; rest != want {
		t.Errorf("Disks() = %s, want drive-sata0-0-0=#block...,%s", got, want)
	}
	stop()

	// libvirt starts the VM again and numbers the nodes differently.
	m, _ = startQEMUSystem(t, ctx, dir, args(2)...)
	_, rest, _ = strings.Cut(disksOf(t, ctx, m), ",")
	if want := "libvirt-23-format=libvirt-23-format,virtio-disk0=libvirt-21-format,virtio-disk1=libvirt-22-format"; rest != want {
		t.Errorf("after a restart with new node names: Disks() = ...,%s, want ...,%s", rest, want)
	}

	// An external snapshot of virtio-disk1: a new top node.
	snapshot(t, ctx, m, "libvirt-22-format", "libvirt-30-format", filepath.Join(dir, "data-snap.qcow2"))
	// A pull backup of virtio-disk0 by another tool: scratch node, backup job
	// (its copy-before-write filter goes in front of the disk), NBD export.
	scratch := filepath.Join(dir, "scratch.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-f", "qcow2", scratch, "2M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	for _, c := range []struct {
		cmd  string
		args map[string]any
	}{
		{"blockdev-add", map[string]any{"driver": "qcow2", "node-name": "backup-vda", "backing": "libvirt-21-format",
			"file": map[string]any{"driver": "file", "filename": scratch}}},
		{"blockdev-backup", map[string]any{"device": "libvirt-21-format", "target": "backup-vda", "sync": "none", "job-id": "backup-vda"}},
		{"nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": filepath.Join(dir, "backup.sock")}}}},
		{"block-export-add", map[string]any{"type": "nbd", "id": "backup-vda", "node-name": "backup-vda", "name": "vda"}},
	} {
		if err := m.Execute(ctx, c.cmd, c.args, nil); err != nil {
			t.Fatalf("%s: %v", c.cmd, err)
		}
	}
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
	m, _ := startQEMUSystem(t, ctx, dir,
		"-blockdev", `{"driver":"null-co","node-name":"vda"}`, "-device", "virtio-blk-pci,drive=vda",
		"-blockdev", `{"driver":"null-co","node-name":"other"}`, "-device", "virtio-blk-pci,drive=other,id=vda")
	_, err := m.Disks(ctx)
	if err == nil || !strings.Contains(err.Error(), `"vda"`) || !strings.Contains(err.Error(), "id=NAME") {
		t.Fatalf("Disks() error = %v; want it to name vda and say to give the device an id", err)
	}
}

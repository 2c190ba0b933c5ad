package virt_test

// A protected domain whose disks change under lifeboat: images swapped
// between targets, disks resized before the instant. protect/topology_test.go
// tries the same on the QMP path.

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// patterned makes a qcow2 image of size bytes whose guest-visible content
// is byte b over [off, off+n): a data disk with data of its own.
func patterned(t *testing.T, size, off, n int64, b byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", path, itoa(size)},
		{"qemu-io", "-f", "qcow2", "-c", "write -P " + itoa(int64(b)) + " " + itoa(off) + " " + itoa(n), path},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return path
}

// The bus and target a disk is hot-plugged on: the test domain (q35) has
// no free PCI slot for a virtio disk, and a USB disk needs none.
const liveBus, liveTarget = "usb", "sda"

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// defineAgain defines the (shut off) domain again from its inactive XML
// with every old in it replaced by its new.
func defineAgain(t *testing.T, dom *testlibvirt.Domain, oldnew ...string) {
	t.Helper()
	doc, err := testlibvirt.Virsh("dumpxml", dom.Name, "--inactive")
	if err != nil {
		t.Fatal(err)
	}
	doc = strings.NewReplacer(oldnew...).Replace(doc)
	f := filepath.Join(t.TempDir(), "domain.xml")
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("define", f); err != nil {
		t.Fatal(err)
	}
}

// exactDisks checks each disk of point pt against the image its target
// reads now (the domain stopped, or the disk not written since pt).
func (r *libvirtRig) exactDisks(t *testing.T, pt lifeboat.Point, targets ...string) {
	t.Helper()
	for _, target := range targets {
		image := r.activeImage(t, target)
		if got, want := r.pointHash(t, pt.ID, target), imageHash(t, image); got != want {
			t.Errorf("point %d disk %s: sha256 %s, its image %s: %s", pt.ID, target, got[:12], image, want[:12])
		}
	}
}

// Two data disks' images swapped between cycles: the domain defined again
// with vdb's and vdc's sources exchanged (a hand-edited XML, a rebuild from
// a template). libvirt gives a checkpoint's bitmap one name on every disk
// and validates it on whichever image a target reads, so before, each disk
// went on incrementally from the other image's bitmap and its point kept its
// old blocks (not byte-exact). The images a checkpoint was made on are now
// recorded with it: the swapped disks are resynchronised by hashes, saying
// why, every point is byte-exact, and the cycle after is incremental again.
func TestLibvirtDiskImagesSwappedBetweenCycles(t *testing.T) {
	const size = 8 << 20
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 << 20},
		{Target: "vdb", Size: size, From: patterned(t, size, 0, 3<<20, 0x11)},
		{Target: "vdc", Size: size, From: patterned(t, size, 2<<20, 5<<20, 0x22)},
	}})
	first := r.cycle(t)
	r.exactDisks(t, first, "vdb", "vdc")

	r.dom.Destroy() // SIGTERM: QEMU saves the checkpoint's bitmaps in both images
	b, c := r.dom.Image("vdb"), r.dom.Image("vdc")
	defineAgain(t, r.dom, b, c, c, b)
	r.dom.Start()
	if got := r.activeImage(t, "vdb"); got != c {
		t.Fatalf("after the swap vdb reads %s, want %s", got, c)
	}
	pt := r.cycle(t)
	for _, target := range []string{"vdb", "vdc"} {
		if d := diskOf(t, pt, target); !d.Resync {
			t.Errorf("point %d: %s, now another disk's image, was sent incrementally from the bitmap that image carries: %+v", pt.ID, target, d)
		}
	}
	if d := diskOf(t, pt, "vda"); d.Resync {
		t.Errorf("point %d: vda, untouched, was resynchronised: %+v", pt.ID, d)
	}
	r.exactDisks(t, pt, "vdb", "vdc")

	next := r.cycle(t)
	for _, target := range []string{"vda", "vdb", "vdc"} {
		if d := diskOf(t, next, target); d.Resync {
			t.Errorf("point %d, the cycle after: %s was resynchronised again: %+v", next.ID, target, d)
		}
	}
	r.exactDisks(t, next, "vdb", "vdc")
}

// checkFailedLeftNothing: after a failed cycle the domain runs no job of
// lifeboat's, its scratch files are gone, and libvirt shows no checkpoint.
func (r *libvirtRig) checkFailedLeftNothing(t *testing.T) {
	t.Helper()
	r.checkLeftNothing(t)
	if out, _ := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name"); strings.TrimSpace(out) != "" {
		t.Errorf("after the cycle libvirt shows checkpoints: %s", out)
	}
}

// A disk grown after the cycle resolved it and made its scratch file, right
// before the backup begins: the cycle fails naming the domain and the disk
// (or takes no point of the old size), libvirt and lifeboat's directory keep
// nothing of it, and the next cycle resyncs the disk at its new size,
// byte-exact.
func TestLibvirtDiskResizedBeforeTheInstant(t *testing.T) {
	const size, grown = 8 << 20, 12 << 20
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 << 20},
		{Target: "vdb", Size: size, From: patterned(t, size, 0, 3<<20, 0x11)},
	}})
	r.cycle(t)
	r.p.Quiescer = &hook{f: func() {
		if _, err := testlibvirt.Virsh("blockresize", r.dom.Name, "vdb", itoa(grown)+"B"); err != nil {
			t.Errorf("virsh blockresize before the instant: %v", err)
		}
	}}
	pt, err := r.p.Cycle(ctx(t))
	t.Logf("cycle with vdb grown before its instant: point %d, %v", pt.ID, err)
	if err == nil {
		if d := diskOf(t, pt, "vdb"); d.Size != grown || !d.Resync {
			t.Errorf("point %d holds vdb %+v; want no point, or vdb resynchronised at %d bytes", pt.ID, d, grown)
		}
	} else if !strings.Contains(err.Error(), r.dom.Name) || !strings.Contains(err.Error(), "vdb") {
		t.Errorf("cycle with vdb grown before its instant: %v; want an error naming the domain and vdb", err)
	}
	r.checkFailedLeftNothing(t)
	r.p.Quiescer = nil
	next := r.cycle(t)
	if d := diskOf(t, next, "vdb"); d.Size != grown || (err != nil && !d.Resync) {
		t.Errorf("the cycle after: vdb %+v; want it resynchronised at %d bytes", d, grown)
	}
	r.exactDisks(t, next, "vdb")
}

// The domain renamed while shut off (`virsh domrename`), then undefined and
// defined again under its name from its XML without its UUID (another
// domain to libvirt, on the same images). Renamed, a cycle of the old name
// fails naming it and saying what to check; with the config following the
// new name, the disk goes on incrementally (its images carry their history).
// The domain defined again goes on incrementally too, from the same images,
// and the points are byte-exact.
func TestLibvirtDomainRenamedAndDefinedAgain(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	first := r.cycle(t)

	r.dom.Destroy()
	old, renamed := r.dom.Name, r.dom.Name+"0" // still a name testlibvirt sweeps
	if _, err := testlibvirt.Virsh("domrename", old, renamed); err != nil {
		t.Fatal(err)
	}
	r.dom.Name = renamed
	r.dom.Start()
	if _, err := r.p.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), old) || !strings.Contains(err.Error(), "list --all") {
		t.Errorf("cycle of the renamed domain under its old name: %v; want it refused, naming the domain and how to find it", err)
	}
	r.checkLeftNothing(t)
	r.p.VM.Libvirt.Domain = renamed
	pt := r.cycle(t)
	if d := diskOf(t, pt, "vda"); d.Resync || d.BaseGeneration != diskOf(t, first, "vda").Generation {
		t.Errorf("after the rename: vda %+v, want incremental from point %d", d, first.ID)
	}

	r.dom.Destroy()
	doc, err := testlibvirt.Virsh("dumpxml", renamed, "--inactive")
	if err != nil {
		t.Fatal(err)
	}
	uuid, err := testlibvirt.Virsh("domuuid", renamed)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("undefine", renamed, "--checkpoints-metadata"); err != nil {
		t.Fatal(err)
	}
	doc = strings.Replace(doc, "<uuid>"+strings.TrimSpace(uuid)+"</uuid>", "", 1)
	f := filepath.Join(t.TempDir(), "domain.xml")
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("define", f); err != nil {
		t.Fatal(err)
	}
	if now, _ := testlibvirt.Virsh("domuuid", renamed); strings.TrimSpace(now) == strings.TrimSpace(uuid) {
		t.Fatalf("the domain defined again kept UUID %s", now)
	}
	r.dom.Start()
	again := r.cycle(t)
	if d := diskOf(t, again, "vda"); d.Resync {
		t.Errorf("the domain defined again on the same images: vda %+v, want incremental", d)
	}
	r.exactNow(t, nil, r.p)
}

// A disk moved to a new image while the guest writes: `virsh blockcopy
// --pivot` (libvirt copies the bitmaps into the destination), then an
// external snapshot, a cycle, and `virsh blockpull` (the layer below pulled
// up into the new top). Every point is byte-exact; the copy's destination is
// an image new to the disk, which proves nothing, so that cycle resyncs,
// while the pull keeps the top it had and stays incremental.
func TestLibvirtDiskBlockCopiedAndPulled(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	r.cycle(t)
	r.cycle(t)
	dest := filepath.Join(r.dom.Dir, "vda.copy.qcow2")
	if _, err := testlibvirt.Virsh("blockcopy", r.dom.Name, "vda", "--dest", dest, "--format", "qcow2", "--transient-job", "--pivot", "--wait", "--timeout", "120"); err != nil {
		t.Fatal(err)
	}
	if got := r.activeImage(t, "vda"); got != dest {
		t.Fatalf("after blockcopy --pivot vda reads %s, want %s", got, dest)
	}
	time.Sleep(300 * time.Millisecond)
	pt := r.cycle(t)
	t.Logf("after blockcopy: %+v", diskOf(t, pt, "vda"))
	if d := diskOf(t, pt, "vda"); !d.Resync {
		t.Errorf("after blockcopy vda was sent incrementally from the bitmap its new image carries: %+v", d)
	}
	r.exactNow(t, nil, r.p)
	r.dom.Start()
	r.cycle(t)

	overlay := filepath.Join(r.dom.Dir, "vda.snap1.qcow2")
	if _, err := testlibvirt.Virsh("snapshot-create-as", r.dom.Name, "snap1", "--disk-only", "--atomic", "--no-metadata",
		"--diskspec", "vda,snapshot=external,file="+overlay); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	if _, err := testlibvirt.Virsh("blockpull", r.dom.Name, "vda", "--wait", "--timeout", "120"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	pt = r.cycle(t)
	t.Logf("after blockpull: %+v", diskOf(t, pt, "vda"))
	if d := diskOf(t, pt, "vda"); d.Resync {
		t.Errorf("after blockpull vda was resynchronised: %+v", d)
	}
	r.exactNow(t, nil, r.p)
}

// A disk attached to the running domain only (`virsh attach-disk` without
// --config, virsh's default for a running domain) is replicated from the
// next cycle, and the point's definition, from which a failover defines the
// domain, holds it. Before, the definition was the inactive XML alone: a
// failover from the point started the domain without the disk, its overlay
// made and left unused, and nothing said so.
func TestLibvirtDiskAttachedLiveOnly(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	r.cycle(t)
	img := filepath.Join(r.dom.Dir, "data.qcow2") // where QEMU's user can reach it
	if err := os.Rename(patterned(t, 8<<20, 1<<20, 2<<20, 0x33), img); err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("attach-disk", r.dom.Name, img, liveTarget, "--driver", "qemu", "--subdriver", "qcow2", "--targetbus", liveBus); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	if d := diskOf(t, pt, liveTarget); !d.Resync || d.Size != 8<<20 {
		t.Errorf("point %d: the disk attached live: %+v, want it sent whole", pt.ID, d)
	}
	r.exactDisks(t, pt, liveTarget)
	stored, err := r.site.Store.Point(r.p.VM.Name, pt.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Definition == nil {
		t.Fatalf("point %d carries no definition", pt.ID)
	}
	t.Logf("point %d's definition: note %q", pt.ID, stored.Definition.Note)
	doc, dropped, err := virt.RecoveredXML(stored.Definition.DomainXML, virt.Recovered{Name: "recovered",
		Overlays: map[string]string{"vda": "/recovery/vda.qcow2", liveTarget: "/recovery/data.qcow2"}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(doc, "/recovery/data.qcow2") || len(dropped) != 0 {
		t.Errorf("a failover from point %d would define the domain without %s, which the point holds (left out: %q):\n%s", pt.ID, liveTarget, dropped, doc)
	}
}

// hook is a Quiescer that runs f where a freeze comes (once the cycle has
// resolved the disks and made their scratch files, right before the backup
// begins), once.
type hook struct {
	f    func()
	done bool
}

func (h *hook) Freeze(context.Context) (*protect.Frozen, error) {
	if !h.done {
		h.done = true
		h.f()
	}
	return &protect.Frozen{Level: lifeboat.Crash, Note: "test: nothing frozen"}, nil
}

// attachLive plugs image (moved where QEMU's user reaches it) into the
// running domain as USB disk target.
func (r *libvirtRig) attachLive(t *testing.T, image, target string) {
	t.Helper()
	img := filepath.Join(r.dom.Dir, target+".qcow2")
	if err := os.Rename(image, img); err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("attach-disk", r.dom.Name, img, target, "--driver", "qemu", "--subdriver", "qcow2", "--targetbus", liveBus); err != nil {
		t.Fatal(err)
	}
}

// Disks plugged into and out of the running domain during a cycle, before
// its backup begins: a disk unplugged fails the cycle naming it, leaving
// nothing in libvirt or lifeboat's directory, and the next cycle takes the
// domain without it; a disk plugged in is in no point of that cycle (libvirt
// backs up and checkpoints only the disks the cycle names) and is sent whole
// by the next. Every point is byte-exact.
func TestLibvirtDisksPluggedDuringACycle(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	r.attachLive(t, patterned(t, 8<<20, 0, 2<<20, 0x44), "sda")
	r.cycle(t)

	r.p.Quiescer = &hook{f: func() {
		if _, err := testlibvirt.Virsh("detach-disk", r.dom.Name, "sda", "--live"); err != nil {
			t.Errorf("detach sda before the instant: %v", err)
		}
	}}
	_, err := r.p.Cycle(ctx(t))
	t.Logf("cycle with sda unplugged before its instant: %v", err)
	if err == nil || !strings.Contains(err.Error(), "sda") {
		t.Errorf("cycle with sda unplugged before its instant: %v; want it to fail naming sda", err)
	}
	r.checkFailedLeftNothing(t)
	r.p.Quiescer = nil
	pt := r.cycle(t)
	if slices.ContainsFunc(pt.Disks, func(d lifeboat.PointDisk) bool { return d.Name == "sda" }) {
		t.Errorf("point %d holds sda, unplugged", pt.ID)
	}

	data := patterned(t, 8<<20, 1<<20, 3<<20, 0x55)
	r.p.Quiescer = &hook{f: func() { r.attachLive(t, data, "sdb") }}
	pt = r.cycle(t)
	if slices.ContainsFunc(pt.Disks, func(d lifeboat.PointDisk) bool { return d.Name == "sdb" }) {
		t.Errorf("point %d holds sdb, plugged in after the cycle resolved the disks", pt.ID)
	}
	r.p.Quiescer = nil
	pt = r.cycle(t)
	if d := diskOf(t, pt, "sdb"); !d.Resync {
		t.Errorf("point %d: sdb %+v, want it sent whole", pt.ID, d)
	}
	r.exactDisks(t, pt, "sdb")
	if d := diskOf(t, pt, "vda"); d.Resync {
		t.Errorf("point %d: vda resynchronised: %+v", pt.ID, d)
	}
}

// `virsh blockresize` while a cycle reads the backup is refused (the
// backup's copy-before-write holds the disk's size), the point commits
// byte-exact at the size of its instant; and a disk detached between cycles
// (its checkpoint's record still naming it) leaves the others incremental,
// and is in no later point. The checkpoint deleted at that point's commit
// leaves its bitmap in the detached disk's image (libvirt deletes it only
// from the domain's disks), recording for good: the cycle names the image
// and the command that removes it (before, it said nothing).
func TestLibvirtDiskResizedWhileReadAndDetachedBetweenCycles(t *testing.T) {
	const size = 8 << 20
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 << 20},
		{Target: "vdb", Size: size, From: patterned(t, size, 0, 3<<20, 0x11)},
	}})
	first := r.cycle(t)
	var resizeErr error
	r.p.Hooks.AfterInstant = func(context.Context) error {
		_, resizeErr = testlibvirt.Virsh("blockresize", r.dom.Name, "vdb", "12M")
		return nil
	}
	pt := r.cycle(t)
	r.p.Hooks = protect.Hooks{}
	t.Logf("virsh blockresize while the cycle read: %v", resizeErr)
	if resizeErr == nil {
		t.Errorf("virsh blockresize of vdb while the cycle read its backup was taken; point %d: %+v", pt.ID, diskOf(t, pt, "vdb"))
	}
	if d := diskOf(t, pt, "vdb"); d.Size != size {
		t.Errorf("point %d: vdb %+v, want %d bytes", pt.ID, d, size)
	}
	r.exactDisks(t, pt, "vdb")

	r.dom.Destroy()
	if _, err := testlibvirt.Virsh("detach-disk", r.dom.Name, "vdb", "--config"); err != nil {
		t.Fatal(err)
	}
	r.dom.Start()
	var log bytes.Buffer
	r.p.Log = slog.New(slog.NewTextHandler(io.MultiWriter(&log, os.Stderr), nil))
	pt = r.cycle(t)
	r.p.Log = nil
	if slices.ContainsFunc(pt.Disks, func(d lifeboat.PointDisk) bool { return d.Name == "vdb" }) {
		t.Errorf("point %d holds vdb, detached", pt.ID)
	}
	// The base checkpoint, deleted at the commit, tracked vdb too: libvirt
	// deletes its bitmap only from the domain's disks.
	left := imageBitmaps(t, r.dom.Image("vdb"))
	if !slices.ContainsFunc(left, isGeneration) {
		t.Errorf("the detached vdb's image holds bitmaps %q, none of lifeboat's: nothing to say", left)
	}
	if !strings.Contains(log.String(), "qemu-img bitmap --remove "+r.dom.Image("vdb")) {
		t.Errorf("the cycle deleted the checkpoint that left bitmaps %q in the detached vdb's image %s without naming the image and how to remove them; log:\n%s", left, r.dom.Image("vdb"), log.String())
	}
	if d := diskOf(t, pt, "vda"); d.Resync {
		t.Errorf("point %d: vda resynchronised after vdb was detached: %+v", pt.ID, d)
	}
	r.exactNow(t, nil, r.p)
	// Point 1 still holds vdb as it was.
	if got, want := r.pointHash(t, first.ID, "vdb"), imageHash(t, r.dom.Image("vdb")); got != want {
		t.Errorf("point %d: vdb sha256 %s, its image %s", first.ID, got[:12], want[:12])
	}
}

// A consistency group whose member's disk is resized right before the
// group's instant: the group's cycle fails naming the member and the disk,
// neither domain keeps a job, scratch file or shown checkpoint, libvirtd
// keeps running (before the size check it crashed on such a begin), and
// the next group cycle resyncs the disk at its new size, the other member
// incremental.
func TestLibvirtGroupMemberDiskResizedBeforeTheInstant(t *testing.T) {
	const size, grown = 8 << 20, 12 << 20
	web := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	db := web.member(t, "db1", testlibvirt.Options{Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 << 20},
		{Target: "vdb", Size: size, From: patterned(t, size, 0, 3<<20, 0x11)},
	}})
	g := &protect.Group{Name: "tier", Members: []*protect.Protector{web.p, db.p}}
	if _, err := g.Cycle(ctx(t)); err != nil {
		t.Fatalf("group cycle: %v", err)
	}
	db.p.Quiescer = &hook{f: func() {
		if _, err := testlibvirt.Virsh("blockresize", db.dom.Name, "vdb", itoa(grown)+"B"); err != nil {
			t.Errorf("virsh blockresize before the instant: %v", err)
		}
	}}
	_, err := g.Cycle(ctx(t))
	t.Logf("group cycle with db1's vdb grown before the instant: %v", err)
	if err == nil || !strings.Contains(err.Error(), "db1") || !strings.Contains(err.Error(), "vdb") {
		t.Errorf("group cycle with db1's vdb grown before the instant: %v; want it to fail naming db1 and vdb", err)
	}
	for _, r := range []*libvirtRig{web, db} {
		r.checkFailedLeftNothing(t)
	}
	db.p.Quiescer = nil
	pts, err := g.Cycle(ctx(t))
	if err != nil || len(pts) != 2 {
		t.Fatalf("the group cycle after: %d points, %v", len(pts), err)
	}
	if d := diskOf(t, pts[1], "vdb"); !d.Resync || d.Size != grown {
		t.Errorf("the group cycle after: db1's vdb %+v, want it resynchronised at %d bytes", d, grown)
	}
	if d := diskOf(t, pts[0], "vda"); d.Resync {
		t.Errorf("the group cycle after: web1's vda %+v, want it incremental", d)
	}
	out := filepath.Join(t.TempDir(), "vdb.raw")
	if err := web.site.Store.Export(ctx(t), "db1", pts[1].ID, "vdb", out, "raw"); err != nil {
		t.Fatal(err)
	}
	if got, want := fileHash(t, out), imageHash(t, db.dom.Image("vdb")); got != want {
		t.Errorf("point %d of db1: vdb sha256 %s, its image %s", pts[1].ID, got[:12], want[:12])
	}
}

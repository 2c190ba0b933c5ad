package virt_test

// The libvirt path end to end: a real libvirtd, a TCG domain running the test
// guest, lifeboat's protect package and a recovery site. These live here, not
// in protect, so that they run beside protect's own long tests.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

var ctx = testCtx

// libvirtRig is a libvirt domain protected through libvirtd, with lifeboat's
// state directory root-owned 0750 as a package would make it, while QEMU runs
// as libvirt-qemu.
type libvirtRig struct {
	dom  *testlibvirt.Domain
	site *testsite.Site
	p    *protect.Protector
}

func newLibvirtRig(t *testing.T, opts testlibvirt.Options) *libvirtRig {
	t.Helper()
	return newRig(t, opts, false)
}

// newFreezeRig is the rig of a freeze test: concurrency-heavy, so it runs
// under the race detector, in the suite's -race -short pass, and is skipped
// in the plain pass (make test runs it once).
func newFreezeRig(t *testing.T, opts testlibvirt.Options) *libvirtRig {
	t.Helper()
	return newRig(t, opts, true)
}

func newRig(t *testing.T, opts testlibvirt.Options, freeze bool) *libvirtRig {
	t.Helper()
	if testing.Short() && !(testenv.Race && freeze) {
		t.Skip("boots a libvirt domain under TCG: covered by the full (non -short) run")
	}
	dom := testlibvirt.Boot(t, opts)
	state := testsite.ShortDir(t)
	if err := os.Chmod(state, 0o750); err != nil {
		t.Fatal(err)
	}
	site := testsite.Start(t, recovery.Options{Keep: 1000})
	p := &protect.Protector{
		VM: protect.VM{Name: "web1", Libvirt: &protect.LibvirtDomain{URI: testlibvirt.URI, Domain: dom.Name},
			WorkDir: filepath.Join(state, "protect", "web1"), StateDir: state},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 4, ChunkSize: 1 << 20,
	}
	if err := os.MkdirAll(p.VM.WorkDir, 0o750); err != nil {
		t.Fatal(err)
	}
	return &libvirtRig{dom: dom, site: site, p: p}
}

func (r *libvirtRig) cycle(t *testing.T) lifeboat.Point {
	t.Helper()
	pt, err := r.p.Cycle(ctx(t))
	if err != nil {
		t.Fatalf("cycle: %v", err)
	}
	r.checkLeftNothing(t)
	return pt
}

// checkLeftNothing: after a cycle the domain runs no job of lifeboat's and
// its scratch files and socket are gone.
func (r *libvirtRig) checkLeftNothing(t *testing.T) {
	t.Helper()
	out, err := testlibvirt.Virsh("domjobinfo", r.dom.Name)
	if err != nil || !strings.Contains(out, "None") {
		t.Errorf("after a cycle the domain runs a job: %s %v", out, err)
	}
	ents, _ := os.ReadDir(filepath.Join(r.p.VM.WorkDir, "libvirt"))
	for _, e := range ents {
		t.Errorf("after a cycle lifeboat's libvirt directory holds %s", e.Name())
	}
}

// pointHash is the sha256 of a point's disk as the recovery site exports it.
func (r *libvirtRig) pointHash(t *testing.T, id uint64, disk string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), disk+".raw")
	if err := r.site.Store.Export(ctx(t), "web1", id, disk, out, "raw"); err != nil {
		t.Fatalf("export point %d disk %s: %v", id, disk, err)
	}
	return fileHash(t, out)
}

// imageHash is the sha256 of an image's guest-visible content (QEMU must not
// have it open for writing: qcow2 metadata may sit in its caches).
func imageHash(t *testing.T, image string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "src.raw")
	if b, err := exec.Command("qemu-img", "convert", "-U", "-O", "raw", image, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v: %s", image, err, b)
	}
	return fileHash(t, out)
}

func fileHash(t *testing.T, path string) string {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return hex.EncodeToString(h.Sum(nil))
}

// exactAfterStop takes a point of the paused domain, stops it cleanly and
// checks every disk of the point against its image.
func (r *libvirtRig) exactAfterStop(t *testing.T) lifeboat.Point {
	t.Helper()
	if _, err := testlibvirt.Virsh("suspend", r.dom.Name); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t)
	r.dom.Destroy() // SIGTERM: QEMU flushes and saves its bitmaps
	for _, ds := range r.dom.Disks {
		if got, want := r.pointHash(t, pt.ID, ds.Target), imageHash(t, r.dom.Image(ds.Target)); got != want {
			t.Fatalf("point %d disk %s: sha256 %s, the image %s", pt.ID, ds.Target, got[:12], want[:12])
		}
	}
	return pt
}

func diskOf(t *testing.T, pt lifeboat.Point, name string) lifeboat.PointDisk {
	t.Helper()
	for _, d := range pt.Disks {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("point %d has no disk %s", pt.ID, name)
	return lifeboat.PointDisk{}
}

// A libvirt domain (QEMU as libvirt-qemu, lifeboat's state_dir root 0750) is
// protected through libvirtd alone: disks named by target, incremental
// cycles through libvirt checkpoints, every point byte-exact, nothing left
// running in QEMU after a cycle, the domain never tainted, and change
// tracking surviving a stop and start.
func TestLibvirtDomainReplicates(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 96 << 20}, {Target: "vdb", Size: 16 << 20, Format: "raw"},
	}})
	first := r.cycle(t)
	if d := diskOf(t, first, "vda"); !d.Resync || d.Lineage == "" || d.Generation == "" {
		t.Fatalf("first point's vda: %+v, want a whole sync starting a checkpoint", d)
	}
	// The point carries the domain's definition, its inactive XML among it,
	// as the recovery site's catalog holds it (what a failover defines).
	stored, err := r.site.Store.Point(r.p.VM.Name, first.ID)
	if err != nil {
		t.Fatal(err)
	}
	if d := stored.Definition; d == nil || d.Source != "libvirt" || d.CPUs != 1 || d.MemoryMiB != 512 ||
		!strings.HasPrefix(d.Machine, "pc-q35-") || len(d.Disks) != 2 || d.Disks[0].Device != "virtio-blk-pci" ||
		!strings.Contains(d.DomainXML, "<name>"+r.dom.Name+"</name>") || strings.Contains(d.DomainXML, "<alias") {
		t.Errorf("point %d's definition: %+v; want libvirt's, 1 vCPU, 512 MiB, q35, vda and vdb on virtio, the inactive domain XML", first.ID, d)
	}
	for i := range 3 {
		time.Sleep(300 * time.Millisecond)
		pt := r.cycle(t)
		vda := diskOf(t, pt, "vda")
		if vda.Resync || vda.BaseGeneration == "" {
			t.Fatalf("cycle %d: vda was sent whole: %+v", i, vda)
		}
		if pt.Stats.BytesChanged >= 96<<20 {
			t.Errorf("cycle %d: %d bytes changed, the whole disk", i, pt.Stats.BytesChanged)
		}
		if diskOf(t, pt, "vdb").Generation != "" {
			t.Errorf("raw vdb records a checkpoint")
		}
		t.Logf("cycle %d: changed %d, sent %d", i, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	}
	r.exactAfterStop(t)
	r.dom.Start()
	after := r.cycle(t)
	if vda := diskOf(t, after, "vda"); vda.Resync {
		t.Errorf("after a clean stop and start vda was sent whole: %+v", vda)
	}
	// The guest shuts itself down (virsh shutdown) and is started again.
	r.dom.Shutdown()
	r.dom.Start()
	after = r.cycle(t)
	if vda := diskOf(t, after, "vda"); vda.Resync {
		t.Errorf("after virsh shutdown and start vda was sent whole: %+v", vda)
	}
	r.exactAfterStop(t)

	// libvirt logs a taint (custom monitor, agent pass-through) in the
	// domain's log; lifeboat must cause none.
	if b, err := os.ReadFile(filepath.Join("/var/log/libvirt/qemu", r.dom.Name+".log")); err == nil && strings.Contains(string(b), "tainted") {
		t.Errorf("the domain is tainted:\n%s", grepLines(string(b), "tainted"))
	}
	// Between cycles lifeboat's checkpoints are hidden from libvirt (other
	// tools refuse to run beside them), their records in its state_dir.
	out, err := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(strings.Fields(out)); n != 0 {
		t.Errorf("libvirt shows %d checkpoints between cycles, want none: %s", n, out)
	}
	if recs, _ := filepath.Glob(filepath.Join(r.p.VM.WorkDir, "checkpoints", "*.xml")); len(recs) != 1 {
		t.Errorf("lifeboat keeps %d checkpoint records, want 1 (the latest point's): %v", len(recs), recs)
	}

	// Released (`lifeboat unprotect`): the hidden checkpoint is deleted
	// with its bitmap, which leaves the image (QEMU saved its bitmaps as it
	// stopped), and its record goes.
	if b := imageBitmaps(t, r.dom.Image("vda")); !slices.ContainsFunc(b, isGeneration) {
		t.Fatalf("vda's image holds bitmaps %q, none of lifeboat's: the release below would prove nothing", b)
	}
	r.dom.Start()
	rel, err := r.p.Release(ctx(t), r.p.Target.Peer())
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	if len(rel.Removed) != 1 || !strings.Contains(rel.Removed[0], "(hidden)") {
		t.Errorf("release reported %+v, want the one hidden checkpoint removed", rel)
	}
	if recs, _ := filepath.Glob(filepath.Join(r.p.VM.WorkDir, "checkpoints", "*.xml")); len(recs) != 0 {
		t.Errorf("after release lifeboat keeps checkpoint records %v", recs)
	}
	if out, err := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name"); err != nil || len(strings.Fields(out)) != 0 {
		t.Errorf("after release libvirt lists checkpoints %q (%v)", out, err)
	}
	r.dom.Destroy()
	if b := imageBitmaps(t, r.dom.Image("vda")); slices.ContainsFunc(b, isGeneration) {
		t.Errorf("after release vda's image still holds lifeboat's bitmaps: %q", b)
	}
}

func isGeneration(name string) bool { return strings.HasPrefix(name, lifeboat.GenerationPrefix) }

// imageBitmaps names the persistent bitmaps of a qcow2 image QEMU has not open.
func imageBitmaps(t *testing.T, image string) []string {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", image).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", image, err)
	}
	var info struct {
		Specific struct {
			Data struct {
				Bitmaps []struct{ Name string } `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info %s: %v", image, err)
	}
	var names []string
	for _, b := range info.Specific.Data.Bitmaps {
		names = append(names, b.Name)
	}
	return names
}

func grepLines(s, word string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// Points of a libvirt domain quiesced through libvirt's own agent calls are
// file-system consistent: no journal to replay, e2fsck clean, every file the
// guest renamed into place whole; and the guest is thawed after each.
func TestLibvirtFilesystemConsistentPoints(t *testing.T) {
	testenv.RequireTools(t, "e2fsck", "dumpe2fs", "debugfs")
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 96 << 20}}})
	r.p.Quiescer = &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 10 * time.Second}
	const points = 12
	var ids []uint64
	var freezes []time.Duration
	for i := range points {
		pt := r.cycle(t)
		if pt.Consistency != lifeboat.Filesystem {
			t.Fatalf("cycle %d: point %d is %s (%s), want filesystem", i, pt.ID, pt.Consistency, pt.Note)
		}
		ids = append(ids, pt.ID)
		freezes = append(freezes, pt.Freeze)
		time.Sleep(100 * time.Millisecond)
	}
	slices.Sort(freezes)
	t.Logf("the guest frozen for: median %v, max %v (freeze, backup begin with its checkpoint, thaw; TCG)", freezes[len(freezes)/2], freezes[len(freezes)-1])
	if max := freezes[len(freezes)-1]; max > 5*time.Second {
		t.Errorf("a point records the guest frozen %v, half its 10 s bound or more: Thaw returned only at the bound, not when the guest was thawed", max)
	}
	files, last := 0, 0
	for _, id := range ids {
		c := r.checkFS(t, id)
		if c.NeedsRecovery || !c.FsckClean || c.Bad > 0 {
			t.Errorf("point %d: needs journal recovery %v, e2fsck clean %v, %d of %d files broken", id, c.NeedsRecovery, c.FsckClean, c.Bad, c.Files)
		}
		files, last = files+c.Files, c.Newest
	}
	if files == 0 {
		t.Fatal("the guest wrote no file: the workload did not run")
	}
	t.Logf("%d file-system-consistent points, %d files checked in all", points, files)
	// The guest was thawed: two seconds later it has written more files
	// (another quiesced point shows them; a crash-consistent one would
	// hold them only in its journal, which debugfs does not replay).
	time.Sleep(2 * time.Second)
	if c := r.checkFS(t, r.cycle(t).ID); c.Newest <= last {
		t.Errorf("2 s after the last point the guest's newest file is %d, as then (%d): was it left frozen?", c.Newest, last)
	}
}

func (r *libvirtRig) checkFS(t *testing.T, id uint64) testguest.FSCheck {
	t.Helper()
	img := filepath.Join(t.TempDir(), "p.raw")
	if err := r.site.Store.Export(ctx(t), "web1", id, "vda", img, "raw"); err != nil {
		t.Fatal(err)
	}
	return testguest.CheckFS(t, img)
}

// activeImage is the file a disk's guest-visible content starts from now (an
// external snapshot moves it to the overlay).
func (r *libvirtRig) activeImage(t *testing.T, target string) string {
	t.Helper()
	out, err := testlibvirt.Virsh("domblklist", r.dom.Name, "--details")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 4 && f[2] == target {
			return f[3]
		}
	}
	t.Fatalf("domblklist shows no disk %s:\n%s", target, out)
	return ""
}

// exactNow takes a point of the paused domain, stops it and checks the
// point's vda against the disk's active image (its whole chain).
func (r *libvirtRig) exactNow(t *testing.T, site *testsite.Site, ps ...*protect.Protector) []lifeboat.Point {
	t.Helper()
	if _, err := testlibvirt.Virsh("suspend", r.dom.Name); err != nil {
		t.Fatal(err)
	}
	var pts []lifeboat.Point
	for _, p := range ps {
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("cycle of the paused domain: %v", err)
		}
		pts = append(pts, pt)
	}
	image := r.activeImage(t, "vda")
	r.dom.Destroy()
	want := imageHash(t, image)
	for i, p := range ps {
		s := r.site
		if i > 0 {
			s = site
		}
		out := filepath.Join(t.TempDir(), "vda.raw")
		if err := s.Store.Export(ctx(t), p.VM.Name, pts[i].ID, "vda", out, "raw"); err != nil {
			t.Fatal(err)
		}
		if got := fileHash(t, out); got != want {
			t.Fatalf("protector %d point %d: vda sha256 %s, the image %s", i, pts[i].ID, got[:12], want[:12])
		}
	}
	return pts
}

// A domain's life does not break its protection: after kill -9 of QEMU (its
// bitmaps unsaved) the disk is resynchronised by hashes, after an external
// snapshot and after its block commit the disk keeps its name and stays
// incremental (libvirt carries checkpoints through both), so it does after
// a save and restore (the migration stream), and every point is byte-exact.
func TestLibvirtLifecycle(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 96 << 20}}})
	r.cycle(t)
	r.cycle(t)

	// kill -9: QEMU never saves its bitmaps.
	if err := syscall.Kill(r.dom.QEMUPid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.dom.WaitOff(time.Minute)
	r.dom.Start()
	pt := r.cycle(t)
	vda := diskOf(t, pt, "vda")
	t.Logf("after kill -9: resync %v, changed %d, sent %d", vda.Resync, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if !vda.Resync {
		t.Errorf("after kill -9 of QEMU vda was sent incrementally from a bitmap QEMU never saved")
	}
	r.exactNow(t, nil, r.p)
	r.dom.Start()
	r.cycle(t)

	// An external snapshot puts a new active layer on vda.
	overlay := filepath.Join(r.dom.Dir, "vda.snap1.qcow2")
	if _, err := testlibvirt.Virsh("snapshot-create-as", r.dom.Name, "snap1", "--disk-only", "--atomic", "--no-metadata",
		"--diskspec", "vda,snapshot=external,file="+overlay); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	pt = r.cycle(t)
	vda = diskOf(t, pt, "vda")
	t.Logf("after an external snapshot: disk %s resync %v, changed %d, sent %d", vda.Name, vda.Resync, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if vda.Resync {
		t.Errorf("after an external snapshot vda was sent whole")
	}
	// Its block commit takes the layer away again.
	if _, err := testlibvirt.Virsh("blockcommit", r.dom.Name, "vda", "--active", "--pivot", "--wait", "--timeout", "60"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	pt = r.cycle(t)
	vda = diskOf(t, pt, "vda")
	t.Logf("after the block commit: resync %v, changed %d, sent %d", vda.Resync, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if vda.Resync {
		t.Errorf("after a block commit vda was sent whole")
	}
	// virsh save and restore: the domain's state goes out as a migration
	// stream (to a file, as a live migration sends it to another host) and a
	// new QEMU takes the image over with the bitmaps the old one stored.
	saved := filepath.Join(r.dom.Dir, "web1.save")
	if _, err := testlibvirt.Virsh("save", r.dom.Name, saved); err != nil {
		t.Fatal(err)
	}
	if _, err := testlibvirt.Virsh("restore", saved); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	pt = r.cycle(t)
	vda = diskOf(t, pt, "vda")
	t.Logf("after virsh save and restore: resync %v, changed %d, sent %d", vda.Resync, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if vda.Resync {
		t.Errorf("after virsh save and restore vda was sent whole")
	}
	r.exactNow(t, nil, r.p)

	// A grown disk: the checkpoint cannot show whether it shrank first (a
	// shrink forgets the writes it cut off), so the next point is a hash
	// resync (TestDiskShrunkThenGrown on the QMP path), byte-exact.
	const grown = 112 << 20
	r.dom.Start()
	if _, err := testlibvirt.Virsh("blockresize", r.dom.Name, "vda", "112M"); err != nil {
		t.Fatal(err)
	}
	pt = r.cycle(t)
	vda = diskOf(t, pt, "vda")
	t.Logf("after virsh blockresize: resync %v, size %d, changed %d, sent %d", vda.Resync, vda.Size, pt.Stats.BytesChanged, pt.Stats.BytesSent)
	if !vda.Resync || vda.Size != grown {
		t.Errorf("after virsh blockresize to %d bytes: vda resync %v, size %d; want a resync at the new size", grown, vda.Resync, vda.Size)
	}
	r.exactNow(t, nil, r.p)
}

// lifeboat beside the tools libvirt users already run: virtnbdbackup's full
// and incremental backups before, between and during lifeboat's cycles, and
// a second lifeboat deployment (another recovery site) protecting the same
// domain. Every backup succeeds, a cycle during virtnbdbackup's backup waits
// for it, both deployments stay incremental and byte-exact, and
// virtnbdbackup's chain survives lifeboat.
func TestLibvirtBesideOtherTools(t *testing.T) {
	testenv.RequireTools(t, "virtnbdbackup")
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 96 << 20}}})
	other := testsite.StartAs(t, r.site, "dr2", recovery.Options{Keep: 1000})
	p2 := &protect.Protector{VM: r.p.VM, Target: other.DialOwn(t, wire.CompressionZstd), Readers: 4, ChunkSize: 1 << 20}
	cycle2 := func() lifeboat.Point {
		t.Helper()
		pt, err := p2.Cycle(ctx(t))
		if err != nil {
			t.Fatalf("second deployment's cycle: %v", err)
		}
		return pt
	}
	backups := t.TempDir()
	vnb := func(level string) *exec.Cmd {
		return exec.Command("virtnbdbackup", "-U", testlibvirt.URI, "-d", r.dom.Name, "-l", level, "-o", backups)
	}
	run := func(level string) {
		t.Helper()
		if out, err := vnb(level).CombinedOutput(); err != nil {
			t.Fatalf("virtnbdbackup -l %s: %v\n%s", level, err, tail(string(out), 20))
		}
	}
	r.cycle(t)
	cycle2()
	time.Sleep(300 * time.Millisecond)
	r.cycle(t)
	cycle2()
	run("full")
	run("inc")
	for _, pt := range []lifeboat.Point{r.cycle(t), cycle2()} {
		if diskOf(t, pt, "vda").Resync {
			t.Errorf("point %d after virtnbdbackup's backups was sent whole", pt.ID)
		}
	}

	// A cycle while virtnbdbackup's backup runs waits for it.
	bg := vnb("inc")
	var bgOut strings.Builder
	bg.Stdout, bg.Stderr = &bgOut, &bgOut
	if err := bg.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		out, _ := testlibvirt.Virsh("domjobinfo", r.dom.Name)
		if strings.Contains(out, "Backup") {
			break
		}
		if i > 600 {
			t.Fatal("virtnbdbackup's backup job never showed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	pt := r.cycle(t)
	if err := bg.Wait(); err != nil {
		t.Fatalf("virtnbdbackup -l inc during a lifeboat cycle: %v\n%s", err, tail(bgOut.String(), 20))
	}
	if diskOf(t, pt, "vda").Resync {
		t.Errorf("the cycle during virtnbdbackup's backup sent vda whole")
	}
	cycle2()
	r.exactNow(t, other, r.p, p2)
	r.dom.Start()
	run("inc") // virtnbdbackup's chain is whole
	r.cycle(t)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// guestExec runs a shell command in the guest through libvirt's agent
// pass-through. Test setup only: it taints the domain, which lifeboat never does.
func guestExec(t *testing.T, dom *testlibvirt.Domain, script string) {
	t.Helper()
	arg, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{"path": "/bin/sh", "arg": []string{"-c", script}}})
	if _, err := testlibvirt.Virsh("qemu-agent-command", dom.Name, string(arg)); err != nil {
		t.Fatal(err)
	}
}

// fsfreezeStatus asks the guest agent, through the pass-through (test only).
func fsfreezeStatus(dom *testlibvirt.Domain) string {
	out, err := testlibvirt.Virsh("qemu-agent-command", dom.Name, `{"execute":"guest-fsfreeze-status"}`, "--timeout", "5")
	if err != nil {
		return "error: " + err.Error()
	}
	return strings.TrimSpace(out)
}

// A freeze hook that outlasts the freeze bound: the cycle takes a crash-
// consistent point within the bound, the next cycle does not queue a second
// freeze behind the first, and the guest is thawed the moment the late
// freeze lands.
func TestLibvirtLateFreeze(t *testing.T) {
	r := newFreezeRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 32 << 20}}})
	r.cycle(t)
	guestExec(t, r.dom, `mkdir -p /etc/qemu/fsfreeze-hook.d && printf '#!/bin/sh\n[ "$1" = freeze ] || exit 0\nsleep 12\necho LB-HOOK-DONE > /dev/console\n' > /etc/qemu/fsfreeze-hook.d/slow && chmod +x /etc/qemu/fsfreeze-hook.d/slow`)
	time.Sleep(500 * time.Millisecond)
	const limit, hook, thawWithin = 2 * time.Second, 12 * time.Second, 5 * time.Second
	r.p.Quiescer = &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: limit}
	offset := len(r.dom.Console())
	start := time.Now()
	pt := r.cycle(t)
	took := time.Since(start)
	t.Logf("point %d: %s in %v: %s", pt.ID, pt.Consistency, took.Round(time.Millisecond), pt.Note)
	if pt.Consistency != lifeboat.Crash || took > limit+6*time.Second {
		t.Fatalf("under a %v freeze bound with a %v hook: point %s after %v, want crash consistent within the bound", limit, hook, pt.Consistency, took)
	}
	start = time.Now()
	pt = r.cycle(t)
	if took := time.Since(start); pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "previous freeze") || took > limit {
		t.Errorf("a cycle while the late freeze is pending: %s in %v (%q), want crash consistent at once, saying why", pt.Consistency, took, pt.Note)
	}
	deadline := time.Now().Add(hook + 30*time.Second)
	for !strings.Contains(r.dom.Console()[offset:], "LB-HOOK-DONE") {
		if time.Now().After(deadline) {
			t.Fatal("the freeze hook never ended")
		}
		time.Sleep(50 * time.Millisecond)
	}
	landed := time.Now()
	waitThawed(t, r.dom, thawWithin, "the late freeze landed")
	t.Logf("late freeze: landed -> thawed (guest-fsfreeze-status) in %v, bound %v", time.Since(landed).Round(time.Millisecond), thawWithin)
}

// waitThawed waits until the guest agent says the guest is thawed, failing
// the test past within (since what, for the message).
func waitThawed(t *testing.T, dom *testlibvirt.Domain, within time.Duration, what string) {
	t.Helper()
	start := time.Now()
	for {
		st := fsfreezeStatus(dom)
		if strings.Contains(st, `"thawed"`) {
			return
		}
		if time.Since(start) > within {
			t.Fatalf("the guest is not thawed %v after %s (agent: %s)", within, what, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A domain paused while its guest is frozen (QEMU pauses it on ENOSPC in the
// freeze's sync under werror=enospc; an admin's `virsh suspend`): libvirt
// answers every agent call "domain is not running", which is not "nothing is
// frozen", for the guest resumes frozen. The thaw says it is not confirmed,
// the next freeze falls back while it is pending, and the thaw lands once
// the domain resumes.
func TestLibvirtThawOfPausedDomainLandsOnResume(t *testing.T) {
	r := newFreezeRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 32 << 20}}})
	const limit, thawWithin = 3 * time.Second, 10 * time.Second
	q := &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: limit}
	f, err := q.Freeze(ctx(t))
	if err != nil || f.Level != lifeboat.Filesystem {
		t.Fatalf("freeze: %+v %v", f, err)
	}
	t.Cleanup(func() { testlibvirt.Virsh("domfsthaw", r.dom.Name) }) // whatever the test left
	if _, err := testlibvirt.Virsh("suspend", r.dom.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Thaw(ctx(t)); err == nil || !strings.Contains(err.Error(), "not confirmed thawed") {
		t.Errorf("thaw of a frozen guest whose domain is paused: %v; want an error saying it is not confirmed thawed", err)
	}
	if f, err := q.Freeze(ctx(t)); err != nil || f.Level != lifeboat.Crash || !strings.Contains(f.Note, "previous freeze") {
		t.Errorf("a freeze while the paused guest's thaw is pending: %+v %v; want crash consistent at once, saying why", f, err)
	}
	if _, err := testlibvirt.Virsh("resume", r.dom.Name); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	waitThawed(t, r.dom, thawWithin, "its domain resumed: lifeboat's thaw gave up while it was paused")
	t.Logf("resumed -> thawed (guest-fsfreeze-status) in %v", time.Since(resumed).Round(time.Millisecond))
}

// A guest with no file system its agent can freeze (/data unmounted): libvirt's
// freeze answers success and 0, and the point is recorded crash consistent,
// saying why; a strict policy fails the cycle. The guest is left thawed.
func TestLibvirtFreezeOfNoFileSystemIsCrashConsistent(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 32 << 20}}})
	guestExec(t, r.dom, "umount /data")
	time.Sleep(time.Second) // guest-exec does not wait for the command
	q := &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 10 * time.Second}
	r.p.Quiescer = q
	pt := r.cycle(t)
	t.Logf("point %d: %s: %s", pt.ID, pt.Consistency, pt.Note)
	if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "froze no file system") {
		t.Errorf("the agent froze no file system: point recorded %s (note %q); want crash, saying why", pt.Consistency, pt.Note)
	}
	q.Strict = true
	if _, err := r.p.Cycle(ctx(t)); err == nil || !strings.Contains(err.Error(), "froze no file system") {
		t.Errorf("strict policy, the agent froze no file system: cycle error %v; want the cycle to fail, saying why", err)
	}
	if st := fsfreezeStatus(r.dom); !strings.Contains(st, `"thawed"`) {
		t.Errorf("after the cycles the agent says %s, want thawed", st)
	}
}

// A cycle that fails after its instant (here: the recovery site refuses it
// before any block is sent) ends the backup, deletes its checkpoint and hides
// the base again: libvirt shows nothing of lifeboat's, and the next cycle is
// incremental from the same base and byte-exact.
func TestLibvirtFailedCycleLosesNothing(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	first := r.cycle(t)
	injected := errors.New("injected: the recovery site went away")
	for _, hook := range []string{"AfterInstant", "AfterPlan", "BeforeCommit"} {
		r.p.Hooks = protect.Hooks{}
		fail := func(context.Context) error { return injected }
		switch hook {
		case "AfterInstant":
			r.p.Hooks.AfterInstant = fail
		case "AfterPlan":
			r.p.Hooks.AfterPlan = fail
		case "BeforeCommit":
			r.p.Hooks.BeforeCommit = fail
		}
		time.Sleep(200 * time.Millisecond)
		if _, err := r.p.Cycle(ctx(t)); !errors.Is(err, injected) {
			t.Fatalf("%s: cycle: %v, want the injected failure", hook, err)
		}
		r.checkLeftNothing(t)
		if out, _ := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name"); strings.TrimSpace(out) != "" {
			t.Errorf("%s: after a failed cycle libvirt shows checkpoints: %s", hook, out)
		}
	}
	r.p.Hooks = protect.Hooks{}
	pt := r.exactNow(t, nil, r.p)[0]
	if vda := diskOf(t, pt, "vda"); vda.Resync || vda.BaseGeneration != diskOf(t, first, "vda").Generation {
		t.Errorf("after three failed cycles: %+v, want incremental from point %d's checkpoint", vda, first.ID)
	}
}

// A guest that overwrites more during a cycle than the scratch budget allows:
// the backup is ended before the scratch outgrows its reservation, the
// cycle fails saying why and what to do, the guest's writes all succeed, and
// the next cycle (with room again) sends those blocks too.
func TestLibvirtScratchBudget(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	guestExec(t, r.dom, "dd if=/dev/urandom of=/data/big bs=1M count=32 conv=fsync 2>/dev/null; echo LB-BIG-DONE > /dev/console")
	waitConsole(t, r.dom, 0, "LB-BIG-DONE")
	r.cycle(t)
	var st syscall.Statfs_t
	if err := syscall.Statfs(r.p.VM.WorkDir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	const budget = 16 << 20
	r.p.Safety = protect.Safety{FleeceFloor: 64 << 20, FleeceMinBudget: 1 << 20, FleeceShare: float64(budget) / float64(free-(64<<20))}
	offset := len(r.dom.Console())
	r.p.Hooks.AfterInstant = func(context.Context) error {
		// The guest overwrites 32 MiB the instant holds: each first write
		// of a cluster copies it to the scratch.
		guestExec(t, r.dom, "dd if=/dev/urandom of=/data/big bs=1M count=32 conv=notrunc,fsync 2>/dev/null && echo LB-OVERWRITE-OK > /dev/console || echo LB-OVERWRITE-FAILED > /dev/console")
		waitConsole(t, r.dom, offset, "LB-OVERWRITE-")
		return nil
	}
	_, err := r.p.Cycle(ctx(t))
	if !errors.Is(err, protect.ErrScratchFull) || !strings.Contains(err.Error(), "give state_dir more space") {
		t.Fatalf("cycle under a %d MiB scratch budget: %v, want ErrScratchFull saying what to do", budget>>20, err)
	}
	t.Logf("%v", err)
	if c := r.dom.Console()[offset:]; !strings.Contains(c, "LB-OVERWRITE-OK") {
		t.Fatalf("the guest's overwrite failed during the cycle:\n%s", c)
	}
	r.checkLeftNothing(t)
	r.p.Hooks, r.p.Safety = protect.Hooks{}, protect.Safety{}
	pt := r.exactNow(t, nil, r.p)[0]
	if vda := diskOf(t, pt, "vda"); vda.Resync || pt.Stats.BytesChanged < 32<<20 {
		t.Errorf("the cycle after: resync %v, changed %d; want incremental with the 32 MiB overwritten", vda.Resync, pt.Stats.BytesChanged)
	}
}

// The cycle's only connection to libvirtd breaks after the instant (libvirtd
// restarted by a package upgrade, which keeps the domain's backup job; a
// network blip on a remote URI). The point commits and the cleanup connects
// again: the backup ends, the checkpoints are hidden, the scratch files are
// gone, so nothing of lifeboat's goes on copying the guest's writes into a
// scratch that no cycle watches, and the next cycle is incremental.
func TestLibvirtCycleCleansUpAfterConnectionLoss(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Workload: testguest.FsyncWriter, Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}}})
	guestExec(t, r.dom, "dd if=/dev/urandom of=/data/big bs=1M count=24 conv=fsync 2>/dev/null; echo LB-BIG-DONE > /dev/console")
	waitConsole(t, r.dom, 0, "LB-BIG-DONE")
	r.cycle(t)
	dropped := 0
	r.p.Hooks.BeforeCommit = func(context.Context) error {
		dropped = dropLibvirtConnections(t)
		return nil
	}
	pt, err := r.p.Cycle(ctx(t))
	if dropped == 0 {
		t.Fatal("the cycle held no connection to libvirtd to drop")
	}
	if err != nil {
		t.Fatalf("cycle whose libvirt connection broke before its commit: point %d, %v; want it committed and cleaned up on a new connection", pt.ID, err)
	}
	if out, _ := testlibvirt.Virsh("checkpoint-list", r.dom.Name, "--name"); strings.TrimSpace(out) != "" {
		t.Errorf("after the cycle libvirt shows lifeboat's checkpoints: %s", out)
	}
	r.checkLeftNothing(t)
	// The guest overwrites what the instant held: a backup left running
	// would copy each first write of a cluster into its scratch.
	offset := len(r.dom.Console())
	guestExec(t, r.dom, "dd if=/dev/urandom of=/data/big bs=1M count=24 conv=notrunc,fsync 2>/dev/null; echo LB-OVER-DONE > /dev/console")
	waitConsole(t, r.dom, offset, "LB-OVER-DONE")
	if fi, err := os.Stat(filepath.Join(r.p.VM.WorkDir, "libvirt", "vda.scratch.qcow2")); err == nil {
		t.Errorf("after the cycle the guest's overwrite of 24 MiB grew a scratch file to %d MiB", fi.Size()>>20)
	}
	r.p.Hooks = protect.Hooks{}
	next := r.cycle(t)
	if vda := diskOf(t, next, "vda"); vda.Resync || vda.BaseGeneration != diskOf(t, pt, "vda").Generation {
		t.Errorf("the cycle after: %+v, want incremental from point %d's checkpoint", vda, pt.ID)
	}
}

// dropLibvirtConnections shuts down every connection this process holds to
// the system libvirtd, as a libvirtd restart does, and says how many.
func dropLibvirtConnections(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if link, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); !strings.HasPrefix(link, "socket:") {
			continue
		}
		sa, err := syscall.Getpeername(fd)
		if err != nil {
			continue
		}
		if u, ok := sa.(*syscall.SockaddrUnix); ok && strings.HasSuffix(u.Name, "/libvirt/libvirt-sock") {
			if err := syscall.Shutdown(fd, syscall.SHUT_RDWR); err != nil {
				t.Fatalf("shut down the connection to %s: %v", u.Name, err)
			}
			n++
		}
	}
	return n
}

// waitConsole waits for word in the guest's console after offset.
func waitConsole(t *testing.T, dom *testlibvirt.Domain, offset int, word string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(dom.Console()[offset:], word) {
		if time.Now().After(deadline) {
			t.Fatalf("the guest never printed %s", word)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Another client of the guest agent froze the guest (`virsh domfsfreeze`, a
// backup tool's own freeze): lifeboat's freeze is refused, the point is
// crash consistent, saying so, and the other client's freeze is left to it:
// lifeboat does not thaw the guest underneath it.
func TestLibvirtFreezeHeldByAnotherClientIsLeftToIt(t *testing.T) {
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 32 << 20}}})
	if out, err := testlibvirt.Virsh("domfsfreeze", r.dom.Name); err != nil {
		t.Fatalf("virsh domfsfreeze: %v: %s", err, out)
	}
	t.Cleanup(func() { testlibvirt.Virsh("domfsthaw", r.dom.Name) })
	dir := t.TempDir()
	q := &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 10 * time.Second, MarkerDir: dir}
	r.p.Quiescer = q
	pt := r.cycle(t)
	t.Logf("point %d: %s: %s", pt.ID, pt.Consistency, pt.Note)
	if pt.Consistency != lifeboat.Crash || !strings.Contains(pt.Note, "left to it") {
		t.Errorf("a freeze another client holds: point %s (note %q); want crash consistent, saying the other freeze is left to its client", pt.Consistency, pt.Note)
	}
	time.Sleep(2 * time.Second) // a thaw loop of lifeboat's would have thawed by now
	if st := fsfreezeStatus(r.dom); !strings.Contains(st, `"frozen"`) {
		t.Errorf("lifeboat thawed a freeze another client holds: the agent says %s", st)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*")); len(m) != 0 {
		t.Errorf("freeze markers left for a freeze lifeboat does not hold: %v", m)
	}
}

package protect_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// hotAdd adds a disk to the running VM as a hypervisor would: a new qcow2
// image, its nodes, and an export named after it; the guest writes to it.
func (r *rig) hotAdd(t *testing.T, name string, size int64) {
	t.Helper()
	path := r.vm.ImagePath(name) + ".qcow2"
	if err := qemu.CreateImage(ctx(t), path, "qcow2", size, "", ""); err != nil {
		t.Fatal(err)
	}
	r.attach(t, name, name, path, size)
}

// attach opens image path as node and exports it as disk name (the export
// id the VM reaches its disk by), then reopens the guest with it.
func (r *rig) attach(t *testing.T, name, node, path string, size int64) {
	t.Helper()
	m := r.vm.Monitor()
	r.guest.Close()
	err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "qcow2", "node-name": node,
		"file": map[string]any{"driver": "file", "node-name": node + "-file", "filename": path}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.ExportAdd(ctx(t), qemu.Export{ID: name, Node: node, Name: name, Writable: true}); err != nil {
		t.Fatal(err)
	}
	r.disks = append(r.disks, workload.Disk{Name: name, Size: size})
	r.openGuest(t)
}

// unplug removes a disk from the running VM: its export goes, its node stays
// (as after a device_del of a -blockdev disk).
func (r *rig) unplug(t *testing.T, name string) {
	t.Helper()
	r.guest.Close()
	if err := r.vm.Monitor().ExportDelForce(ctx(t), name); err != nil {
		t.Fatal(err)
	}
	r.disks = slices.DeleteFunc(r.disks, func(d workload.Disk) bool { return d.Name == name })
	r.openGuest(t)
}

// noLeftovers fails when a node, job or export of lifeboat's is left in the VM's QEMU.
func (r *rig) noLeftovers(t *testing.T) {
	t.Helper()
	m := r.vm.Monitor()
	nodes, err := m.Nodes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, qemu.OwnPrefix) {
			t.Fatalf("lifeboat left node %s in the VM's QEMU", n.NodeName)
		}
	}
	exports, err := m.Exports(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range exports {
		if strings.HasPrefix(e.ID, qemu.OwnPrefix) {
			t.Fatalf("lifeboat left export %s in the VM's QEMU", e.ID)
		}
	}
	jobs, err := m.Jobs(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) > 0 {
		t.Fatalf("block jobs left in the VM's QEMU: %+v", jobs)
	}
}

// Disks added to and removed from a running VM between cycles: a disk added
// is sent whole at the next cycle and is in no older point; a disk removed is
// in no later point, and every older point still holds it byte-exact and
// verifies; a disk removed and plugged in again between two cycles goes on
// incrementally, and one plugged in again after a point without it is a new
// disk, sent whole. No point lists a disk it does not hold whole.
func TestDisksAddedAndRemovedBetweenCycles(t *testing.T) {
	betweenCycles(t)
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	p1 := r.cycle(t)
	vdb1 := r.exportHash(t, p1.ID, "vdb")

	// Hot-add vdc.
	const vdcSize = 8 << 20
	r.hotAdd(t, "vdc", vdcSize)
	if err := r.guest.Do(ctx(t), workload.Op{Disk: "vdc", Kind: "data", Offset: 1 << 20, Length: 3 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	p2 := r.cycle(t)
	if d := diskNamed(t, p2, "vdc"); !d.Resync || d.Base != 0 || d.Size != vdcSize {
		t.Fatalf("point %d: the added disk vdc: resync %v from point %d, size %d; want sent whole, %d bytes", p2.ID, d.Resync, d.Base, d.Size, vdcSize)
	}
	if d := diskNamed(t, p2, "vda"); d.Resync {
		t.Fatalf("point %d: vda resynced because another disk was added", p2.ID)
	}
	err := r.site.Store.Export(ctx(t), "vm1", p1.ID, "vdc", t.TempDir()+"/vdc.raw", "raw")
	if !errors.Is(err, recovery.ErrNoDisk) {
		t.Fatalf("export of vdc from point %d, which predates it: %v, want ErrNoDisk", p1.ID, err)
	}
	vdb2 := r.exportHash(t, p2.ID, "vdb")

	// Hot-remove vdb.
	r.unplug(t, "vdb")
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	p3 := r.cycle(t)
	if len(p3.Disks) != 2 || slices.ContainsFunc(p3.Disks, func(d lifeboat.PointDisk) bool { return d.Name == "vdb" }) {
		t.Fatalf("point %d after vdb was removed holds %+v", p3.ID, p3.Disks)
	}
	if got := r.exportHash(t, p1.ID, "vdb"); got != vdb1 {
		t.Fatalf("point %d's vdb changed after the disk was removed", p1.ID)
	}
	if got := r.exportHash(t, p2.ID, "vdb"); got != vdb2 {
		t.Fatalf("point %d's vdb changed after the disk was removed", p2.ID)
	}
	for _, pt := range r.points(t) {
		if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
			t.Fatalf("verify point %d: %v", pt.ID, err)
		}
	}
	r.noLeftovers(t)

	// vda removed and plugged in again between two cycles: its history goes on.
	r.unplug(t, "vda")
	r.guest.Close()
	if err := r.vm.Monitor().ExportAdd(ctx(t), qemu.Export{ID: "vda", Node: "vda", Name: "vda", Writable: true}); err != nil {
		t.Fatal(err)
	}
	r.disks = append(r.disks, workload.Disk{Name: "vda", Size: vdaSize})
	r.openGuest(t)
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	p4 := r.cycle(t)
	if d := diskNamed(t, p4, "vda"); d.Resync || d.Base != p3.ID {
		t.Fatalf("point %d: vda, plugged out and in again, resync %v from %d; want incremental from %d", p4.ID, d.Resync, d.Base, p3.ID)
	}

	// vdb plugged in again after a point without it: a new disk to the recovery
	// site, sent whole, with a lineage of its own.
	r.guest.Close()
	if err := r.vm.Monitor().ExportAdd(ctx(t), qemu.Export{ID: "vdb", Node: "vdb", Name: "vdb", Writable: true}); err != nil {
		t.Fatal(err)
	}
	r.disks = append(r.disks, workload.Disk{Name: "vdb", Size: vdbSize})
	r.openGuest(t)
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	p5 := r.cycle(t)
	d := diskNamed(t, p5, "vdb")
	if !d.Resync || d.Base != 0 || d.Lineage == diskNamed(t, p2, "vdb").Lineage {
		t.Fatalf("point %d: vdb back after point %d lacked it: resync %v from %d, lineage %s; want sent whole under a new lineage", p5.ID, p4.ID, d.Resync, d.Base, d.Lineage)
	}
	if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
		t.Fatal(err)
	}
	p6 := r.cycle(t)
	for _, d := range p6.Disks {
		if d.Resync {
			t.Fatalf("point %d: disk %s resynced again", p6.ID, d.Name)
		}
	}
	for _, pt := range r.points(t) {
		if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
			t.Fatalf("verify point %d: %v", pt.ID, err)
		}
	}
	r.noLeftovers(t)
}

// A disk resized after the cycle resolved it and before its instant: the
// point would record the size the disk had before, with the fleece's view
// of the other. The cycle fails naming the disk; the next one resyncs it and
// its point is byte-exact. (After the fleece's nodes are added QEMU refuses
// a resize until the cycle ends.)
func TestDiskResizedBeforeTheInstant(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
	}{{"grown", vdaSize + 8<<20}, {"shrunk", vdaSize - 8<<20}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, wire.CompressionZstd)
			if err := r.guest.Fill(ctx(t), 0.9); err != nil {
				t.Fatal(err)
			}
			r.cycle(t)
			r.p.Hooks.BeforeFleece = func(context.Context) error {
				r.resize(t, tc.size)
				return nil
			}
			pt, err := r.p.Cycle(ctx(t))
			r.p.Hooks.BeforeFleece = nil
			if err == nil {
				t.Fatalf("the cycle made point %d (vda %d bytes) of a disk resized to %d bytes after it was resolved", pt.ID, diskNamed(t, pt, "vda").Size, tc.size)
			}
			t.Logf("the cycle failed as it should: %v", err)
			if !strings.Contains(err.Error(), `"vda"`) || !strings.Contains(err.Error(), "resized") {
				t.Fatalf("the error does not name the disk and say it was resized: %v", err)
			}
			if n := len(r.points(t)); n != 1 {
				t.Fatalf("%d points listed, want 1", n)
			}
			r.noLeftovers(t)
			pt = r.cycle(t)
			if d := diskNamed(t, pt, "vda"); !d.Resync || d.Size != tc.size {
				t.Fatalf("point %d: vda resync %v, %d bytes; want a resync at %d bytes", pt.ID, d.Resync, d.Size, tc.size)
			}
		})
	}
}

// A disk whose export (a device's drive, for a qemu-system) moves to another
// node after the cycle resolved it and before its instant, another image or
// an external snapshot's new top: the instant of the node the VM no longer
// writes is not the disk's. The cycle fails naming the disk, nothing is
// listed, and the next point holds the disk as the VM has it, byte-exact.
func TestDiskReplacedBeforeTheInstant(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replace func(t *testing.T, r *rig)
	}{
		{"another image", func(t *testing.T, r *rig) {
			other := r.vm.ImagePath("vda-restored") + ".qcow2"
			if err := qemu.CreateImage(ctx(t), other, "qcow2", vdaSize, "", ""); err != nil {
				t.Fatal(err)
			}
			r.unplug(t, "vda")
			r.attach(t, "vda", "vda-restored", other, vdaSize)
		}},
		{"external snapshot", func(t *testing.T, r *rig) {
			overlay := r.vm.ImagePath("vda-snap") + ".qcow2"
			if err := qemu.CreateImage(ctx(t), overlay, "qcow2", vdaSize, "", ""); err != nil {
				t.Fatal(err)
			}
			m := r.vm.Monitor()
			err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "qcow2", "node-name": "vda-snap", "backing": nil,
				"file": map[string]any{"driver": "file", "node-name": "vda-snap-file", "filename": overlay}})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Execute(ctx(t), "blockdev-snapshot", map[string]any{"node": "vda", "overlay": "vda-snap"}, nil); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, wire.CompressionZstd)
			if err := r.guest.Fill(ctx(t), 0.5); err != nil {
				t.Fatal(err)
			}
			r.cycle(t)
			r.p.Hooks.BeforeFleece = func(context.Context) error {
				tc.replace(t, r)
				return r.guest.Do(ctx(t), workload.Op{Disk: "vda", Kind: "data", Offset: 0, Length: 1 << 20})
			}
			pt, err := r.p.Cycle(ctx(t))
			r.p.Hooks.BeforeFleece = nil
			if err == nil {
				t.Fatalf("the cycle made point %d from the node vda no longer uses", pt.ID)
			}
			t.Logf("the cycle failed as it should: %v", err)
			if !strings.Contains(err.Error(), `"vda"`) {
				t.Fatalf("the error does not name the disk: %v", err)
			}
			if n := len(r.points(t)); n != 1 {
				t.Fatalf("%d points listed, want 1", n)
			}
			r.noLeftovers(t)
			pt = r.cycle(t)
			if d := diskNamed(t, pt, "vda"); !d.Resync {
				t.Fatalf("point %d: vda, now another node, taken incrementally from %q", pt.ID, d.BaseGeneration)
			}
		})
	}
}

// A disk removed from the VM during a cycle. Its export (a device, for a
// qemu-system) removed before the instant or while the blocks are sent, its
// node kept: the point holds the disk as it was last (no device wrote to it
// since), the next point does not, and lifeboat leaves nothing of its own on
// the node, which can then be deleted. Its node deleted too before the
// instant: the cycle fails naming the disk, and the next one takes the VM
// without it.
func TestDiskRemovedDuringACycle(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sending  bool // removed while the blocks are sent, else before the instant
		delNode  bool // its node deleted too
		wantFail bool
	}{
		{name: "before the instant", sending: false},
		{name: "before the instant with its node", sending: false, delNode: true, wantFail: true},
		{name: "while sending", sending: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, wire.CompressionZstd)
			if err := r.guest.Fill(ctx(t), 0.5); err != nil {
				t.Fatal(err)
			}
			r.cycle(t)
			if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
				t.Fatal(err)
			}
			want, err := r.guest.Hashes(ctx(t))
			if err != nil {
				t.Fatal(err)
			}
			remove := func(c context.Context) error {
				r.unplug(t, "vdb")
				if tc.delNode {
					return r.vm.Monitor().BlockdevDel(c, "vdb")
				}
				return nil
			}
			if tc.sending {
				r.p.Hooks.AfterPlan = remove
			} else {
				r.p.Hooks.BeforeFleece = remove
			}
			pt, err := r.p.Cycle(ctx(t))
			r.p.Hooks = protect.Hooks{}
			if tc.wantFail {
				if err == nil {
					t.Fatalf("the cycle made point %d of a disk whose node went before the instant", pt.ID)
				}
				t.Logf("the cycle failed as it should: %v", err)
				if !strings.Contains(err.Error(), `"vdb"`) {
					t.Fatalf("the error does not name the disk: %v", err)
				}
				if n := len(r.points(t)); n != 1 {
					t.Fatalf("%d points listed, want 1", n)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				r.disks = append(r.disks, workload.Disk{Name: "vdb", Size: vdbSize})
				r.checkPoint(t, pt.ID, want)
				r.disks = r.disks[:len(r.disks)-1]
			}
			r.noLeftovers(t)
			if !tc.delNode {
				if err := r.vm.Monitor().BlockdevDel(ctx(t), "vdb"); err != nil {
					t.Fatalf("the removed disk's node cannot be deleted after the cycle: %v", err)
				}
			}
			pt = r.cycle(t)
			if len(pt.Disks) != 1 {
				t.Fatalf("point %d after vdb was removed holds %+v", pt.ID, pt.Disks)
			}
		})
	}
}

// otherRawFile adds an empty raw image of vdb's size as a file node, and
// returns what reopens vdb's raw node onto it (blockdev-reopen).
func (r *rig) otherRawFile(t *testing.T) func(context.Context) error {
	t.Helper()
	other := r.vm.ImagePath("vdb-other") + ".raw"
	if err := qemu.CreateImage(ctx(t), other, "raw", vdbSize, "", ""); err != nil {
		t.Fatal(err)
	}
	m := r.vm.Monitor()
	if err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "file", "node-name": "vdb-other", "filename": other}); err != nil {
		t.Fatal(err)
	}
	return func(c context.Context) error {
		return m.Execute(c, "blockdev-reopen", map[string]any{"options": []any{
			map[string]any{"driver": "raw", "node-name": "vdb", "file": "vdb-other"}}}, nil)
	}
}

// A raw disk's node reopened onto another image between cycles
// (blockdev-reopen with another file): the node, its name and its
// in-memory generation stay, while the data under it is another image's.
// The generation no longer describes the disk: the next cycle resyncs it by
// hashes, and its point is byte-exact.
func TestRawDiskReopenedOnAnotherImage(t *testing.T) {
	betweenCycles(t)
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	reopen := r.otherRawFile(t)
	r.guest.Close()
	if err := reopen(ctx(t)); err != nil {
		t.Fatal(err)
	}
	r.openGuest(t)
	if err := r.guest.Do(ctx(t), workload.Op{Disk: "vdb", Kind: "data", Offset: 0, Length: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	pt := r.cycle(t) // byte-exact against the other image, or it fails here
	if d := diskNamed(t, pt, "vdb"); !d.Resync {
		t.Fatalf("point %d: vdb, now another image, taken incrementally from %q", pt.ID, d.BaseGeneration)
	}
	if d := diskNamed(t, pt, "vda"); d.Resync {
		t.Fatalf("point %d: vda resynced, though only vdb changed", pt.ID)
	}
}

// The record of the disks' images that a failback writes into follows the
// disks: after a disk moved to another image and a disk that is no local
// file (an NBD one) was added, the next commit's record names the new image,
// leaves the NBD disk out and keeps no disk the VM no longer has. Before, a
// disk that is no local file kept the record as an earlier commit had left
// it, naming the image the VM no longer used.
func TestImagesRecordFollowsTheDisks(t *testing.T) {
	betweenCycles(t)
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	// An NBD disk: served by another daemon, read by this one.
	far := testvm.Start(t, testvm.DiskSpec{Name: "vdc", Format: "raw", Size: 4 << 20})
	m := r.vm.Monitor()
	r.guest.Close()
	err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "raw", "node-name": "vdc",
		"file": map[string]any{"driver": "nbd", "node-name": "vdc-nbd", "export": "vdc",
			"server": map[string]any{"type": "unix", "path": far.NBDSocket()}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.ExportAdd(ctx(t), qemu.Export{ID: "vdc", Node: "vdc", Name: "vdc", Writable: true}); err != nil {
		t.Fatal(err)
	}
	r.disks = append(r.disks, workload.Disk{Name: "vdc", Size: 4 << 20})
	r.openGuest(t)
	// vda moves to another image, vdb goes.
	moved := r.vm.ImagePath("vda-moved") + ".qcow2"
	if err := qemu.CreateImage(ctx(t), moved, "qcow2", vdaSize, "", ""); err != nil {
		t.Fatal(err)
	}
	r.unplug(t, "vda")
	r.attach(t, "vda", "vda-moved", moved, vdaSize)
	r.unplug(t, "vdb")
	r.cycle(t)
	images, err := protect.ReadImages(r.p.VM.WorkDir)
	if err != nil {
		t.Fatal(err)
	}
	want := []protect.DiskImage{{Name: "vda", File: moved, Format: "qcow2"}}
	if !slices.Equal(images, want) {
		t.Fatalf("the record of the images after the commit: %+v, want %+v", images, want)
	}
}

// Retention across a disk's removal and return: with keep 2, the points that
// hold a disk, lack it, and hold it again (a new lineage) merge into one
// another, and every point left still reads byte-exact and verifies.
func TestRetentionAcrossARemovedDisk(t *testing.T) {
	betweenCycles(t)
	r := newRig(t, wire.CompressionZstd)
	r.site = testsite.Start(t, recovery.Options{Keep: 2})
	r.p.Target = r.site.Dial(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.3); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]map[string]string{}
	check := func() {
		t.Helper()
		pts := r.points(t)
		if len(pts) > 2 {
			t.Fatalf("%d points kept, want 2 at most", len(pts))
		}
		for _, pt := range pts {
			if len(pt.Disks) != len(want[pt.ID]) {
				t.Fatalf("point %d holds %d disks, the VM had %d", pt.ID, len(pt.Disks), len(want[pt.ID]))
			}
			for _, d := range pt.Disks {
				if got := r.exportHash(t, pt.ID, d.Name); got != want[pt.ID][d.Name] {
					t.Fatalf("point %d disk %s after retention: sha256 %s, the source at the instant %s", pt.ID, d.Name, got[:12], want[pt.ID][d.Name][:12])
				}
			}
			if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
				t.Fatalf("verify point %d: %v", pt.ID, err)
			}
		}
	}
	step := func(change func()) {
		t.Helper()
		if change != nil {
			change()
		}
		if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
			t.Fatal(err)
		}
		h, err := r.guest.Hashes(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		pt := r.cycle(t)
		want[pt.ID] = h
		r.site.Store.SettleRetention()
		check()
	}
	step(nil)
	step(func() { r.unplug(t, "vdb") })
	step(nil)
	step(func() {
		r.guest.Close()
		if err := r.vm.Monitor().ExportAdd(ctx(t), qemu.Export{ID: "vdb", Node: "vdb", Name: "vdb", Writable: true}); err != nil {
			t.Fatal(err)
		}
		r.disks = append(r.disks, workload.Disk{Name: "vdb", Size: vdbSize})
		r.openGuest(t)
	})
	for range 3 {
		step(nil)
	}
}

// A disk replaced between cycles by another image under the same export id
// (a disk restored from a backup, of another size): the generations on the
// new image prove nothing, so it is resynchronised by hashes against the
// replica, and the point is byte-exact whether the new image is smaller or
// larger than the old one; the next cycle is incremental again.
func TestDiskReplacedBetweenCycles(t *testing.T) {
	betweenCycles(t)
	for _, size := range []int64{vdaSize / 4, vdaSize * 2} {
		t.Run(strconv.FormatInt(size>>20, 10)+"MiB", func(t *testing.T) {
			r := newRig(t, wire.CompressionZstd)
			if err := r.guest.Fill(ctx(t), 0.9); err != nil {
				t.Fatal(err)
			}
			p1 := r.cycle(t)
			other := r.vm.ImagePath("vda-backup") + ".qcow2"
			if err := qemu.CreateImage(ctx(t), other, "qcow2", size, "", ""); err != nil {
				t.Fatal(err)
			}
			// The backup holds part of what vda held, and data of its own.
			out, err := exec.CommandContext(ctx(t), "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 1M", other).CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-io: %v: %s", err, out)
			}
			r.unplug(t, "vda")
			r.attach(t, "vda", "vda-backup", other, size)
			pt := r.cycle(t)
			d := diskNamed(t, pt, "vda")
			if !d.Resync || d.Size != size || d.Lineage != diskNamed(t, p1, "vda").Lineage {
				t.Fatalf("point %d: the replaced vda: resync %v, size %d, lineage %s; want a resync at %d bytes in the disk's lineage", pt.ID, d.Resync, d.Size, d.Lineage, size)
			}
			if _, err := r.site.Store.Verify(ctx(t), "vm1", pt.ID, nil); err != nil {
				t.Fatalf("verify point %d: %v", pt.ID, err)
			}
			if _, err := r.guest.Mixed(ctx(t), 10); err != nil {
				t.Fatal(err)
			}
			if d := diskNamed(t, r.cycle(t), "vda"); d.Resync {
				t.Fatal("vda resynced again after its resync")
			}
		})
	}
}

// scsiVM is a qemu-system (CPUs stopped, as testvm.System) whose disks are
// scsi-hd devices on a virtio-scsi bus, where QEMU plugs and unplugs a disk
// without the guest's help; models is each disk's content as written.
type scsiVM struct {
	*testvm.System
	dir    string
	models map[string][]byte
	nodes  int
}

const scsiDiskSize = 8 << 20

// plug adds a new empty qcow2 disk on device id dev, as libvirt hotplugs one.
func (v *scsiVM) plug(t *testing.T, dev string) {
	t.Helper()
	v.nodes++
	node := fmt.Sprintf("libvirt-%d-format", v.nodes)
	image := filepath.Join(v.dir, node+".qcow2")
	if err := qemu.CreateImage(ctx(t), image, "qcow2", scsiDiskSize, "", ""); err != nil {
		t.Fatal(err)
	}
	m := v.Monitor()
	err := m.BlockdevAdd(ctx(t), map[string]any{"driver": "qcow2", "node-name": node,
		"file": map[string]any{"driver": "file", "node-name": fmt.Sprintf("libvirt-%d-storage", v.nodes), "filename": image}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx(t), "device_add", map[string]any{"driver": "scsi-hd", "drive": node, "id": dev, "bus": "scsi0.0"}, nil); err != nil {
		t.Fatal(err)
	}
	v.models[dev] = make([]byte, scsiDiskSize)
}

// unplug removes device dev (its node stays, as a -blockdev's does) and
// waits until QEMU has.
func (v *scsiVM) unplug(t *testing.T, dev string) {
	t.Helper()
	m := v.Monitor()
	if err := m.Execute(ctx(t), "device_del", map[string]any{"id": dev}, nil); err != nil {
		t.Fatal(err)
	}
	for {
		disks, err := m.Disks(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(disks, func(n qemu.BlockNode) bool { return n.Name == dev }) {
			break
		}
		select {
		case <-ctx(t).Done():
			t.Fatalf("device %s never went", dev)
		case <-time.After(10 * time.Millisecond):
		}
	}
	delete(v.models, dev)
}

// write is a guest write of pattern over n bytes at off of device dev.
func (v *scsiVM) write(t *testing.T, dev string, pattern byte, off, n int64) {
	t.Helper()
	var out string
	cmd := fmt.Sprintf(`qemu-io -d %s "write -P %d %d %d"`, dev, pattern, off, n)
	if err := v.Monitor().Execute(ctx(t), "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil || out != "" {
		t.Fatalf("%s: %v %s", cmd, err, out)
	}
	copy(v.models[dev][off:off+n], bytes.Repeat([]byte{pattern}, int(n)))
}

// check fails unless the point holds exactly the disks of want, each
// byte-identical to its model.
func (v *scsiVM) check(t *testing.T, site *testsite.Site, pt lifeboat.Point, want map[string][]byte) {
	t.Helper()
	r := &rig{site: site}
	hashes := map[string]string{}
	for dev, model := range want {
		r.disks = append(r.disks, workload.Disk{Name: dev, Size: scsiDiskSize})
		h := sha256.Sum256(model)
		hashes[dev] = hex.EncodeToString(h[:])
	}
	if len(pt.Disks) != len(want) {
		t.Fatalf("point %d holds %+v, want disks %v", pt.ID, pt.Disks, slices.Sorted(maps.Keys(want)))
	}
	r.checkPoint(t, pt.ID, hashes)
}

// Disks plugged into and out of a qemu-system, named by their device ids:
// one added between cycles is sent whole; one replaced by another image
// under the same device id after the cycle resolved it fails the cycle,
// naming it, and the next point holds the new image; one unplugged before
// the instant (its -blockdev node kept) is in the point as it was last, and
// in no later point. Nothing of lifeboat's is left in the VM's QEMU.
func TestQEMUSystemDisksPluggedAndUnplugged(t *testing.T) {
	betweenCycles(t)
	dir := testsite.ShortDir(t)
	v := &scsiVM{dir: dir, models: map[string][]byte{}}
	// sdc is a -drive: its node goes with its device.
	sdc := filepath.Join(dir, "sdc.qcow2")
	if err := qemu.CreateImage(ctx(t), sdc, "qcow2", scsiDiskSize, "", ""); err != nil {
		t.Fatal(err)
	}
	v.System = testvm.StartSystem(t, dir, "-device", "virtio-scsi-pci,id=scsi0",
		"-drive", "if=none,id=drive-sdc,format=qcow2,file="+sdc, "-device", "scsi-hd,drive=drive-sdc,id=sdc,bus=scsi0.0")
	v.models["sdc"] = make([]byte, scsiDiskSize)
	v.plug(t, "sda")
	site := testsite.Start(t, recovery.Options{Keep: 10})
	log := &testenv.LogBuffer{}
	p := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: v.QMPSocket(), WorkDir: testsite.ShortDir(t)},
		Target: site.Dial(t, wire.CompressionZstd), Readers: 2,
		Log: slog.New(slog.NewTextHandler(log, nil)),
	}
	cycle := func() lifeboat.Point {
		t.Helper()
		want := maps.Clone(v.models)
		for dev, m := range want {
			want[dev] = slices.Clone(m)
		}
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		v.check(t, site, pt, want)
		return pt
	}
	v.write(t, "sda", 0x11, 0, 1<<20)
	v.write(t, "sdc", 0x12, 2<<20, 1<<20)
	cycle()

	v.plug(t, "sdb")
	v.write(t, "sdb", 0x22, 1<<20, 2<<20)
	v.write(t, "sda", 0x33, 4<<20, 64<<10)
	pt := cycle()
	if d := diskNamed(t, pt, "sdb"); !d.Resync || d.Base != 0 {
		t.Fatalf("point %d: the added sdb resync %v from %d, want sent whole", pt.ID, d.Resync, d.Base)
	}
	if d := diskNamed(t, pt, "sda"); d.Resync {
		t.Fatalf("point %d: sda resynced", pt.ID)
	}

	// sdb replaced by an empty image once the cycle resolved it.
	p.Hooks.BeforeFleece = func(context.Context) error {
		v.unplug(t, "sdb")
		v.plug(t, "sdb")
		return nil
	}
	_, err := p.Cycle(ctx(t))
	p.Hooks.BeforeFleece = nil
	if err == nil || !strings.Contains(err.Error(), `disk "sdb" was replaced`) {
		t.Fatalf("a cycle whose disk sdb was replaced before its instant: %v", err)
	}
	t.Logf("the cycle failed as it should: %v", err)
	v.write(t, "sdb", 0x44, 0, 64<<10)
	pt = cycle()
	if d := diskNamed(t, pt, "sdb"); !d.Resync {
		t.Fatalf("point %d: the replaced sdb taken incrementally from %q", pt.ID, d.BaseGeneration)
	}

	// sda unplugged once the cycle resolved it: the point holds it as it was.
	v.write(t, "sda", 0x55, 0, 64<<10)
	last := slices.Clone(v.models["sda"])
	p.Hooks.BeforeFleece = func(context.Context) error {
		v.unplug(t, "sda")
		return nil
	}
	want := map[string][]byte{"sda": last, "sdb": slices.Clone(v.models["sdb"]), "sdc": slices.Clone(v.models["sdc"])}
	pt, err = p.Cycle(ctx(t))
	p.Hooks.BeforeFleece = nil
	if err != nil {
		t.Fatal(err)
	}
	v.check(t, site, pt, want)

	// sdc, a -drive, unplugged while the blocks are sent: the point holds
	// it at the instant; its node goes once the fleece lets it go, and the
	// generations with it, which is no failure.
	v.write(t, "sdc", 0x66, 0, 64<<10)
	want = map[string][]byte{"sdb": slices.Clone(v.models["sdb"]), "sdc": slices.Clone(v.models["sdc"])}
	p.Hooks.AfterPlan = func(context.Context) error {
		v.unplug(t, "sdc")
		return nil
	}
	pt, err = p.Cycle(ctx(t))
	p.Hooks.AfterPlan = nil
	if err != nil {
		t.Fatal(err)
	}
	v.check(t, site, pt, want)
	if strings.Contains(log.String(), "level=ERROR") {
		t.Fatalf("a disk removed during a cycle logged an error:\n%s", log)
	}
	cycle()
	nodes, err := v.Monitor().Nodes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, qemu.OwnPrefix) {
			t.Fatalf("lifeboat left node %s in the VM's QEMU", n.NodeName)
		}
	}
}

// A raw disk's node reopened onto another image while the cycle reads its
// blocks: the fleece reads what the guest left alone since the instant from
// the node, which now reads the other file. The cycle fails naming the disk,
// nothing is listed, and the next point holds the other image byte-exact.
func TestRawDiskReopenedWhileSending(t *testing.T) {
	r := newRig(t, wire.CompressionZstd)
	if err := r.guest.Fill(ctx(t), 0.5); err != nil {
		t.Fatal(err)
	}
	r.cycle(t)
	reopen := r.otherRawFile(t)
	if _, err := r.guest.Mixed(ctx(t), 20); err != nil {
		t.Fatal(err)
	}
	r.p.Hooks.AfterInstant = reopen
	pt, err := r.p.Cycle(ctx(t))
	r.p.Hooks.AfterInstant = nil
	if err == nil {
		t.Fatalf("the cycle made point %d of vdb, whose node was reopened onto another image while it was read", pt.ID)
	}
	t.Logf("the cycle failed as it should: %v", err)
	if !strings.Contains(err.Error(), `disk "vdb"`) {
		t.Fatalf("the error does not name the disk: %v", err)
	}
	if n := len(r.points(t)); n != 1 {
		t.Fatalf("%d points listed, want 1", n)
	}
	r.noLeftovers(t)
	pt = r.cycle(t)
	if d := diskNamed(t, pt, "vdb"); !d.Resync {
		t.Fatalf("point %d: vdb, now another image, taken incrementally from %q", pt.ID, d.BaseGeneration)
	}
}

// A disk added to a VM whose config names its disks (`disks:`) is not
// protected until the config names it too: the cycle says so, once, naming
// the disk, and its points hold only the disks named.
func TestDiskAddedOutsideDisksIsReported(t *testing.T) {
	betweenCycles(t)
	r := newRig(t, wire.CompressionZstd)
	log := &testenv.LogBuffer{}
	r.p.Log = slog.New(slog.NewTextHandler(log, nil))
	r.p.VM.Disks = []string{"vda", "vdb"}
	r.cycle(t)
	if strings.Contains(log.String(), "does not name") {
		t.Fatalf("a warning of an unnamed disk while every disk is named:\n%s", log)
	}
	r.hotAdd(t, "vdc", 4<<20)
	r.disks = r.disks[:2] // the points hold vda and vdb
	pt, err := r.p.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(pt.Disks) != 2 {
		t.Fatalf("point %d holds %+v, want vda and vdb", pt.ID, pt.Disks)
	}
	if !strings.Contains(log.String(), "does not name: it is not replicated") || !strings.Contains(log.String(), "disk=vdc") {
		t.Fatalf("the added disk vdc, which `disks:` does not name, went unreported:\n%s", log)
	}
}

// betweenCycles skips, in the suite's -race -short pass, a test whose
// topology changes come between cycles: nothing runs concurrently with the
// cycle there that the race detector could catch, and the plain pass runs it.
func betweenCycles(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("changes the disks between cycles only: covered by the full (non -short) run")
	}
}

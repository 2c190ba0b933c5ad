package virt_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/virt"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// The domain's disks come from its XML, named by target; a pull backup with
// a checkpoint exports each disk and, incrementally, its changes; ending it
// leaves no job, no scratch file and no socket behind.
func TestDescribeCheckpointBackup(t *testing.T) {
	dom := testlibvirt.Boot(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 << 20}, {Target: "vdb", Size: 8 << 20, Format: "raw"},
	}})
	ctx := testCtx(t)
	c, err := virt.Dial(ctx, testlibvirt.URI)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Domain(ctx, "no-such-domain"); err == nil {
		t.Fatal("lookup of a missing domain succeeded")
	}
	d, err := c.Domain(ctx, dom.Name)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := d.Describe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var targets []string
	for _, dk := range desc.Disks {
		targets = append(targets, dk.Target+"/"+dk.Format)
	}
	if !slices.Equal(targets, []string{"vda/qcow2", "vdb/raw"}) {
		t.Fatalf("disks %v, want vda/qcow2 vdb/raw", targets)
	}
	if desc.UID <= 0 {
		t.Errorf("QEMU's user from the DAC label: %d, want libvirt-qemu's", desc.UID)
	}

	run := filepath.Join(dom.Dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(run, desc.UID, desc.GID); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(run, "nbd.sock")
	begin := func(cp, inc string) {
		t.Helper()
		err := d.BeginBackup(ctx, virt.Backup{Socket: sock, Checkpoint: cp, Description: "test",
			Disks:  []virt.BackupDisk{{Target: "vda", Incremental: inc, Scratch: filepath.Join(run, "vda.scratch"), Track: true}},
			Others: []string{"vdb"}})
		if err != nil {
			t.Fatal(err)
		}
	}
	begin("t1", "")
	if job, err := d.Job(ctx); err != nil || job != "backup" {
		t.Errorf("job during the backup: %q %v, want backup", job, err)
	}
	if running, s, err := d.BackupRunning(ctx); err != nil || !running || s != sock {
		t.Errorf("BackupRunning: %v %q %v", running, s, err)
	}
	cl, err := nbd.Dial(ctx, "unix:"+sock, "vda", nbd.Options{MetaContexts: []string{"base:allocation"}})
	if err != nil {
		t.Fatal(err)
	}
	if cl.Size() != 64<<20 {
		t.Errorf("export size %d", cl.Size())
	}
	cl.Close()
	if err := d.AbortBackup(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoJob(t, ctx, d)
	if ents, _ := os.ReadDir(run); len(ents) != 0 {
		t.Errorf("left in the run directory after the backup: %v", ents)
	}

	begin("t2", "t1")
	cl, err = nbd.Dial(ctx, "unix:"+sock, "vda", nbd.Options{MetaContexts: []string{"base:allocation", virt.ExportBitmap("vda")}})
	if err != nil {
		t.Fatalf("incremental export with its bitmap: %v", err)
	}
	cl.Close()
	if err := d.AbortBackup(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoJob(t, ctx, d)

	cps, err := d.Checkpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, cp := range cps {
		names = append(names, cp.Name)
		if !slices.Equal(cp.Disks, []string{"vda"}) || cp.Description != "test" {
			t.Errorf("checkpoint %+v: want disks [vda] and its description", cp)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"t1", "t2"}) {
		t.Fatalf("checkpoints %v, want t1 t2", names)
	}
	if err := d.DeleteCheckpoint(ctx, "t1"); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteCheckpoint(ctx, "t1"); err != nil {
		t.Errorf("deleting a deleted checkpoint: %v", err)
	}
	if err := d.AbortBackup(ctx); err != nil {
		t.Errorf("ending a backup when none runs: %v", err)
	}
}

func waitNoJob(t *testing.T, ctx context.Context, d *virt.Domain) {
	t.Helper()
	for range 100 {
		job, err := d.Job(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if job == "" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("the backup job did not end")
}

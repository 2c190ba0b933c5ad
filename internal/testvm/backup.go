package testvm

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Backup is another tool's backup of one disk node, made the way libvirt
// makes one (virtnbdbackup drives these): what lifeboat must live beside.
type Backup struct {
	Job     string // its block job's id
	Scratch string // its scratch (pull) or target (push) node
	Export  string // the NBD export name of the scratch; "" for a push backup

	m          *qemu.Monitor
	exportID   string
	stopServer bool
}

// backups numbers the backups' nodes.
var backups atomic.Int64

// PullBackup starts a pull backup of node as libvirt does: a qcow2 scratch
// in dir backed by the disk's node, blockdev-backup sync=none into it (its
// copy-before-write filter goes in front of the disk), then the scratch
// exported read-only over NBD as export. It starts the NBD server on
// serverSocket first, unless that is "" (the QEMU runs one already).
func PullBackup(t testing.TB, m *qemu.Monitor, node, dir, export, serverSocket string) *Backup {
	t.Helper()
	b := &Backup{Job: "backup-" + export, Export: export, m: m, exportID: "backup-export-" + export, stopServer: serverSocket != ""}
	b.target(t, node, dir, true)
	b.run(t, "blockdev-backup", map[string]any{"device": node, "target": b.Scratch, "sync": "none", "job-id": b.Job})
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if serverSocket != "" {
		if err := m.NBDServerStart(ctx, serverSocket); err != nil {
			t.Fatalf("testvm: pull backup: %v", err)
		}
	}
	if err := m.ExportAdd(ctx, qemu.Export{ID: b.exportID, Node: b.Scratch, Name: export}); err != nil {
		t.Fatalf("testvm: pull backup: %v", err)
	}
	return b
}

// PushBackup starts a push backup of node as libvirt does: a new qcow2 target
// node in dir and blockdev-backup sync=full into it, slowed so that it runs
// until End.
func PushBackup(t testing.TB, m *qemu.Monitor, node, dir string) *Backup {
	t.Helper()
	b := &Backup{m: m}
	b.target(t, node, dir, false)
	b.Job = "backup-push-" + b.Scratch
	b.run(t, "blockdev-backup", map[string]any{"device": node, "target": b.Scratch, "sync": "full", "job-id": b.Job, "speed": 64 << 10})
	return b
}

// target adds the backup's scratch or target node, of the disk's size, over a
// new image in dir; a scratch has the disk's node as its backing. Its nodes
// are named as libvirt's are, with numbers no test VM uses.
func (b *Backup) target(t testing.TB, node, dir string, backed bool) {
	t.Helper()
	n := 900 + backups.Add(1)
	b.Scratch = fmt.Sprintf("libvirt-%d-format", n)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	disk, err := b.m.Node(ctx, node)
	if err != nil {
		t.Fatalf("testvm: backup: %v", err)
	}
	file := filepath.Join(dir, b.Scratch+".qcow2")
	if err := qemu.CreateImage(ctx, file, "qcow2", disk.Size, "", ""); err != nil {
		t.Fatalf("testvm: backup: %v", err)
	}
	spec := map[string]any{"driver": "qcow2", "node-name": b.Scratch,
		"file": map[string]any{"driver": "file", "filename": file, "node-name": fmt.Sprintf("libvirt-%d-storage", n)}}
	if backed {
		spec["backing"] = node
	}
	b.run(t, "blockdev-add", spec)
}

func (b *Backup) run(t testing.TB, cmd string, args map[string]any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := b.m.Execute(ctx, cmd, args, nil); err != nil {
		t.Fatalf("testvm: backup: %s: %v", cmd, err)
	}
}

// Running reports whether the backup's job still runs (nil), or what became of it.
func (b *Backup) Running(ctx context.Context) error {
	jobs, err := b.m.Jobs(ctx)
	if err != nil {
		return err
	}
	for _, j := range jobs {
		if j.ID == b.Job {
			if j.Status != "running" {
				return fmt.Errorf("backup job %s is %s", b.Job, j.Status)
			}
			return nil
		}
	}
	return fmt.Errorf("backup job %s is gone; jobs: %+v", b.Job, jobs)
}

// End finishes the backup as libvirt does: the export removed, the job
// cancelled, the NBD server it started stopped, the scratch node deleted.
func (b *Backup) End(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if b.Export != "" {
		if err := b.m.ExportDelForce(ctx, b.exportID); err != nil {
			t.Fatalf("testvm: end backup: %v", err)
		}
	}
	if err := b.m.CancelJob(ctx, b.Job); err != nil {
		t.Fatalf("testvm: end backup: %v", err)
	}
	if b.stopServer {
		if err := b.m.NBDServerStop(ctx); err != nil {
			t.Fatalf("testvm: end backup: %v", err)
		}
	}
	b.run(t, "blockdev-del", map[string]any{"node-name": b.Scratch})
}

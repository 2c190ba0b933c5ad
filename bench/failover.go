package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
)

// failoverRow is one disk size's recovery time.
type failoverRow struct {
	DiskSize  int64
	ToRunning time.Duration // lifeboat failover: command to QEMU running the guest
	ToAgent   time.Duration // ... to the guest agent answering
	Export    time.Duration // the contender: copy the point out whole first (lifeboat export, a restore)
	Identical string        // the recovered guest read its data disk's label: the point's file system
}

type failoverResult struct {
	Skipped string
	Data    int64
	Rows    []failoverRow
}

// benchFailover measures the recovery time objective: for each disk size, a
// point of the test guest's data disk (an empty ext4 file system, sparse) is
// replicated, then `failover` starts the guest from it at the recovery site.
// Beside it, the time to copy the same point out whole first, which is what
// a restore from a backup costs before anything can boot.
func benchFailover(ctx context.Context, e *env) (*failoverResult, error) {
	res := &failoverResult{Data: e.cfg.FailoverData}
	kernel, initrd, err := testguest.Kernel()
	if err != nil {
		if inCI() {
			return nil, err
		}
		res.Skipped = err.Error()
		return res, nil
	}
	for _, sz := range e.cfg.FailoverDisks {
		row, err := failoverOn(ctx, e, sz, kernel, initrd)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, row)
	}
	return res, nil
}

func inCI() bool { return os.Getenv("CI") == "true" }

func failoverOn(ctx context.Context, e *env, diskSize int64, kernel, initrd string) (failoverRow, error) {
	row := failoverRow{DiskSize: diskSize}
	name := fmt.Sprintf("fo-%dg", diskSize/gib)
	dir := e.path(name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return row, err
	}
	defer e.stop("failover disk", func() error { return os.RemoveAll(dir) })
	e.progress("failover, %s disk: an ext4 data disk holding %s of data, replicated", size(diskSize), size(e.cfg.FailoverData))
	image := filepath.Join(dir, "vda.qcow2")
	if err := sparseExt4(ctx, image, diskSize, e.cfg.FailoverData); err != nil {
		return row, err
	}
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: filepath.Join(dir, "src"), Args: qemu.DiskArgs(diskName, image, "qcow2"), NBD: true})
	if err != nil {
		return row, err
	}
	defer e.stop("source daemon", func() error { return d.Stop(context.Background()) })
	v := protect.VM{Name: "bench-fo", QMPSocket: d.ClientQMPSocket(), NBDSocket: d.NBDSocket(), Disks: []string{diskName},
		WorkDir: filepath.Join(dir, "work"),
		// What a storage daemon's QMP cannot tell, as the VM's config says it.
		Definition: lifeboat.Definition{Source: "config", Machine: "q35", CPUs: 1, MemoryMiB: 512, Kernel: kernel, Initrd: initrd,
			Append: "console=ttyS0 panic=-1 lb.workload=none", Disks: []lifeboat.DefinitionDisk{{Name: diskName, Device: "virtio-blk-pci"}}}}
	rep, err := newReplication(ctx, filepath.Join(dir, "site"), v, "zstd", e.log)
	if err != nil {
		return row, err
	}
	defer e.stop("recovery site", rep.Stop)
	pt, err := rep.P.Cycle(ctx)
	if err != nil {
		return row, err
	}
	runs, err := os.MkdirTemp("", "lbfo") // short: the run's unix sockets live there
	if err != nil {
		return row, err
	}
	defer os.RemoveAll(runs)
	m := &failover.Manager{Store: rep.Site.Store, Dir: runs, Site: "dr", Log: e.log}
	e.progress("failover, %s disk: lifeboat failover of point %d", size(diskSize), pt.ID)
	r, err := m.Start(ctx, v.Name, failover.Options{})
	if err != nil {
		return row, err
	}
	defer e.stop("failed-over VM", func() error { return m.Stop(context.Background(), r) })
	actx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	err = m.WaitAgent(actx, r)
	cancel()
	if err != nil {
		return row, err
	}
	row.ToRunning, row.ToAgent = r.ToRunning, r.ToAgent
	row.Identical = "no"
	if out, err := guestOutput(ctx, r.Agent, "/bin/cat", "/proc/mounts"); err == nil && strings.Contains(out, "/dev/vda /data ext4") {
		row.Identical = "yes" // the guest mounted the point's file system as its /data
	}
	e.progress("failover, %s disk: the contender, the point copied out whole first", size(diskSize))
	out := filepath.Join(dir, "restored.qcow2")
	begin := time.Now()
	if err := rep.Site.Store.Export(ctx, v.Name, pt.ID, diskName, out, "qcow2"); err != nil {
		return row, err
	}
	row.Export = time.Since(begin)
	os.Remove(out)
	return row, nil
}

// sparseExt4 makes a qcow2 image holding data bytes of random data and an
// empty ext4 file system labelled "data" (what the test guest mounts as
// /data), its inode tables left for the kernel to initialise lazily: a
// 256 GiB disk costs megabytes of metadata, not the 4 GiB of tables an eager
// mkfs writes.
func sparseExt4(ctx context.Context, image string, size, data int64) error {
	raw := image + ".raw"
	defer os.Remove(raw)
	// The data first: mkfs (nodiscard) leaves it in the blocks it does not
	// use, so the point holds it and a copy of the point must copy it.
	if err := writeRawData(raw, size, data, uint64(size)); err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "data", "-E", "nodiscard", raw).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %v: %s", raw, err, out)
	}
	return qemu.Convert(ctx, raw, "raw", image, "qcow2")
}

func guestOutput(ctx context.Context, socket, path string, args ...string) (string, error) {
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	a, err := qga.Dial(actx, socket)
	if err != nil {
		return "", err
	}
	defer a.Close()
	out, err := a.Output(actx, path, args...)
	return string(out), err
}

func (r *failoverResult) print(e *env) {
	e.printf("\n## 6. Failover: recovery time, the test guest started at the recovery site from a point\n\n")
	if r.Skipped != "" {
		e.printf("skipped: %s\n", r.Skipped)
		return
	}
	t := e.table("disk", "lifeboat: QEMU running", "agent answering", "copy the point out first (restore)", "ratio", "goal: running ≤ 2 s", "guest mounted the point's /data")
	for _, x := range r.Rows {
		goal := "met"
		if x.ToRunning > 2*time.Second {
			goal = "MISSED"
		}
		t.row(fmt.Sprintf("%s, %s data", size(x.DiskSize), size(r.Data)), secs(x.ToRunning.Seconds()), secs(x.ToAgent.Seconds()), secs(x.Export.Seconds()),
			ratio(x.ToRunning.Seconds(), x.Export.Seconds()), goal, x.Identical)
	}
	t.flush()
	e.printf("\nTimes from the failover command. lifeboat: a writable overlay above the point's image (nothing copied), the\n" +
		"ownership taken, qemu-system-x86_64 started from the point's definition (TCG: KVM does not work here; the agent\n" +
		"answers once the test guest's kernel has booted under TCG). The contender copies the point's chain out whole\n" +
		"(lifeboat export, qemu-img convert), what restoring a backup costs before anything boots: it grows with the data.\n" +
		"AWS Elastic Disaster Recovery quotes 5-20 minutes for the same step.\n")
}

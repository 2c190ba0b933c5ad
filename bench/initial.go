package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"

	"github.com/lifeboat-dr/lifeboat/wire"
)

// toolRow is one contender's run of one benchmark.
type toolRow struct {
	Tool string
	M    measured
	// Own is the CPU of the contender itself (lifeboat: this process, both
	// sites; a peer: its process), Qemu that of the QEMU processes serving it
	// (the source qemu-storage-daemon; for lifeboat also the recovery site's
	// writer daemon and qemu-img).
	Own, Qemu float64
	Changed   int64 // bytes the contender had to consider, when it says
	Data      int64 // of which sent as block data
	Sent      int64 // bytes lifeboat put on the wire
	Identical string
	Skipped   string // why the contender did not run
}

type initialResult struct {
	DiskSize, Data int64
	Rows           []toolRow
}

// benchInitial: the first copy of a disk holding data: lifeboat's initial sync
// to a recovery site against nbdcopy reading the same export into a local file
// and qemu-img convert copying the image file (the local-copy ceiling).
func benchInitial(ctx context.Context, e *env) (*initialResult, error) {
	c := e.cfg
	res := &initialResult{DiskSize: c.InitDisk, Data: c.InitData}
	e.progress("initial sync: %s qcow2, writing %s of random data through the VM's NBD export", size(c.InitDisk), size(c.InitData))
	vm, err := startVM(ctx, e.path("init-vm"), c.InitDisk, 1)
	if err != nil {
		return nil, err
	}
	defer e.stop("source VM", vm.Stop)
	if err := vm.Guest.Fill(ctx, float64(c.InitData)/float64(c.InitDisk)); err != nil {
		return nil, err
	}
	if err := vm.Flush(ctx); err != nil {
		return nil, err
	}

	for _, comp := range []wire.Compression{wire.CompressionZstd, wire.CompressionNone} {
		e.progress("initial sync: lifeboat, compression %s", comp)
		rep, err := startReplication(ctx, e.path("init-site-"+string(comp)), "bench-init", vm, comp, e.log)
		if err != nil {
			return nil, err
		}
		pt, m, err := rep.Cycle(ctx)
		if err != nil {
			rep.Stop()
			return nil, err
		}
		row := toolRow{Tool: "lifeboat, zstd", M: m, Own: m.CPU.Self, Qemu: m.CPU.Reaped + m.CPU.Live,
			Changed: pt.Stats.BytesChanged, Data: pt.Stats.BytesData, Sent: pt.Stats.BytesSent}
		if comp == wire.CompressionNone {
			row.Tool = "lifeboat, no compression"
		}
		ok, err := rep.Identical(ctx, pt.ID, vm.Image)
		if err != nil {
			rep.Stop()
			return nil, fmt.Errorf("compare the replica with the source: %w", err)
		}
		row.Identical = yesNo(ok)
		res.Rows = append(res.Rows, row)
		if err := rep.Stop(); err != nil {
			return nil, err
		}
	}

	// nbdcopy reads the same export of the disk node that lifeboat's fleece sits
	// on. Each peer's output is fsynced inside its timing: lifeboat's commit
	// flushes the replica to disk, and neither peer does by default.
	out := e.path("init-nbdcopy.raw")
	row := toolRow{Tool: nbdcopyTool}
	if why := missing("nbdcopy"); why != "" {
		row.Skipped = why
	} else {
		e.progress("initial sync: nbdcopy")
		row.M, err = measure(func() error { return runDurable(ctx, out, "nbdcopy", vm.NBDURI(), out) })
		if err != nil {
			return nil, err
		}
		row.Own, row.Qemu = row.M.CPU.Reaped, row.M.CPU.Live
		row.Identical = "-"
	}
	os.Remove(out)
	res.Rows = append(res.Rows, row)

	// qemu-img convert reads the image file itself (-U: the daemon holds it),
	// no NBD, no network: what a local copy costs at best.
	out = e.path("init-convert.qcow2")
	row = toolRow{Tool: "qemu-img convert -O qcow2"}
	e.progress("initial sync: qemu-img convert")
	row.M, err = measure(func() error {
		return runDurable(ctx, out, "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", vm.Image, out)
	})
	if err != nil {
		return nil, err
	}
	row.Own, row.Qemu = row.M.CPU.Reaped, row.M.CPU.Live
	row.Identical = "-"
	os.Remove(out)
	res.Rows = append(res.Rows, row)
	return res, nil
}

func (r *initialResult) print(e *env) {
	e.printf("\n## 1. Initial sync: %s qcow2 holding %s of random data (page cache hot: the data was just written)\n\n",
		size(r.DiskSize), size(r.Data))
	var base *toolRow
	for i := range r.Rows {
		if r.Rows[i].Tool == nbdcopyTool && r.Rows[i].Skipped == "" {
			base = &r.Rows[i]
		}
	}
	t := e.table("contender", "time", "MiB/s", "CPU s", "own + qemu", "sent", "speed vs nbdcopy", "replica identical")
	for _, row := range r.Rows {
		if row.Skipped != "" {
			t.row(row.Tool, "skipped: "+row.Skipped)
			continue
		}
		vs := "-"
		if base != nil {
			vs = ratio(base.M.Wall.Seconds(), row.M.Wall.Seconds())
		}
		sent := "-"
		if row.Sent > 0 {
			sent = size(row.Sent)
		}
		t.row(row.Tool, secs(row.M.Wall.Seconds()), fmt.Sprintf("%.0f", mibps(r.Data, row.M.Wall.Seconds())),
			fmt.Sprintf("%.1f", row.Own+row.Qemu), fmt.Sprintf("%.1f + %.1f", row.Own, row.Qemu), sent, vs, row.Identical)
	}
	t.flush()
	e.printf("\nlifeboat: source qemu-storage-daemon → fleece → NBD (%d connections, %d readers, 1 MiB chunks) → BLAKE3 → zstd → gRPC over\n"+
		"loopback mutual TLS → recovery site → its writer qemu-storage-daemon → qcow2 overlay, flushed, point committed.\n"+
		"MiB/s is of the %s of data. CPU own: lifeboat's process (both sites) or the peer tool; qemu: the source daemon\n"+
		"(and for lifeboat the recovery writer daemon and qemu-img). Every contender ends with its copy on disk: lifeboat's\n"+
		"commit flushes the replica, and each peer's output is fsynced within its time. Goal: lifeboat ≥ 1.0× nbdcopy.\n",
		protectConnections, protectReaders, size(r.Data))
}

// missing says why a peer tool cannot run, or "".
func missing(tool string) string {
	if _, err := exec.LookPath(tool); err != nil {
		return tool + " is not installed (`make deps` installs it)"
	}
	return ""
}

const nbdcopyTool = "nbdcopy → raw file"

// runDurable runs a peer tool, then fsyncs its output: the time a copy takes
// to be on disk, as lifeboat's is when its point is committed.
func runDurable(ctx context.Context, out, name string, args ...string) error {
	if err := runTool(ctx, name, args...); err != nil {
		return err
	}
	f, err := os.OpenFile(out, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", out, err)
	}
	return nil
}

// runTool runs a peer tool to its end; its output goes only into an error.
func runTool(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, out)
	}
	return nil
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

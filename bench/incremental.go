package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/lifeboat-dr/lifeboat/wire"
)

type incrementalRow struct {
	DiskSize, Data, Written int64
	Initial                 measured // the initial sync before, for context
	Empty                   measured // a cycle with nothing changed: the fixed cost of one
	Cycle                   toolRow
	Rsync                   toolRow
}

type incrementalResult struct {
	Rows      []incrementalRow
	RsyncArgs []string
}

// benchIncremental: one cycle after small random writes, against rsync of the
// image file to a copy that was identical before the writes; then the same
// change on a larger disk, and a larger change on the first.
func benchIncremental(ctx context.Context, e *env) (*incrementalResult, error) {
	c := e.cfg
	res := &incrementalResult{RsyncArgs: rsyncArgs()}
	for i, diskSize := range c.IncrDisks {
		rows, err := incrementalOn(ctx, e, diskSize, i == 0, res.RsyncArgs)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, rows...)
	}
	return res, nil
}

func incrementalOn(ctx context.Context, e *env, diskSize int64, more bool, rsync []string) ([]incrementalRow, error) {
	c := e.cfg
	name := fmt.Sprintf("incr-%dg", diskSize/gib)
	e.progress("incremental, %s disk: writing %s of random data", size(diskSize), size(c.IncrData))
	vm, err := startVM(ctx, e.path(name+"-vm"), diskSize, uint64(diskSize))
	if err != nil {
		return nil, err
	}
	defer e.stop("source VM", vm.Stop) // deletes the (sparse) image too
	if err := vm.Guest.Fill(ctx, float64(c.IncrData)/float64(diskSize)); err != nil {
		return nil, err
	}
	e.progress("incremental, %s disk: initial sync", size(diskSize))
	rep, err := startReplication(ctx, e.path(name+"-site"), "bench-incr", vm, wire.CompressionZstd, e.log)
	if err != nil {
		return nil, err
	}
	defer e.stop("recovery site", rep.Stop)
	_, initial, _, err := rep.Cycle(ctx)
	if err != nil {
		return nil, err
	}
	_, empty, _, err := rep.Cycle(ctx)
	if err != nil {
		return nil, err
	}

	// rsync's replica: identical to the source before the writes.
	replica := e.path(name + "-rsync-replica.qcow2")
	haveRsync := rsync != nil
	if haveRsync {
		if err := vm.Flush(ctx); err != nil {
			return nil, err
		}
		if err := runTool(ctx, "cp", "--sparse=always", vm.Image, replica); err != nil {
			return nil, err
		}
		defer e.stop("rsync replica", func() error { return removeFile(replica) })
	}

	var rows []incrementalRow
	changes := []int64{c.IncrChange}
	if more && c.IncrMore > 0 {
		changes = append(changes, c.IncrMore)
	}
	for i, change := range changes {
		row := incrementalRow{DiskSize: diskSize, Data: c.IncrData, Written: change, Initial: initial, Empty: empty}
		e.progress("incremental, %s disk: %s of random 4–64 KiB writes, then one cycle", size(diskSize), size(change))
		if err := vm.Guest.Small(ctx, change); err != nil {
			return nil, err
		}
		if err := vm.Flush(ctx); err != nil {
			return nil, err
		}
		pt, m, ph, err := rep.Cycle(ctx)
		if err != nil {
			return nil, err
		}
		row.Cycle = toolRow{Tool: "lifeboat", M: m, CPU: lifeboatCPU(m), Phases: ph,
			Changed: pt.Stats.BytesChanged, Sent: pt.Stats.BytesSent}
		ok, err := rep.Identical(ctx, pt.ID, vm.Image)
		if err != nil {
			return nil, fmt.Errorf("compare the replica with the source: %w", err)
		}
		row.Cycle.Identical = yesNo(ok)

		row.Rsync.Tool = "rsync"
		switch {
		case !haveRsync:
			row.Rsync.Skipped = missing("rsync")
		case i > 0:
			row.Rsync.Skipped = "not run for the larger change (its cost is reading both files, as above)"
		default:
			e.progress("incremental, %s disk: rsync", size(diskSize))
			args := append(append([]string(nil), rsync...), vm.Image, replica)
			row.Rsync.M, err = measure(func() error { return runDurable(ctx, replica, "rsync", args...) })
			if err != nil {
				return nil, err
			}
			row.Rsync.CPU = peerCPU(row.Rsync.M)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

// rsyncArgs are rsync's options for the benchmark, nil when rsync is missing.
// --no-whole-file makes a local rsync use its delta algorithm, reading both
// files as it would across a network. (The replica is fsynced after it, in
// its time, as lifeboat's commit flushes its replica.)
func rsyncArgs() []string {
	if missing("rsync") != "" {
		return nil
	}
	return []string{"--inplace", "--no-whole-file"}
}

func (r *incrementalResult) print(e *env) {
	e.printf("\n## 2. Incremental cycle: random 4–64 KiB writes on a qcow2 disk, then one cycle (zstd) vs rsync %s of the image file\n\n",
		strings.Join(r.RsyncArgs, " "))
	t := e.table("disk", "data", "written", "changed (64 KiB blocks)", "sent", "lifeboat", "prepare / send / commit", "CPU s", "own + source qsd + recovery qemu", "rsync", "CPU s", "lifeboat speed vs rsync", "CPU vs rsync", "replica identical")
	for _, row := range r.Rows {
		rs, rsCPU, vs, vsCPU := "-", "-", "-", "-"
		if row.Rsync.Skipped == "" {
			rs, rsCPU = secs(row.Rsync.M.Wall.Seconds()), fmt.Sprintf("%.1f", row.Rsync.CPU.Total())
			vs = ratio(row.Rsync.M.Wall.Seconds(), row.Cycle.M.Wall.Seconds())
			vsCPU = ratio(row.Cycle.CPU.Total(), row.Rsync.CPU.Total())
		}
		t.row(size(row.DiskSize), size(row.Data), size(row.Written), size(row.Cycle.Changed), size(row.Cycle.Sent),
			secs(row.Cycle.M.Wall.Seconds()), row.Cycle.Phases.String(), fmt.Sprintf("%.1f", row.Cycle.CPU.Total()), row.Cycle.CPU.String(), rs, rsCPU, vs, vsCPU, row.Cycle.Identical)
	}
	t.flush()
	for _, row := range r.Rows {
		if row.Rsync.Skipped != "" && row.Rsync.M.Wall == 0 && row.Written == e.cfg.IncrChange {
			e.printf("rsync on %s: skipped: %s\n", size(row.DiskSize), row.Rsync.Skipped)
		}
	}
	e.printf("\nOne run each. Goal: lifeboat ≥ 20× rsync. rsync reads both image files whole; lifeboat reads only the blocks the dirty\n" +
		"bitmap names. CPU counts lifeboat's process and the QEMU daemons on both sides; rsync's, its processes and the (idle) source daemon.\n")
	if len(r.Rows) > 0 {
		first := r.Rows[0]
		e.printf("For context, on the %s disk: the initial sync of its %s took %s; a cycle with nothing changed takes %s\n"+
			"(QMP, the fleece transaction and teardown, the recovery site's writer daemon, flush and commit).\n",
			size(first.DiskSize), size(first.Data), secs(first.Initial.Wall.Seconds()), secs(first.Empty.Wall.Seconds()))
		for _, row := range r.Rows[1:] {
			what := "disk " + size(row.DiskSize) + " vs " + size(first.DiskSize) + ", same change"
			if row.DiskSize == first.DiskSize {
				what = "change " + size(row.Written) + " vs " + size(first.Written) + ", same disk"
			}
			e.printf("Cycle time, %s: %s (changed blocks %s).\n", what,
				ratio(row.Cycle.M.Wall.Seconds(), first.Cycle.M.Wall.Seconds()),
				ratio(float64(row.Cycle.Changed), float64(first.Cycle.Changed)))
		}
		e.printf("The cycle grows with the changed data, not with the disk size. The qcow2 images are sparse: the larger disk costs\n" +
			"no more image file, so rsync's cost is the same there too (it reads the image files, not the virtual disk).\n")
	}
}

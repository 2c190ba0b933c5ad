package main

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/wire"
)

type incrementalRow struct {
	DiskSize, Data, Written int64
	Format                  string   // the source disk's: qcow2 or raw
	Initial                 measured // the initial sync before, for context
	Empty                   measured // a cycle with nothing changed: the fixed cost of one
	Cycle                   toolRow
	Rsync                   toolRow
	Apply                   toolRow // the same writes applied to a raw copy: an incremental cycle's limit
	// Rounds: each round writes a new change of the same size and replicates
	// it; Cycle and Apply are the median rounds', CycleWalls and ApplyWalls
	// every round's.
	Rounds                 int
	CycleWalls, ApplyWalls []float64
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
	type disk struct {
		size   int64
		format string
	}
	var disks []disk
	for _, n := range c.IncrDisks {
		disks = append(disks, disk{n, "qcow2"})
	}
	if c.IncrRaw > 0 {
		disks = append(disks, disk{c.IncrRaw, "raw"})
	}
	for i, d := range disks {
		rows, err := incrementalOn(ctx, e, d.size, d.format, i == 0, res.RsyncArgs)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, rows...)
	}
	return res, nil
}

func incrementalOn(ctx context.Context, e *env, diskSize int64, format string, more bool, rsync []string) ([]incrementalRow, error) {
	c := e.cfg
	name := fmt.Sprintf("incr-%dm-%s", diskSize/mib, format)
	what := size(diskSize) + " " + format
	e.progress("incremental, %s disk: writing %s of random data", what, size(c.IncrData))
	vm, err := startVMArgs(ctx, e.path(name+"-vm"), diskSize, uint64(diskSize), format, qemu.DiskArgs)
	if err != nil {
		return nil, err
	}
	defer e.stop("source VM", vm.Stop) // deletes the (sparse) image too
	if err := vm.Guest.Fill(ctx, float64(c.IncrData)/float64(diskSize)); err != nil {
		return nil, err
	}
	e.progress("incremental, %s disk: initial sync", what)
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
	if err := vm.Flush(ctx); err != nil {
		return nil, err
	}
	replica := e.path(name + "-rsync-replica." + format)
	haveRsync := rsync != nil
	if haveRsync {
		if err := runTool(ctx, "cp", "--sparse=always", vm.Image, replica); err != nil {
			return nil, err
		}
		defer e.stop("rsync replica", func() error { return removeFile(replica) })
	}
	// The direct application's copy: the virtual disk as a raw file.
	e.progress("incremental, %s disk: a raw copy for the direct application of the writes", what)
	direct := e.path(name + "-direct.raw")
	if err := runTool(ctx, "qemu-img", "convert", "-U", "-O", "raw", vm.Image, direct); err != nil {
		return nil, err
	}
	defer e.stop("direct copy", func() error { return removeFile(direct) })

	var rows []incrementalRow
	changes := []int64{c.IncrChange}
	if more && c.IncrMore > 0 {
		changes = append(changes, c.IncrMore)
	}
	for i, change := range changes {
		row := incrementalRow{DiskSize: diskSize, Format: format, Data: c.IncrData, Written: change, Initial: initial, Empty: empty, Rounds: 1}
		if i == 0 {
			row.Rounds = max(c.IncrRounds, 1)
		}
		var cycles, applies []toolRow
		for round := range row.Rounds {
			e.progress("incremental, %s disk: %s of random 4–64 KiB writes, then one cycle (round %d/%d)", what, size(change), round+1, row.Rounds)
			var writes []write
			if err := vm.Guest.Small(ctx, change, func(op workload.Op, data []byte) {
				writes = append(writes, write{op.Offset, bytes.Clone(data)})
			}); err != nil {
				return nil, err
			}
			if err := vm.Flush(ctx); err != nil {
				return nil, err
			}
			pt, m, ph, err := rep.Cycle(ctx)
			if err != nil {
				return nil, err
			}
			cycle := toolRow{Tool: "lifeboat", M: m, CPU: lifeboatCPU(m), Phases: ph,
				Changed: pt.Stats.BytesChanged, Sent: pt.Stats.BytesSent}
			ok, err := rep.Identical(ctx, pt.ID, vm.Image)
			if err != nil {
				return nil, fmt.Errorf("compare the replica with the source: %w", err)
			}
			cycle.Identical = yesNo(ok)
			cycles = append(cycles, cycle)

			if round == 0 {
				row.Rsync.Tool = "rsync"
				switch {
				case !haveRsync:
					row.Rsync.Skipped = missing("rsync")
				case i > 0:
					row.Rsync.Skipped = "not run for the larger change (its cost is reading both files, as above)"
				default:
					e.progress("incremental, %s disk: rsync", what)
					args := append(append([]string(nil), rsync...), vm.Image, replica)
					row.Rsync.M, err = measure(func() error { return runDurable(ctx, replica, "rsync", args...) })
					if err != nil {
						return nil, err
					}
					row.Rsync.CPU = peerCPU(row.Rsync.M)
				}
			}

			e.progress("incremental, %s disk: the same writes applied to a raw copy (pwrite, fdatasync)", what)
			apply := toolRow{Tool: "direct apply"}
			apply.M, err = measure(func() error { return applyWrites(direct, writes) })
			if err != nil {
				return nil, err
			}
			apply.CPU = cpuSplit{Own: apply.M.CPU.Self}
			ok, err = qemu.Compare(ctx, vm.Image, direct)
			if err != nil {
				return nil, fmt.Errorf("compare the direct copy with the source: %w", err)
			}
			apply.Identical = yesNo(ok)
			applies = append(applies, apply)
		}
		row.Cycle, row.CycleWalls = medianRound(cycles)
		row.Apply, row.ApplyWalls = medianRound(applies)
		rows = append(rows, row)
	}
	return rows, nil
}

// medianRound returns the round of median wall time (the lower of the two
// middle ones for an even count), marked not identical if any round was
// not, and every round's wall time in seconds, in order.
func medianRound(rounds []toolRow) (toolRow, []float64) {
	walls := make([]float64, len(rounds))
	idx := make([]int, len(rounds))
	for i, r := range rounds {
		walls[i], idx[i] = r.M.Wall.Seconds(), i
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(walls[a], walls[b]) })
	m := rounds[idx[(len(idx)-1)/2]]
	for _, r := range rounds {
		if r.Identical != "yes" {
			m.Identical = r.Identical
		}
	}
	return m, walls
}

// write is one guest write, kept for the direct application.
type write struct {
	off  int64
	data []byte
}

// applyWrites writes the guest's writes into the raw file in their order and
// makes them durable: what an incremental cycle cannot beat, since it must at
// least write the changed data at the recovery site.
func applyWrites(path string, writes []write) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	for _, w := range writes {
		if _, err := f.WriteAt(w.data, w.off); err != nil {
			f.Close()
			return err
		}
	}
	if err := syscall.Fdatasync(int(f.Fd())); err != nil {
		f.Close()
		return fmt.Errorf("fdatasync %s: %w", path, err)
	}
	return f.Close()
}

// rsyncArgs are rsync's options for the benchmark, nil when rsync is missing.
// --no-whole-file makes a local rsync use its delta algorithm, reading both
// files as it would across a network; --ignore-times, even when the writes and
// the copy fell in the same second (a raw image keeps its size, and rsync's
// quick check would then call the files equal). (The replica is fsynced after
// it, in its time, as lifeboat's commit flushes its replica.)
func rsyncArgs() []string {
	if missing("rsync") != "" {
		return nil
	}
	return []string{"--inplace", "--no-whole-file", "--ignore-times"}
}

// roundsOf lists each round's time, in order.
func roundsOf(walls []float64) string {
	if len(walls) < 2 {
		return "-"
	}
	parts := make([]string, len(walls))
	for i, w := range walls {
		parts[i] = fmt.Sprintf("%.2f", w)
	}
	return strings.Join(parts, " / ")
}

func (r *incrementalResult) print(e *env) {
	e.printf("\n## 2. Incremental cycle: random 4–64 KiB writes, then one cycle (zstd) vs rsync %s of the image file, and vs the same writes applied directly to a copy\n\n",
		strings.Join(r.RsyncArgs, " "))
	t := e.table("disk", "data", "written", "changed (64 KiB blocks)", "sent", "lifeboat", "rounds", "prepare / send / commit", "CPU s", "own + source qsd + recovery qemu", "rsync", "CPU s", "lifeboat speed vs rsync", "CPU vs rsync", "direct apply", "lifeboat time vs apply", "replica identical")
	for _, row := range r.Rows {
		rs, rsCPU, vs, vsCPU := "-", "-", "-", "-"
		if row.Rsync.Skipped == "" {
			rs, rsCPU = secs(row.Rsync.M.Wall.Seconds()), fmt.Sprintf("%.1f", row.Rsync.CPU.Total())
			vs = ratio(row.Rsync.M.Wall.Seconds(), row.Cycle.M.Wall.Seconds())
			vsCPU = ratio(row.Cycle.CPU.Total(), row.Rsync.CPU.Total())
		}
		same := row.Cycle.Identical
		if row.Apply.Identical != "yes" {
			same += " (direct copy: " + row.Apply.Identical + ")"
		}
		t.row(size(row.DiskSize)+" "+row.Format, size(row.Data), size(row.Written), size(row.Cycle.Changed), size(row.Cycle.Sent),
			secs(row.Cycle.M.Wall.Seconds()), roundsOf(row.CycleWalls), row.Cycle.Phases.String(), fmt.Sprintf("%.1f", row.Cycle.CPU.Total()), row.Cycle.CPU.String(), rs, rsCPU, vs, vsCPU,
			secs(row.Apply.M.Wall.Seconds()), ratio(row.Cycle.M.Wall.Seconds(), row.Apply.M.Wall.Seconds()), same)
	}
	t.flush()
	for _, row := range r.Rows {
		if row.Rsync.Skipped != "" && row.Rsync.M.Wall == 0 && row.Written == e.cfg.IncrChange {
			e.printf("rsync on %s %s: skipped: %s\n", size(row.DiskSize), row.Format, row.Rsync.Skipped)
		}
	}
	e.printf("\nThe first change is made and replicated %d times on each disk (each round new writes of the same size): lifeboat and\n"+
		"direct apply are the median round's (rounds: each round's cycle, in order), rsync the first round's; the larger change\n"+
		"runs once. Goals: lifeboat ≥ 20× rsync, and within 3× of the direct application. rsync reads both image files\n"+
		"whole (a raw image's whole virtual size); lifeboat reads only the blocks the dirty bitmap names. Direct apply: this\n"+
		"process pwrites the very writes the guest made (kept in memory) into a raw copy of the disk and fdatasyncs it, the\n"+
		"least an incremental cycle must do. CPU counts lifeboat's process and the QEMU daemons on both sides; rsync's, its\n"+
		"processes and the (idle) source daemon.\n", e.cfg.IncrRounds)
	if len(r.Rows) > 0 {
		first := r.Rows[0]
		e.printf("\nlifeboat / the limits:\n")
		g := e.table("disk", "written", "speed vs rsync", "goal", "direct apply vs rsync", "20× needs, vs apply", "time vs direct apply", "goal")
		for _, row := range r.Rows {
			cycle, apply := row.Cycle.M.Wall.Seconds(), row.Apply.M.Wall.Seconds()
			vs, met, ceil, needs := "-", "-", "-", "-"
			if row.Rsync.Skipped == "" {
				rs := row.Rsync.M.Wall.Seconds()
				vs, met = ratio(rs, cycle), goalMet(rs >= 20*cycle, "≥ 20×")
				ceil, needs = ratio(rs, apply), "≤ "+ratio(rs/20, apply)
			}
			g.row(size(row.DiskSize)+" "+row.Format, size(row.Written), vs, met, ceil, needs, ratio(cycle, apply), goalMet(cycle <= 3*apply, "≤ 3×"))
		}
		g.flush()
		e.printf("Direct apply vs rsync is the most any incremental tool could be faster than rsync here if it did nothing but\n" +
			"write the guest's writes at the recovery site; \"20× needs\" is the cycle time the goal allows, as a multiple of that.\n")
		e.printf("For context, on the %s disk: the initial sync of its %s took %s; a cycle with nothing changed takes %s\n"+
			"(QMP, the fleece transaction and teardown, the recovery site's writer daemon, flush and commit).\n",
			size(first.DiskSize), size(first.Data), secs(first.Initial.Wall.Seconds()), secs(first.Empty.Wall.Seconds()))
		for _, row := range r.Rows[1:] {
			what := "disk " + size(row.DiskSize) + " " + row.Format + " vs " + size(first.DiskSize) + " " + first.Format + ", same change"
			if row.DiskSize == first.DiskSize && row.Format == first.Format {
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

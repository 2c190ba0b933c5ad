package main

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// The libvirt benchmark: lifeboat's libvirt path (pull-mode backups and
// hidden checkpoints) side by side with virtnbdbackup, the tool libvirt users
// run for incremental backups, on one libvirt domain and one change.
//
// The domain is lifeboat's test guest under TCG with three disks: vda, the
// guest's small ext4 disk (idle, protected by neither tool); vdb, the data
// disk both tools protect, a qcow2 written with random data on the host
// before boot; vdc, a raw disk of random bytes the guest copies from when it
// makes the change (so the change is incompressible and costs the guest no
// random number generation under TCG).

const (
	libvirtExtent = 8 * mib    // the data disk holds random data in extents of this size, evenly spread
	libvirtWrite  = 64 * kib   // the change is guest writes of this size at random aligned offsets
	libvirtVM     = "bench-lv" // the protected VM's name at the recovery site
	libvirtDisk   = "vdb"
	vnbTool       = "virtnbdbackup"
)

// libvirtRow is one tool's measured step.
type libvirtRow struct {
	toolRow          // CPU: Own the tool's own process, Recovery lifeboat's recovery-site children, Source the domain's QEMU
	Libvirtd float64 // libvirtd's CPU meanwhile
	Output   int64   // bytes the step produced: lifeboat's on the wire, virtnbdbackup's data file
	// Steps is how long each of cycleSteps took (lifeboat only).
	Steps []time.Duration
}

// cycleSteps are a libvirt cycle's steps, each ending at an event its
// protector reports (progress, hooks), or its recovery site logs.
var cycleSteps = []struct{ event, what string }{
	{"snapshot", "prepare: libvirt connection, the domain's XML, recovery site's latest point, base checkpoint redefined"},
	{"instant", "instant: no other job, freeze, backup begun with the next checkpoint, thaw, export opened"},
	{"plan", "plan: the export's block status (allocation, dirty bitmap) on the 64 KiB grid"},
	{"send", "begin: the recovery site's writer daemon and overlay"},
	{"drained", "transfer: read, hash, compress, send; the recovery site checks and writes"},
	{"committed", "commit: last writes, flush, writer daemon stopped, catalog"},
	{"end", "settle: backup job ended, checkpoints hidden, the base's deleted"},
}

// timeline is when a cycle's events happened (the first time of each).
type timeline struct {
	mu sync.Mutex
	at map[string]time.Time
}

func (t *timeline) mark(event string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.at[event]; !ok {
		t.at[event] = time.Now()
	}
}

// markAt records event at t unless it happened already.
func (t *timeline) markAt(event string, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.at[event]; !ok {
		t.at[event] = at
	}
}

func (t *timeline) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.at = map[string]time.Time{}
}

// steps is how long each of cycleSteps took, nil when an event is missing.
func (t *timeline) steps() []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []time.Duration
	prev, ok := t.at["start"]
	for _, s := range cycleSteps {
		at, found := t.at[s.event]
		if !ok || !found {
			return nil
		}
		out = append(out, at.Sub(prev))
		prev = at
	}
	return out
}

// ToolCPU is the CPU of the tool's own processes at both sites: lifeboat's
// protected site's process, its recovery site's process and that one's
// children (the writer daemon); virtnbdbackup's process and its children.
func (r libvirtRow) ToolCPU() float64 { return r.CPU.Own + r.CPU.Recovery }

// HostCPU is the tool's own CPU on the protected domain's host: lifeboat's
// protected site's process (its recovery site runs on another host in a
// deployment), virtnbdbackup's whole run (its backup is written there).
func (r libvirtRow) HostCPU() float64 {
	if r.Tool == "lifeboat" {
		return r.CPU.Own
	}
	return r.ToolCPU()
}

// AllCPU adds the domain's QEMU (which serves the backup's NBD export) and libvirtd.
func (r libvirtRow) AllCPU() float64 { return r.CPU.Total() + r.Libvirtd }

type libvirtResult struct {
	Skipped              string // why the benchmark did not run
	DiskSize, Data       int64
	Change, Write        int64
	Rounds               int
	Initial              [2]libvirtRow   // lifeboat, virtnbdbackup -l full: each one's fastest round
	Unchanged            [2]libvirtRow   // lifeboat, virtnbdbackup -l inc with nothing changed
	Incr                 [][2]libvirtRow // each round: lifeboat, virtnbdbackup -l inc
	VnbArgs              []string
	VnbVersion, Libvirtd string
	VnbRestored          string    // virtnbdbackup's chain restored and compared with the disk at the end
	Floor                floorCost // what lifeboat cannot skip for the data, beyond virtnbdbackup's work
}

// libvirtMissing says why the libvirt benchmark cannot run, or "".
func libvirtMissing() string {
	if m := testlibvirt.Missing(); m != "" {
		return m
	}
	for _, tool := range []string{vnbTool, "virtnbdrestore", "qemu-img"} {
		if m := missing(tool); m != "" {
			return m
		}
	}
	return ""
}

// libvirtRig is the domain and the two tools' state during the benchmark.
type libvirtRig struct {
	e       *env
	dom     *testlibvirt.Domain
	vm      protect.VM
	rep     *replication // lifeboat's replication of the current round
	vnbOut  string       // virtnbdbackup's output directory of the current round
	scratch string       // virtnbdbackup's scratch directory
	pids    []int        // the domain's QEMU, libvirtd
	seed    uint64
	tl      *timeline // of the current lifeboat cycle
}

// benchLibvirt: lifeboat's initial sync against virtnbdbackup -l full, then
// rounds of one guest change followed by a lifeboat cycle and virtnbdbackup
// -l inc (in alternating order), the same change seen by both.
func benchLibvirt(ctx context.Context, e *env) (*libvirtResult, error) {
	c := e.cfg
	res := &libvirtResult{DiskSize: c.LibvirtDisk, Data: c.LibvirtData, Change: c.LibvirtChange, Write: libvirtWrite,
		Rounds: max(c.LibvirtInitRounds, 1)}
	if why := libvirtMissing(); why != "" {
		if testenv.InCI() {
			return nil, fmt.Errorf("%s (under CI the libvirt benchmark must run)", why)
		}
		res.Skipped = why
		return res, nil
	}
	res.Floor = measureFloor(res.Data)
	res.VnbVersion = toolVersion(ctx, vnbTool, "--version")
	res.Libvirtd = toolVersion(ctx, "libvirtd", "--version")
	lv, err := startLibvirtRig(ctx, e)
	if err != nil {
		return nil, err
	}
	defer lv.stop()
	res.VnbArgs = lv.vnbArgs("full|inc", "DIR")
	res.VnbArgs[slices.Index(res.VnbArgs, "-d")+1] = "DOMAIN"
	res.VnbArgs[slices.Index(res.VnbArgs, "-S")+1] = "SCRATCH (beside lifeboat's)"

	// Initial: rounds interleave the tools, each keeps its fastest; the last
	// round's recovery site and virtnbdbackup chain go on.
	for round := range res.Rounds {
		for _, tool := range lv.order(round) {
			e.progress("libvirt, initial round %d/%d: %s", round+1, res.Rounds, tool)
			var row libvirtRow
			if tool == vnbTool {
				row, err = lv.vnbFull(ctx, round)
			} else {
				row, err = lv.lifeboatInitial(ctx, round)
			}
			if err != nil {
				return nil, err
			}
			e.progress("libvirt, initial round %d/%d: %s took %s, %.1f CPU s of its own", round+1, res.Rounds, tool, secs(row.M.Wall.Seconds()), row.ToolCPU())
			i := slices.Index(lv.order(0), tool)
			if round == 0 || keepNew(res.Initial[i].toolRow, row.toolRow) {
				res.Initial[i] = row
			}
		}
	}
	// A round with nothing changed: each tool's fixed cost.
	if res.Unchanged, err = lv.incremental(ctx, 0, "nothing changed"); err != nil {
		return nil, err
	}
	incrRounds := max(c.LibvirtRounds, 1)
	for round := range incrRounds {
		what := fmt.Sprintf("incremental round %d/%d", round+1, incrRounds)
		e.progress("libvirt, %s: the guest overwrites %s in %s writes", what, size(c.LibvirtChange), size(libvirtWrite))
		if err := lv.change(ctx, round); err != nil {
			return nil, err
		}
		rows, err := lv.incremental(ctx, round, what)
		if err != nil {
			return nil, err
		}
		res.Incr = append(res.Incr, rows)
	}
	e.progress("libvirt: restoring virtnbdbackup's chain with virtnbdrestore to compare it with the disk")
	res.VnbRestored, err = lv.vnbRestoreCompare(ctx)
	if err != nil {
		return nil, err
	}
	return res, nil
}

// incremental is a lifeboat cycle and a virtnbdbackup -l inc, in round's order.
func (lv *libvirtRig) incremental(ctx context.Context, round int, what string) ([2]libvirtRow, error) {
	var rows [2]libvirtRow
	for _, tool := range lv.order(round) {
		lv.e.progress("libvirt, %s: %s", what, tool)
		var (
			row libvirtRow
			err error
		)
		if tool == vnbTool {
			row, err = lv.vnbInc(ctx)
		} else {
			row, err = lv.lifeboatCycle(ctx)
		}
		if err != nil {
			return rows, err
		}
		rows[slices.Index(lv.order(0), tool)] = row
	}
	return rows, nil
}

// order is the tools' order in a round: lifeboat first in even rounds,
// virtnbdbackup in odd ones, so neither always finds the page cache as the
// other left it.
func (lv *libvirtRig) order(round int) []string {
	if round%2 == 1 {
		return []string{vnbTool, "lifeboat"}
	}
	return []string{"lifeboat", vnbTool}
}

func startLibvirtRig(ctx context.Context, e *env) (*libvirtRig, error) {
	c := e.cfg
	lv := &libvirtRig{e: e, seed: 5, tl: &timeline{}}
	// QEMU runs as libvirt-qemu: it must pass the run's directory and those
	// above it to reach the domain's images and the tools' scratch files.
	if err := os.Chmod(e.dir, 0o711); err != nil {
		return nil, err
	}
	for dir := filepath.Dir(e.dir); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return nil, err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return nil, fmt.Errorf("QEMU, running as libvirt-qemu, cannot pass %s (mode %v) to reach the bench domain's images: chmod o+x %s, or use -tmp /tmp", dir, fi.Mode().Perm(), dir)
		}
		if dir == filepath.Dir(dir) {
			break
		}
	}
	e.progress("libvirt: %s qcow2 data disk, writing %s of random data on the host", size(c.LibvirtDisk), size(c.LibvirtData))
	data := e.path("lv-data.qcow2")
	if err := writeDataDisk(ctx, data, c.LibvirtDisk, c.LibvirtData, lv.seed); err != nil {
		return nil, err
	}
	// The guest's source of new content: a fresh region for every round.
	src := e.path("lv-source.raw")
	if err := writeRandomFile(src, c.LibvirtChange*int64(max(c.LibvirtRounds, 1)), lv.seed+1); err != nil {
		return nil, err
	}
	e.progress("libvirt: booting the test guest as a libvirt domain (TCG)")
	dom, err := testlibvirt.New(ctx, testlibvirt.Options{Name: fmt.Sprintf("lbbench-%d", os.Getpid()), Parent: e.dir, Disks: []testlibvirt.DiskSpec{
		{Target: "vda", Size: 64 * mib},
		{Target: libvirtDisk, Format: "qcow2", From: data},
		{Target: "vdc", Format: "raw", From: src},
	}})
	if err != nil {
		return nil, err
	}
	lv.dom = dom
	qemuPid, err := dom.PID()
	if err != nil {
		lv.stop()
		return nil, err
	}
	lv.pids = []int{qemuPid, libvirtdPid()}
	state := e.path("lv-state")
	lv.vm = protect.VM{Name: libvirtVM, Libvirt: &protect.LibvirtDomain{URI: testlibvirt.URI, Domain: dom.Name},
		Disks: []string{libvirtDisk}, WorkDir: filepath.Join(state, "protect", libvirtVM), StateDir: state}
	// virtnbdbackup's scratch files on the same file system as lifeboat's;
	// libvirt has QEMU create them, as /var/tmp (its default) lets it.
	lv.scratch = e.path("lv-vnb-scratch")
	if err := os.Mkdir(lv.scratch, 0o1777); err == nil {
		err = os.Chmod(lv.scratch, 0o1777) // past the umask
	}
	if err != nil {
		lv.stop()
		return nil, err
	}
	return lv, nil
}

func (lv *libvirtRig) stop() {
	e := lv.e
	if lv.rep != nil {
		e.stop("recovery site", lv.rep.Stop)
	}
	if lv.dom != nil {
		e.stop("libvirt domain", lv.dom.Remove)
	}
}

// libvirtdPid is libvirtd's pid, or 0 when unknown.
func libvirtdPid() int {
	b, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// pidCPU is the CPU a process has spent so far, in seconds (0 when unknown).
func pidCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, sec, _ := parseStat(string(b))
	return sec
}

// around runs f, which measures itself, and returns the CPU the domain's
// QEMU and libvirtd spent meanwhile.
func (lv *libvirtRig) around(f func() error) (qemuCPU, libvirtd float64, err error) {
	syscall.Sync() // as measure does, before the samples
	q0, l0 := pidCPU(lv.pids[0]), pidCPU(lv.pids[1])
	if err := f(); err != nil {
		return 0, 0, err
	}
	return pidCPU(lv.pids[0]) - q0, pidCPU(lv.pids[1]) - l0, nil
}

// lifeboatInitial is one initial sync to a fresh recovery site (the work
// directory stays: its cycle drops the previous round's hidden checkpoint).
func (lv *libvirtRig) lifeboatInitial(ctx context.Context, round int) (libvirtRow, error) {
	if lv.rep != nil {
		lv.e.stop("recovery site", lv.rep.Stop)
		lv.rep = nil
	}
	rep, err := newRemoteReplication(ctx, lv.e.path(fmt.Sprintf("lv-site-%d", round)), lv.vm, wire.CompressionZstd, lv.e.log)
	if err != nil {
		return libvirtRow{}, err
	}
	lv.rep = rep
	rep.mark = lv.tl.mark
	hook := func(event string) func(context.Context) error {
		return func(context.Context) error { lv.tl.mark(event); return nil }
	}
	rep.P.Hooks = protect.Hooks{AfterInstant: hook("instant"), AfterPlan: hook("plan"), BeforeCommit: hook("drained")}
	// virtnbdbackup freezes the guest's file systems through libvirt
	// whenever the guest agent answers; lifeboat does the same work here.
	rep.P.Quiescer = &protect.LibvirtQuiescer{VM: lv.vm.Name, Domain: *lv.vm.Libvirt, Level: lifeboat.Filesystem, Log: lv.e.log}
	return lv.lifeboatCycle(ctx)
}

// lifeboatCycle is one measured cycle, its replica compared with the disk.
func (lv *libvirtRig) lifeboatCycle(ctx context.Context) (libvirtRow, error) {
	var (
		pt lifeboat.Point
		m  measured
		ph phases
	)
	lv.tl.reset()
	q, l, err := lv.around(func() error {
		var err error
		pt, m, ph, err = lv.rep.Cycle(ctx)
		return err
	})
	if err != nil {
		return libvirtRow{}, fmt.Errorf("lifeboat cycle of libvirt domain %s: %w", lv.dom.Name, err)
	}
	if at, ok := lv.rep.remote.lastLogged("restore point committed"); ok {
		lv.tl.markAt("committed", at)
	}
	if pt.Consistency != lifeboat.Filesystem {
		return libvirtRow{}, fmt.Errorf("lifeboat's point %d is %s (%s), want filesystem as virtnbdbackup's", pt.ID, pt.Consistency, pt.Note)
	}
	ok, err := lv.rep.Identical(ctx, pt.ID, lv.dom.Image(libvirtDisk))
	if err != nil {
		return libvirtRow{}, fmt.Errorf("compare the replica with the source: %w", err)
	}
	cpu := lifeboatCPU(m)
	cpu.Source = q // the domain's QEMU is libvirtd's child, not ours
	return libvirtRow{toolRow: toolRow{Tool: "lifeboat", M: m, CPU: cpu, Phases: ph, Changed: pt.Stats.BytesChanged,
		Data: pt.Stats.BytesData, Sent: pt.Stats.BytesSent, Identical: yesNo(ok)}, Libvirtd: l, Output: pt.Stats.BytesSent, Steps: lv.tl.steps()}, nil
}

// vnbArgs are virtnbdbackup's arguments: a backup at level into out.
func (lv *libvirtRig) vnbArgs(level, out string) []string {
	return []string{"-U", testlibvirt.URI, "-d", lv.dom.Name, "-l", level, "-i", libvirtDisk, "-o", out, "-S", lv.scratch, "-n"}
}

// vnbFull is one virtnbdbackup -l full into a fresh directory (it deletes
// its previous checkpoints; lifeboat's are hidden from it).
func (lv *libvirtRig) vnbFull(ctx context.Context, round int) (libvirtRow, error) {
	if lv.vnbOut != "" {
		if err := os.RemoveAll(lv.vnbOut); err != nil {
			return libvirtRow{}, err
		}
	}
	lv.vnbOut = lv.e.path(fmt.Sprintf("lv-vnb-%d", round))
	return lv.vnb(ctx, "full")
}

func (lv *libvirtRig) vnbInc(ctx context.Context) (libvirtRow, error) { return lv.vnb(ctx, "inc") }

// vnb is one measured virtnbdbackup run; its output is fsynced within its
// time, as lifeboat's commit flushes its replica.
func (lv *libvirtRig) vnb(ctx context.Context, level string) (libvirtRow, error) {
	before := dataFiles(lv.vnbOut)
	var m measured
	q, l, err := lv.around(func() error {
		var err error
		m, err = measure(func() error {
			if err := runTool(ctx, vnbTool, lv.vnbArgs(level, lv.vnbOut)...); err != nil {
				return err
			}
			return syncTree(lv.vnbOut)
		})
		return err
	})
	if err != nil {
		return libvirtRow{}, err
	}
	var out int64
	for name, n := range dataFiles(lv.vnbOut) {
		if _, ok := before[name]; !ok {
			out += n
		}
	}
	cpu := peerCPU(m)
	cpu.Source = q
	return libvirtRow{toolRow: toolRow{Tool: vnbTool + " -l " + level, M: m, CPU: cpu, Identical: "-"}, Libvirtd: l, Output: out}, nil
}

// dataFiles are the sizes of virtnbdbackup's data files in dir, by name.
func dataFiles(dir string) map[string]int64 {
	out := map[string]int64{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if fi, err := e.Info(); err == nil && strings.HasSuffix(e.Name(), ".data") {
			out[e.Name()] = fi.Size()
		}
	}
	return out
}

// syncTree fsyncs every file and directory under dir.
func syncTree(dir string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil
		}
		return fsync(path)
	})
}

// vnbRestoreCompare restores virtnbdbackup's chain (its full and every inc)
// and compares it with the disk, unchanged since the last round.
func (lv *libvirtRig) vnbRestoreCompare(ctx context.Context) (string, error) {
	out := lv.e.path("lv-vnb-restored")
	defer os.RemoveAll(out)
	if err := runTool(ctx, "virtnbdrestore", "-i", lv.vnbOut, "-o", out, "-d", libvirtDisk, "-n",
		"-f", lv.e.path("lv-restore.sock"), "-L", lv.e.path("lv-restore.log")); err != nil {
		return "", err
	}
	restored := filepath.Join(out, filepath.Base(lv.dom.Image(libvirtDisk)))
	if _, err := os.Stat(restored); err != nil {
		ents, _ := os.ReadDir(out)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return "", fmt.Errorf("virtnbdrestore made no %s in %s (it holds %v)", filepath.Base(restored), out, names)
	}
	// virtnbdrestore ends without waiting for its qemu-nbd, which writes
	// the image's qcow2 metadata as it exits: wait until it lets go of it.
	if err := waitUnlocked(ctx, restored); err != nil {
		return "", err
	}
	ok, err := qemu.Compare(ctx, restored, lv.dom.Image(libvirtDisk))
	if err != nil {
		return "", err
	}
	return yesNo(ok), nil
}

// waitUnlocked waits, bounded, until no QEMU process holds image open
// (qemu-img opens it only then, without -U).
func waitUnlocked(ctx context.Context, image string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		out, err := exec.CommandContext(ctx, "qemu-img", "info", image).CombinedOutput()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s is still held open a minute after virtnbdrestore: %s", image, out)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// change makes the guest overwrite Change bytes of the data disk in writes of
// libvirtWrite at distinct random aligned offsets, copying from round's own
// region of vdc, then fsync the disk. It runs through the guest agent's guest-exec (the
// agent pass-through, which libvirt logs as a taint of the bench's domain).
func (lv *libvirtRig) change(ctx context.Context, round int) error {
	c := lv.e.cfg
	rng := rand.New(rand.NewPCG(lv.seed, uint64(round)+100))
	n := int(c.LibvirtChange / libvirtWrite)
	slots := rng.Perm(int(c.LibvirtDisk / libvirtWrite))[:n]
	var script strings.Builder
	// Holding both devices open keeps each dd's close from flushing them:
	// the writes reach the disk at the final sync, as a guest's writeback does.
	script.WriteString("exec 3<>/dev/" + libvirtDisk + " 4</dev/vdc\nfor p in")
	for i, slot := range slots {
		fmt.Fprintf(&script, " %d:%d", round*n+i, slot)
	}
	// The last dd only fsyncs: the writes, and then a flush of the disk's
	// cache, which makes QEMU write its qcow2 metadata (a host reading the
	// image file sees the new clusters only then).
	fmt.Fprintf(&script, "; do dd if=/dev/vdc of=/dev/%[1]s bs=%[2]d skip=${p%%:*} seek=${p#*:} count=1 conv=notrunc status=none || exit 1; done\n"+
		"dd if=/dev/vdc of=/dev/%[1]s count=0 conv=notrunc,fsync status=none\n", libvirtDisk, libvirtWrite)
	out, code, err := testlibvirt.GuestExec(ctx, lv.dom.Name, "/bin/sh", "-c", script.String())
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("the guest's change failed (exit %d): %s", code, out)
	}
	return nil
}

// writeDataDisk makes a qcow2 image of size at path holding data bytes of
// random data in libvirtExtent extents spread evenly over the disk, the rest
// unallocated: written as a sparse raw file, then converted.
func writeDataDisk(ctx context.Context, path string, diskSize, data int64, seed uint64) error {
	raw := path + ".raw"
	defer os.Remove(raw)
	if err := writeRawData(raw, diskSize, data, seed); err != nil {
		return err
	}
	return runTool(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
}

// writeRawData makes a sparse raw image of diskSize at raw holding data bytes
// of random data in extents spread evenly over it.
func writeRawData(raw string, diskSize, data int64, seed uint64) error {
	f, err := os.Create(raw)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(diskSize); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, libvirtExtent)
	extents := max(data/libvirtExtent, 1)
	stride := diskSize / extents / libvirtExtent * libvirtExtent
	for i := range extents {
		workload.Random(rng, buf)
		if _, err := f.WriteAt(buf, i*stride); err != nil {
			return fmt.Errorf("data disk: %w", err)
		}
	}
	return f.Close()
}

// writeRandomFile writes n random bytes to a new file at path.
func writeRandomFile(path string, n int64, seed uint64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(seed, 2))
	buf := make([]byte, mib)
	for done := int64(0); done < n; done += int64(len(buf)) {
		workload.Random(rng, buf)
		if _, err := f.Write(buf[:min(int64(len(buf)), n-done)]); err != nil {
			return err
		}
	}
	return f.Close()
}

// plural is "n thing" or "n things".
func plural(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return strconv.Itoa(n) + " " + thing + "s"
}

// median is the middle value (the mean of the two middle ones).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (r *libvirtResult) print(e *env) {
	e.printf("\n## 5. libvirt domain: lifeboat's libvirt path vs virtnbdbackup, one domain, one change\n\n")
	if r.Skipped != "" {
		e.printf("skipped: %s\n", r.Skipped)
		return
	}
	e.printf("virtnbdbackup %s, %s; the test guest under TCG. Data disk %s: %s qcow2 holding %s of\n"+
		"random data, written on the host before boot. The change: the guest overwrites %s of it in %s writes at distinct\n"+
		"random offsets (incompressible content), then fsyncs the disk. Initial: fastest of %s; incremental: %s,\n"+
		"one change each, both tools after it (which goes first alternates); before them one round with nothing changed (each\n"+
		"tool's fixed cost, not in the medians). Page cache hot throughout.\n\n",
		r.VnbVersion, r.Libvirtd, libvirtDisk, size(r.DiskSize), size(r.Data), size(r.Change), size(r.Write),
		plural(r.Rounds, "interleaved round"), plural(len(r.Incr), "round"))
	t := e.table("step", "tool", "time", "prepare / send / commit", "CPU s", "tool's own (lifeboat: protected site + recovery site)", "domain QEMU", "libvirtd", "changed", "output", "replica identical")
	row := func(step string, x libvirtRow) {
		ph, changed, own := "-", "-", fmt.Sprintf("%.1f", x.ToolCPU())
		if x.Tool == "lifeboat" {
			ph, changed = x.Phases.String(), size(x.Changed)
			own = fmt.Sprintf("%.1f + %.1f", x.CPU.Own, x.CPU.Recovery)
		}
		t.row(step, x.Tool, secs(x.M.Wall.Seconds()), ph, fmt.Sprintf("%.1f", x.AllCPU()), own,
			fmt.Sprintf("%.1f", x.CPU.Source), fmt.Sprintf("%.1f", x.Libvirtd), changed, size(x.Output), x.Identical)
	}
	row("initial", r.Initial[0])
	row("initial", r.Initial[1])
	row("nothing changed", r.Unchanged[0])
	row("nothing changed", r.Unchanged[1])
	for i, rows := range r.Incr {
		for _, x := range rows {
			row(fmt.Sprintf("incremental %d", i+1), x)
		}
	}
	t.flush()

	col := func(tool int, f func(libvirtRow) float64) float64 {
		var xs []float64
		for _, rows := range r.Incr {
			xs = append(xs, f(rows[tool]))
		}
		return median(xs)
	}
	wall := func(x libvirtRow) float64 { return x.M.Wall.Seconds() }
	own := libvirtRow.ToolCPU
	host := libvirtRow.HostCPU
	all := libvirtRow.AllCPU
	goal := func(v, limit float64) string {
		if v <= limit {
			return "met"
		}
		return "MISSED"
	}
	initR := r.Initial[0].M.Wall.Seconds() / r.Initial[1].M.Wall.Seconds()
	incR := col(0, wall) / col(1, wall)
	cpuR := col(0, host) / col(1, host)
	e.printf("\nlifeboat / virtnbdbackup:\n")
	t = e.table("measure", "lifeboat", "virtnbdbackup", "ratio", "goal")
	t.row("initial time (vs -l full)", secs(r.Initial[0].M.Wall.Seconds()), secs(r.Initial[1].M.Wall.Seconds()), ratio(r.Initial[0].M.Wall.Seconds(), r.Initial[1].M.Wall.Seconds()), "≤ 0.50×: "+goal(initR, 0.5))
	t.row("incremental time, median (vs -l inc)", secs(col(0, wall)), secs(col(1, wall)), ratio(col(0, wall), col(1, wall)), "≤ 0.70×: "+goal(incR, 0.7))
	t.row("incremental CPU on the domain's host, tool's own, median", secs(col(0, host)), secs(col(1, host)), ratio(col(0, host), col(1, host)), "≤ 1.00×: "+goal(cpuR, 1.0))
	t.row("incremental CPU, tool's own at both sites, median", secs(col(0, own)), secs(col(1, own)), ratio(col(0, own), col(1, own)), "-")
	t.row("incremental CPU, with QEMU and libvirtd, median", secs(col(0, all)), secs(col(1, all)), ratio(col(0, all), col(1, all)), "-")
	t.flush()
	vnb := r.Initial[1]
	floor, best := r.Floor.limit(vnb.AllCPU())
	e.printf("\nThe initial sync's floor on this machine: virtnbdbackup's -l full took %.1f CPU s with the domain's QEMU and\n"+
		"libvirtd; lifeboat must also hash the %s at both sites (%.2f s each) and seal and open it (%.2f s): %.1f CPU s\n"+
		"at the least with both sites on these %d CPUs, so no lifeboat can take less than %.2f s here, %s virtnbdbackup's\n"+
		"time (lifeboat took %s).\n",
		vnb.AllCPU(), size(r.Data), r.Floor.Hash.Seconds(), r.Floor.Crypt.Seconds(), floor, runtime.NumCPU(), best,
		ratio(best, vnb.M.Wall.Seconds()), secs(r.Initial[0].M.Wall.Seconds()))
	if steps := r.Initial[0].Steps; steps != nil {
		e.printf("\nlifeboat's cycle step by step (each step ends at an event the cycle reports, or its recovery site logs):\n")
		t = e.table("step", "initial", "nothing changed", "incremental, median")
		for i, s := range cycleSteps {
			inc := col(0, func(x libvirtRow) float64 {
				if len(x.Steps) != len(cycleSteps) {
					return 0
				}
				return x.Steps[i].Seconds()
			})
			unchanged := "-"
			if u := r.Unchanged[0].Steps; len(u) == len(cycleSteps) {
				unchanged = secs(u[i].Seconds())
			}
			t.row(s.what, secs(steps[i].Seconds()), unchanged, secs(inc))
		}
		t.flush()
	}
	e.printf("\nBoth tools protect only %s, freeze the guest's file systems through libvirt (virtnbdbackup always does when the\n"+
		"agent answers) and read a libvirt pull-mode backup's NBD export of the running domain's QEMU.\n"+
		"lifeboat: %d readers, %d NBD connections, BLAKE3, zstd (its default; random data does not compress, so only its probe\n"+
		"costs), its point stream over loopback mutual TLS to the recovery site in a process of its own (as on another host),\n"+
		"which checks each block's hash, writes a qcow2 overlay through its own qemu-storage-daemon, flushes and commits the\n"+
		"point; each replica compared with the disk after its step.\n"+
		"virtnbdbackup %s\n"+
		"(no compression: -z is off by default) writes its stream-format data file, the domain XML, kernel and initrd to a\n"+
		"local directory, fsynced within its time; its whole chain, restored with virtnbdrestore at the end, is the disk: %s.\n"+
		"CPU s is the sum of the columns after it. Tool's own: lifeboat's protected site's process + its recovery site's\n"+
		"process with its children (the writer qemu-storage-daemon); virtnbdbackup's process and its children. On the\n"+
		"domain's host: what the tool takes from it, lifeboat's protected site (its recovery site runs on another host in a\n"+
		"deployment, here on the same two CPUs), virtnbdbackup's whole run (its backup is written there). Domain QEMU: the domain's\n"+
		"qemu-system (the NBD export, copy-before-write, the idle TCG guest); libvirtd: the daemon (it serves every domain on\n"+
		"this host). Output: lifeboat's bytes on the wire; virtnbdbackup's new data file. The guest's writes are started with\n"+
		"guest-exec (libvirt's agent pass-through, so libvirt marks this bench domain tainted); neither tool uses it.\n",
		libvirtDisk, protectReaders, protectConnections, strings.Join(r.VnbArgs, " "), r.VnbRestored)
}

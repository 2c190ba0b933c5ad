package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// The RPO under load: what a user sees of the cycle's cost. A VM of two
// disks is protected by `lifeboat serve` with its own schedule (interval
// 1s) while a writer on the same machine writes random 4-64 KiB blocks of
// incompressible data into both disks at a fixed rate; the protected site's
// status is sampled every 100 ms and its rpo_seconds (the age of the newest
// point) make the figures.

// serveEnv makes the bench binary a `lifeboat serve` of the config it names
// (daemon.New(...).Run, as cmd/lifeboat's serve does), until SIGTERM.
const serveEnv = "LIFEBOAT_BENCH_SERVE"

// rpoInterval is the schedule the protected VM is given.
const rpoInterval = time.Second

// rpoSample is how often status is read.
const rpoSample = 100 * time.Millisecond

// rpoQueue is how many writes the writer keeps in flight on each disk, as
// a guest's queue does (one at a time could not reach 40 MB/s here once
// the fleece's copy-before-write lengthened each write).
const rpoQueue = 4

// rpoBound is the RPO p99 the highest sustainable rate is searched against.
const rpoBound = 5.0

func serveSite(config string) int {
	cfg, err := daemon.LoadConfig(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "site:", err)
		return 1
	}
	if prof := os.Getenv(siteProfileEnv); prof != "" {
		f, err := os.Create(fmt.Sprintf("%s.site-%d", prof, os.Getpid()))
		if err != nil {
			fmt.Fprintln(os.Stderr, "site:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "site:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := daemon.New(cfg, log).Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "site:", err)
		return 1
	}
	return 0
}

// serveProcess is a site's `lifeboat serve`, a process of its own.
type serveProcess struct {
	name, log string
	cmd       *exec.Cmd
	api       *daemon.Client
	done      chan struct{}
}

func startServe(ctx context.Context, name, config, api string) (*serveProcess, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	s := &serveProcess{name: name, log: config + ".log", api: daemon.NewClient(api), done: make(chan struct{})}
	logf, err := os.Create(s.log)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	s.cmd = exec.Command(self)
	s.cmd.Env = append(os.Environ(), serveEnv+"="+config)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting site %s: %w", name, err)
	}
	siteProcesses.Store(s.cmd.Process.Pid, struct{}{})
	go func() { s.cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := s.api.Status(sctx)
		cancel()
		if err == nil {
			return s, nil
		}
		select {
		case <-s.done:
			b, _ := os.ReadFile(s.log)
			return nil, fmt.Errorf("site %s exited at start:\n%s", name, b)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("site %s did not answer on %s within 20 s: see %s", name, api, s.log)
		}
	}
}

// cpu is the CPU the site's process has spent so far, with its children.
func (s *serveProcess) cpu() float64 {
	return processCPU(s.cmd.Process.Pid)
}

// processCPU is what process pid and its children (reaped and running) spent so far.
func processCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	sec, _ := statSeconds(string(b), true)
	live, _ := childrenCPU(pid)
	for _, c := range live {
		sec += c
	}
	return sec
}

// Stop is SIGTERM and a bounded wait, then SIGKILL.
func (s *serveProcess) Stop() error {
	defer siteProcesses.Delete(s.cmd.Process.Pid)
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return nil
	case <-time.After(stopTimeout):
		s.cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("site %s did not stop within %s of SIGTERM: killed (see %s)", s.name, stopTimeout, s.log)
	}
}

// rpoRun is one write rate's figures.
type rpoRun struct {
	Rate     float64 // asked, MB/s (10^6 bytes)
	Achieved float64 // written, MB/s
	Seed     uint64
	Samples  []float64 // rpo_seconds every rpoSample
	P50, P99 float64
	Max      float64
	// Points committed during the run, their mean cycle time and what they sent.
	Points    int
	CycleMean time.Duration
	CycleMax  time.Duration
	Changed   int64
	Sent      int64
	Errors    int // cycles that failed (status last_error changed)
	Wall      float64
	// CPU seconds by process: the writer (this process), the source VM's
	// daemon, the protected site, the recovery site with its writers.
	CPUWriter, CPUSource, CPUProd, CPURecovery float64
}

func (r rpoRun) CPUTotal() float64 { return r.CPUWriter + r.CPUSource + r.CPUProd + r.CPURecovery }

type rpoResult struct {
	DiskSize  int64
	Disks     int
	Duration  time.Duration
	Runs      []rpoRun
	Highest   float64 // the highest rate run whose p99 ≤ rpoBound, 0 if none
	Identical bool    // after the runs, the last point equals both disks
	// BaseCPU is the source daemon's CPU seconds per MB written with
	// lifeboat not running (the VM's own cost of its writes).
	BaseCPU float64
}

// run returns the run at rate, if one was made.
func (r *rpoResult) run(rate float64) (rpoRun, bool) {
	for _, x := range r.Runs {
		if x.Rate == rate {
			return x, true
		}
	}
	return rpoRun{}, false
}

// rpoRig is the two sites, the source VM and its writer.
type rpoRig struct {
	e        *env
	dir      string
	src      *qemu.Daemon
	disks    []workload.Disk
	prod, dr *serveProcess
	vm       string
	// baseCPU is the source daemon's CPU seconds per MB the writer wrote
	// with lifeboat not running.
	baseCPU float64
}

func benchRPO(ctx context.Context, e *env) (*rpoResult, error) {
	c := e.cfg
	res := &rpoResult{DiskSize: c.RPODisk, Disks: 2, Duration: c.RPODuration}
	rig, err := startRPORig(ctx, e, c.RPODisk, c.RPOBaseline)
	if err != nil {
		return nil, err
	}
	defer rig.stop()
	res.BaseCPU = rig.baseCPU
	e.progress("RPO under load: initial sync of two full %s disks", size(c.RPODisk))
	if err := rig.waitPoint(ctx, time.Time{}, 5*time.Minute); err != nil {
		return nil, err
	}
	// And a point of now: the initial sync's age is not the RPO under load.
	if err := rig.waitPoint(ctx, time.Now(), time.Minute); err != nil {
		return nil, err
	}
	runAt := func(rate float64) (rpoRun, error) {
		if x, ok := res.run(rate); ok {
			return x, nil
		}
		x, err := rig.runRate(ctx, rate, c.RPODuration)
		if err != nil {
			return x, err
		}
		res.Runs = append(res.Runs, x)
		return x, nil
	}
	for _, rate := range c.RPORates {
		if _, err := runAt(rate); err != nil {
			return nil, err
		}
	}
	// The highest sustainable rate: up from the highest rate that held, in
	// steps of 20 MB/s, or down in steps of 10 from the lowest that did not.
	if c.RPOSearch {
		held := func() (float64, float64) { // highest that held, lowest that did not
			hi, lo := 0.0, 0.0
			for _, x := range res.Runs {
				if x.P99 <= rpoBound {
					hi = max(hi, x.Rate)
				} else if lo == 0 || x.Rate < lo {
					lo = x.Rate
				}
			}
			return hi, lo
		}
		for range 3 {
			hi, lo := held()
			next := hi + 20
			if lo != 0 && next >= lo {
				next = hi + 10
			}
			if hi == 0 {
				next = lo - 10
			}
			if next <= 0 || lo != 0 && next >= lo {
				break
			}
			if _, err := runAt(next); err != nil {
				return nil, err
			}
		}
	}
	for _, x := range res.Runs {
		if x.P99 <= rpoBound {
			res.Highest = max(res.Highest, x.Rate)
		}
	}
	slices.SortFunc(res.Runs, func(a, b rpoRun) int { return int(a.Rate - b.Rate) })
	if res.Identical, err = rig.identical(ctx); err != nil {
		return nil, err
	}
	return res, nil
}

// rpoBaseRate is the rate of the writer's run without lifeboat.
const rpoBaseRate = 20.0

func startRPORig(ctx context.Context, e *env, diskSize int64, baseline time.Duration) (rig *rpoRig, err error) {
	rig = &rpoRig{e: e, dir: e.path("rpo"), vm: "bench-rpo"}
	defer func() {
		if err != nil {
			rig.stop()
		}
	}()
	if err := os.MkdirAll(rig.dir, 0o700); err != nil {
		return nil, err
	}
	pkiDir := filepath.Join(rig.dir, "pki")
	if err := pki.CreateCA(pkiDir, "bench", 24*time.Hour); err != nil {
		return nil, err
	}
	for _, site := range []string{"prod", "dr"} {
		if err := pki.IssueSite(pkiDir, pkiDir, site, []string{"127.0.0.1"}, 24*time.Hour); err != nil {
			return nil, err
		}
	}
	var args []string
	for _, name := range []string{"vda", "vdb"} {
		img := filepath.Join(rig.dir, name+".qcow2")
		if err := qemu.CreateImage(ctx, img, "qcow2", diskSize, "", ""); err != nil {
			return nil, fmt.Errorf("source disk %s: %w", name, err)
		}
		// Full, as a production VM's disk is: every write then overwrites
		// data, which the fleece's copy-before-write must copy first (into
		// an empty disk it copies nothing, and the figures flatter).
		if err := fillImage(ctx, img, diskSize); err != nil {
			return nil, fmt.Errorf("filling source disk %s: %w", name, err)
		}
		args = append(args, qemu.DiskArgs(name, img, "qcow2")...)
		rig.disks = append(rig.disks, workload.Disk{Name: name, Size: diskSize})
	}
	if rig.src, err = qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: filepath.Join(rig.dir, "src"), Args: args, NBD: true}); err != nil {
		return nil, fmt.Errorf("source VM: %w", err)
	}
	if baseline > 0 {
		// The VM's own cost of the writes, unprotected: what lifeboat adds at
		// the source is the rest.
		e.progress("RPO under load: the writer alone at %.0f MB/s for %s, lifeboat not running", rpoBaseRate, baseline)
		cpu0, start := processCPU(rig.src.Pid()), time.Now()
		wait, _, err := rig.write(ctx, rpoBaseRate, 0xba5e, start, baseline)
		if err != nil {
			return nil, err
		}
		n, err := wait()
		if err != nil {
			return nil, err
		}
		if n > 0 {
			rig.baseCPU = (processCPU(rig.src.Pid()) - cpu0) / (float64(n) / 1e6)
		}
	}
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	drCfg, prodCfg := filepath.Join(rig.dir, "dr.yaml"), filepath.Join(rig.dir, "prod.yaml")
	// The product's defaults throughout (retention, compression, readers),
	// but for the schedule.
	if err := os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\n"+
		"tls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n", rig.dir, addr)), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\n"+
		"tls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
		"peers:\n  - {name: dr, address: \"%s\"}\n"+
		"vms:\n  - {name: %s, qmp: %s, nbd_socket: %s, interval: %s}\n",
		rig.dir, addr, rig.vm, rig.src.ClientQMPSocket(), rig.src.NBDSocket(), rpoInterval)), 0o600); err != nil {
		return nil, err
	}
	if rig.dr, err = startServe(ctx, "dr", drCfg, filepath.Join(rig.dir, "dr", "api.sock")); err != nil {
		return nil, err
	}
	if rig.prod, err = startServe(ctx, "prod", prodCfg, filepath.Join(rig.dir, "prod", "api.sock")); err != nil {
		return nil, err
	}
	return rig, nil
}

// fillImage writes a pattern (0x5a) over the whole image with qemu-io, in
// 256 MiB requests.
func fillImage(ctx context.Context, img string, size int64) error {
	args := []string{"-f", "qcow2"}
	for off := int64(0); off < size; off += 256 << 20 {
		args = append(args, "-c", fmt.Sprintf("write -q -P 0x5a %d %d", off, min(256<<20, size-off)))
	}
	if out, err := exec.CommandContext(ctx, "qemu-io", append(args, img)...).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-io: %w: %s", err, out)
	}
	return nil
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// rpoLogsEnv names a directory where the RPO benchmark leaves its sites' logs.
const rpoLogsEnv = "LIFEBOAT_BENCH_LOGS"

// keepLog copies a stopped site's log where rpoLogsEnv says, if it says.
func keepLog(s *serveProcess) {
	if dir := os.Getenv(rpoLogsEnv); dir != "" {
		if b, err := os.ReadFile(s.log); err == nil {
			os.WriteFile(filepath.Join(dir, "rpo-"+s.name+".log"), b, 0o600)
		}
	}
}

func (rig *rpoRig) stop() {
	for _, s := range []*serveProcess{rig.prod, rig.dr} {
		if s != nil {
			rig.e.stop("site "+s.name, s.Stop)
			keepLog(s)
		}
	}
	if rig.src != nil {
		rig.e.stop("source VM", func() error { return rig.src.Stop(context.Background()) })
	}
	rig.e.stop("RPO benchmark directory", func() error { return os.RemoveAll(rig.dir) })
}

// status is the protected VM's status at the protected site.
func (rig *rpoRig) status(ctx context.Context) (daemon.VMStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s, err := rig.prod.api.Status(ctx)
	if err != nil {
		return daemon.VMStatus{}, fmt.Errorf("status of site prod: %w", err)
	}
	for _, v := range s.VMs {
		if v.VM == rig.vm {
			return v, nil
		}
	}
	return daemon.VMStatus{}, fmt.Errorf("site prod does not list VM %s", rig.vm)
}

// waitPoint waits until the newest point's instant is after t.
func (rig *rpoRig) waitPoint(ctx context.Context, t time.Time, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		s, err := rig.status(ctx)
		if err != nil {
			return err
		}
		if s.LastPoint != nil && s.LastPoint.Instant.After(t) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("VM %s: no point after %s within %s (state %s, last error %q): see %s",
				rig.vm, t.Format(time.TimeOnly), limit, s.State, s.LastError, rig.prod.log)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(rpoSample):
		}
	}
}

// runRate writes at rate MB/s into both disks for d and samples the RPO.
func (rig *rpoRig) runRate(ctx context.Context, rate float64, d time.Duration) (rpoRun, error) {
	x := rpoRun{Rate: rate, Seed: uint64(rate*1000) + 0x5e7}
	rig.e.progress("RPO under load: %.0f MB/s of random 4-64 KiB writes into 2 disks for %s (seed %d)", rate, d, x.Seed)
	cpu0 := rig.cpu()
	start := time.Now()
	wait, cancel, err := rig.write(ctx, rate, x.Seed, start, d)
	if err != nil {
		return x, err
	}
	points := map[uint64]bool{}
	var lastErr string
	tick := time.NewTicker(rpoSample)
	for time.Since(start) < d {
		select {
		case <-ctx.Done():
			cancel()
			wait()
			return x, ctx.Err()
		case <-tick.C:
		}
		s, err := rig.status(ctx)
		if err != nil {
			cancel()
			wait()
			return x, err
		}
		x.Samples = append(x.Samples, s.RPO)
		if s.LastError != "" && s.LastError != lastErr {
			x.Errors++
			rig.e.progress("RPO under load: a cycle failed: %s", s.LastError)
		}
		lastErr = s.LastError
		if p := s.LastPoint; p != nil && p.Instant.After(start) && !points[p.ID] {
			points[p.ID] = true
			x.Points++
			x.CycleMean += p.Stats.Duration
			x.CycleMax = max(x.CycleMax, p.Stats.Duration)
			x.Changed += p.Stats.BytesChanged
			x.Sent += p.Stats.BytesSent
		}
		if n := len(x.Samples); n%100 == 0 {
			rig.e.progress("RPO under load: %.0f MB/s, %2.0f s: RPO now %.1f s, %d points", rate, time.Since(start).Seconds(), s.RPO, x.Points)
		}
	}
	tick.Stop()
	total, err := wait()
	if err != nil {
		return x, err
	}
	x.Wall = time.Since(start).Seconds()
	cpu1 := rig.cpu()
	x.CPUWriter, x.CPUSource, x.CPUProd, x.CPURecovery = cpu1[0]-cpu0[0], cpu1[1]-cpu0[1], cpu1[2]-cpu0[2], cpu1[3]-cpu0[3]
	x.Achieved = float64(total) / 1e6 / x.Wall
	if x.Points > 0 {
		x.CycleMean /= time.Duration(x.Points)
	}
	sorted := slices.Clone(x.Samples)
	slices.Sort(sorted)
	if n := len(sorted); n > 0 {
		x.P50, x.P99, x.Max = sorted[n/2], sorted[min(n-1, n*99/100)], sorted[n-1]
	}
	// The next run starts from a caught-up VM: a point taken after the writes.
	if err := rig.waitPoint(ctx, time.Now(), 5*time.Minute); err != nil {
		return x, err
	}
	return x, nil
}

// write starts the writer: rate MB/s into both disks from start for d,
// rpoQueue writes in flight on each. wait waits for it to end and returns
// the bytes written; stop ends it early.
func (rig *rpoRig) write(ctx context.Context, rate float64, seed uint64, start time.Time, d time.Duration) (wait func() (int64, error), stop func(), err error) {
	wctx, cancel := context.WithCancel(ctx)
	var (
		wg      sync.WaitGroup
		n       = len(rig.disks) * rpoQueue
		written = make([]int64, n)
		werr    = make([]error, n)
		clients []*nbd.Client
	)
	wait = func() (int64, error) {
		wg.Wait()
		cancel()
		for _, c := range clients {
			c.Close()
		}
		var total int64
		for k := range written {
			if werr[k] != nil && !errors.Is(werr[k], context.Canceled) {
				return total, fmt.Errorf("writer of disk %s: %w", rig.disks[k/rpoQueue].Name, werr[k])
			}
			total += written[k]
		}
		return total, nil
	}
	for i, disk := range rig.disks {
		c, err := nbd.Dial(ctx, "unix:"+rig.src.NBDSocket(), disk.Name, nbd.Options{})
		if err != nil {
			cancel()
			wait()
			return nil, nil, fmt.Errorf("writer: open disk %s: %w", disk.Name, err)
		}
		clients = append(clients, c)
		for q := range rpoQueue {
			k := i*rpoQueue + q
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(k)))
				written[k], werr[k] = paceWrites(wctx, c, rng, disk.Size, rate*1e6/float64(n), start, d)
			}()
		}
	}
	return wait, cancel, nil
}

// paceWrites writes random 4-64 KiB blocks of random data at random 4 KiB
// aligned offsets of c (a disk of size) at bps bytes a second from start
// until d has passed, and returns the bytes written.
func paceWrites(ctx context.Context, c *nbd.Client, rng *rand.Rand, size int64, bps float64, start time.Time, d time.Duration) (int64, error) {
	const blk = 4 << 10
	buf := make([]byte, 64<<10)
	var n int64
	for {
		el := time.Since(start)
		if el >= d {
			return n, nil
		}
		// Ahead of the rate: wait until it catches up.
		if due := time.Duration(float64(n) / bps * float64(time.Second)); due > el {
			select {
			case <-ctx.Done():
				return n, ctx.Err()
			case <-time.After(due - el):
			}
			continue
		}
		l := int64(1+rng.IntN(16)) * blk
		off := rng.Int64N(size/blk-l/blk+1) * blk
		b := buf[:l]
		workload.Random(rng, b)
		if err := c.Write(ctx, b, off, false); err != nil {
			return n, err
		}
		n += l
	}
}

// cpu is the CPU spent so far by the writer (this process), the source
// VM's daemon, the protected site and the recovery site.
func (rig *rpoRig) cpu() [4]float64 {
	var self float64
	if s, err := sampleCPU(); err == nil {
		self = s.self
	}
	return [4]float64{self, processCPU(rig.src.Pid()), rig.prod.cpu(), rig.dr.cpu()}
}

// identical exports the newest point of each disk from the recovery site and
// compares it with the source disk, the writer stopped, a point taken after
// and the protected site stopped (its empty cycles would otherwise retire
// the point while the first disk is compared).
func (rig *rpoRig) identical(ctx context.Context) (bool, error) {
	if err := rig.waitPoint(ctx, time.Now(), 2*time.Minute); err != nil {
		return false, err
	}
	prod := rig.prod
	rig.prod = nil
	err := prod.Stop()
	keepLog(prod)
	if err != nil {
		return false, err
	}
	pts, err := rig.dr.api.Points(ctx, rig.vm)
	if err != nil || len(pts) == 0 {
		return false, fmt.Errorf("points of %s at the recovery site: %d, %v", rig.vm, len(pts), err)
	}
	last := pts[len(pts)-1]
	for _, p := range pts {
		if p.ID > last.ID {
			last = p
		}
	}
	for _, disk := range rig.disks {
		// The image file holds what the writer wrote (qcow2 metadata
		// included) only once the daemon has flushed it.
		c, err := nbd.Dial(ctx, "unix:"+rig.src.NBDSocket(), disk.Name, nbd.Options{})
		if err != nil {
			return false, fmt.Errorf("flush of source disk %s: %w", disk.Name, err)
		}
		err = c.Flush(ctx)
		c.Close()
		if err != nil {
			return false, fmt.Errorf("flush of source disk %s: %w", disk.Name, err)
		}
		out := filepath.Join(rig.dir, disk.Name+"-export.raw")
		if _, err := rig.dr.api.Export(ctx, rig.vm, daemon.ExportRequest{Point: last.ID, Disk: disk.Name, Out: out, Format: "raw"}); err != nil {
			return false, fmt.Errorf("export of point %d, disk %s: %w", last.ID, disk.Name, err)
		}
		same, err := qemu.Compare(ctx, filepath.Join(rig.dir, disk.Name+".qcow2"), out)
		os.Remove(out)
		if err != nil || !same {
			return false, err
		}
	}
	return true, nil
}

func (r *rpoResult) print(e *env) {
	e.printf("\n## 8. RPO under load: `lifeboat serve` protecting a VM of two disks while it writes\n\n")
	e.printf("Two %s qcow2 disks, full (a pattern written over each first), in one qemu-storage-daemon, protected by\n"+
		"`lifeboat serve` (interval %s, the product's defaults otherwise; the recovery site another `lifeboat serve`, on\n"+
		"loopback mutual TLS); a writer on the same machine writes random 4-64 KiB blocks of random data at random offsets of both\n"+
		"disks at a fixed rate for %s (%d writes in flight on each disk);\n"+
		"the protected site's status is read every %s and its rpo_seconds (the age of the newest point) make the figures.\n"+
		"Source without lifeboat: the source daemon's CPU for the same bytes, from a run of the writer alone at %.0f MB/s\n"+
		"before the sites start (%.2f CPU s per 100 MB); the rest of its CPU is lifeboat's\n"+
		"copy-before-write and reads.\n\n",
		size(r.DiskSize), rpoInterval, r.Duration, rpoQueue, rpoSample, rpoBaseRate, r.BaseCPU*100)
	t := e.table("rate asked", "written", "RPO p50", "p99", "max", "points", "cycle mean / max", "changed", "sent",
		"CPU s: writer + source + prod + recovery", "source without lifeboat", "cores busy", "failed cycles")
	for _, x := range r.Runs {
		t.row(fmt.Sprintf("%.0f MB/s", x.Rate), fmt.Sprintf("%.1f MB/s", x.Achieved), secs(x.P50), secs(x.P99), secs(x.Max),
			fmt.Sprint(x.Points), fmt.Sprintf("%.2f / %.2f s", x.CycleMean.Seconds(), x.CycleMax.Seconds()),
			size(x.Changed), size(x.Sent),
			fmt.Sprintf("%.1f (%.1f + %.1f + %.1f + %.1f)", x.CPUTotal(), x.CPUWriter, x.CPUSource, x.CPUProd, x.CPURecovery),
			fmt.Sprintf("%.1f", r.BaseCPU*x.Achieved*x.Wall),
			fmt.Sprintf("%.2f of %d", x.CPUTotal()/x.Wall, runtime.NumCPU()), fmt.Sprint(x.Errors))
	}
	t.flush()
	e.printf("\n")
	g := e.table("goal", "this run")
	if x, ok := r.run(20); ok {
		g.row("RPO p99 ≤ 3 s at 20 MB/s", goalMet(x.P99 <= 3, fmt.Sprintf("p99 %.2f s", x.P99)))
	}
	if x, ok := r.run(40); ok {
		g.row("RPO p99 ≤ 5 s at 40 MB/s", goalMet(x.P99 <= 5, fmt.Sprintf("p99 %.2f s", x.P99)))
	}
	hi := "none of the rates run"
	if r.Highest > 0 {
		hi = fmt.Sprintf("%.0f MB/s (of the rates run)", r.Highest)
	}
	g.row(fmt.Sprintf("highest rate with p99 ≤ %.0f s", rpoBound), hi)
	g.row("last point = both source disks", yesNo(r.Identical))
	g.flush()
}

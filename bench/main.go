// Command bench is `make bench`: lifeboat's replication measured side by side
// with named peers (nbdcopy, qemu-img convert, rsync, virtnbdbackup) on the
// same data in one run.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config sizes the benchmarks.
type config struct {
	// Initial sync: a disk of InitDisk holding InitData of random data; Rounds
	// runs of every contender, interleaved.
	InitDisk, InitData int64
	Rounds             int
	// Incremental: disks of IncrDisks each holding IncrData, IncrChange of small writes.
	IncrDisks            []int64
	IncrData, IncrChange int64
	// IncrRounds is how many times the change IncrChange is written and
	// replicated on each disk: the figures are the median round's.
	IncrRounds int
	// IncrMore is a larger change on the first disk, to show the cycle grows with
	// the changed data; 0 skips it.
	IncrMore int64
	// IncrRaw is a raw disk (as a logical volume is) with the same data and change.
	IncrRaw int64
	// WireChange is how much of each content kind the bytes-on-the-wire benchmark writes.
	WireChange int64
	// Metadata: a sparse disk of MetaDisk with MetaData of data, MetaDiscard of it discarded.
	MetaDisk, MetaData, MetaDiscard int64
	// libvirt: a domain's data disk of LibvirtDisk holding LibvirtData of
	// random data; the guest changes LibvirtChange of it in each of
	// LibvirtRounds incremental rounds, after LibvirtInitRounds interleaved
	// initial syncs (five by default: virtnbdbackup's -l full took 3.6 to
	// 6.4 s from one round to the next here, and the fastest is its speed).
	LibvirtDisk, LibvirtData, LibvirtChange int64
	LibvirtRounds, LibvirtInitRounds        int
	// FailoverDisks are the data disk sizes the failover benchmark starts
	// the test guest from.
	FailoverDisks []int64
	FailoverData  int64 // of random data on each
	// Failback: a disk of FailbackDisk holding FailbackData, FailbackProd
	// written at production after the point, FailbackRec at the recovery site.
	FailbackDisk, FailbackData, FailbackProd, FailbackRec int64
	// RPO under load: two disks of RPODisk, written at each of RPORates
	// (MB/s) for RPODuration; RPOSearch then looks for the highest rate
	// whose RPO p99 stays within rpoBound.
	RPODisk     int64
	RPODuration time.Duration
	RPORates    []float64
	RPOSearch   bool
	RPOBaseline time.Duration   // the writer alone first, for the source's own cost
	Only        map[string]bool // benchmarks to run; empty: all
}

const (
	kib = int64(1) << 10
	mib = kib << 10
	gib = mib << 10
)

func defaultConfig() config {
	return config{
		InitDisk: 4 * gib, InitData: 2 * gib, Rounds: 3,
		IncrDisks: []int64{16 * gib, 64 * gib}, IncrData: 4 * gib, IncrChange: 64 * mib, IncrMore: 256 * mib, IncrRaw: 16 * gib, IncrRounds: 3,
		WireChange: 256 * mib,
		MetaDisk:   16 * tib, MetaData: 3 * gib, MetaDiscard: 4 * tib,
		LibvirtDisk: 2 * gib, LibvirtData: 1 * gib, LibvirtChange: 128 * mib, LibvirtRounds: 3, LibvirtInitRounds: 5,
		FailoverDisks: []int64{4 * gib, 256 * gib}, FailoverData: 1 * gib,
		FailbackDisk: 16 * gib, FailbackData: 1 * gib, FailbackProd: 32 * mib, FailbackRec: 256 * mib,
		RPODisk: 4 * gib, RPODuration: 60 * time.Second, RPORates: []float64{20, 40}, RPOSearch: true, RPOBaseline: 10 * time.Second,
	}
}

// quickConfig is a small version of every benchmark, for a smoke test.
func quickConfig() config {
	return config{
		InitDisk: 256 * mib, InitData: 128 * mib, Rounds: 1,
		IncrDisks: []int64{512 * mib, 2 * gib}, IncrData: 128 * mib, IncrChange: 8 * mib, IncrMore: 32 * mib, IncrRaw: 512 * mib, IncrRounds: 1,
		WireChange: 16 * mib,
		MetaDisk:   1 * tib, MetaData: 96 * mib, MetaDiscard: 256 * gib,
		LibvirtDisk: 256 * mib, LibvirtData: 128 * mib, LibvirtChange: 16 * mib, LibvirtRounds: 1, LibvirtInitRounds: 1,
		FailoverDisks: []int64{4 * gib}, FailoverData: 64 * mib,
		FailbackDisk: 1 * gib, FailbackData: 64 * mib, FailbackProd: 4 * mib, FailbackRec: 16 * mib,
		RPODisk: 256 * mib, RPODuration: 8 * time.Second, RPORates: []float64{20}, RPOBaseline: 2 * time.Second,
	}
}

// runs says whether a benchmark runs; metadata (minutes on a 16 TiB disk) only when named.
func (c config) runs(name string) bool { return c.Only[name] || len(c.Only) == 0 && name != "metadata" }

var benchNames = []string{"initial", "incremental", "wire", "metadata", "libvirt", "failover", "failback", "rpo"}

func main() {
	if dir := os.Getenv(recoverySiteEnv); dir != "" {
		os.Exit(serveRecoverySite(dir)) // the metadata benchmark's recovery site
	}
	if config := os.Getenv(serveEnv); config != "" {
		os.Exit(serveSite(config)) // a site of the RPO benchmark
	}
	exit := 0
	defer func() { os.Exit(exit) }() // after the deferred profile is written
	var (
		quick    = flag.Bool("quick", false, "small sizes: a smoke run of every benchmark in well under a minute")
		only     = flag.String("only", "", "comma-separated benchmarks to run: "+strings.Join(benchNames, ", ")+" (default: all)")
		tmp      = flag.String("tmp", "", "parent directory of the benchmark's temporary files (default: $TMPDIR or /tmp)")
		prof     = flag.String("cpuprofile", "", "write a CPU profile of the harness process to this file (both sites, except where a recovery site runs in a process of its own: FILE.site-PID)")
		rounds   = flag.Int("rounds", 0, "rounds of the initial syncs, each contender's fastest kept (default 3, libvirt 5; 1 with -quick)")
		rpoRates = flag.String("rpo-rates", "", "write rates of the RPO benchmark in MB/s, comma-separated (default 20,40, then a search for the highest rate that holds)")
		rpoTime  = flag.Duration("rpo-duration", 0, "how long the RPO benchmark writes at each rate (default 60s)")
		scale    = flag.Float64("scale", 1, "multiply every data size (not disk sizes) by this, e.g. 0.25 for a shorter run")
	)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench [-quick] [-only initial,incremental,wire,libvirt,failover,failback,rpo] [-rounds N] [-scale F] [-tmp DIR] [-cpuprofile FILE]\n"+
			"example: make bench BENCH_ARGS='-only incremental'\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	cfg := defaultConfig()
	if *quick {
		cfg = quickConfig()
	}
	if *rounds > 0 {
		cfg.Rounds, cfg.LibvirtInitRounds = *rounds, *rounds
	}
	if *rpoRates != "" {
		cfg.RPORates, cfg.RPOSearch = nil, false
		for _, f := range strings.Split(*rpoRates, ",") {
			r, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
			if err != nil || r <= 0 {
				fmt.Fprintf(os.Stderr, "bench: -rpo-rates: %q is not a rate in MB/s (e.g. -rpo-rates 20,40)\n", f)
				os.Exit(2)
			}
			cfg.RPORates = append(cfg.RPORates, r)
		}
	}
	if *rpoTime > 0 {
		cfg.RPODuration = *rpoTime
	}
	if *scale != 1 {
		if *scale <= 0 || *scale > 1 {
			fmt.Fprintln(os.Stderr, "bench: -scale must be in (0, 1]: data sizes cannot outgrow the disks")
			os.Exit(2)
		}
		s := func(n int64) int64 { return max(int64(float64(n)**scale)/mib*mib, mib) }
		cfg.InitData, cfg.IncrData, cfg.IncrChange, cfg.IncrMore, cfg.WireChange, cfg.MetaData =
			s(cfg.InitData), s(cfg.IncrData), s(cfg.IncrChange), s(cfg.IncrMore), s(cfg.WireChange), s(cfg.MetaData)
		cfg.LibvirtData, cfg.LibvirtChange = s(cfg.LibvirtData), s(cfg.LibvirtChange)
	}
	if *only != "" {
		cfg.Only = map[string]bool{}
		for _, n := range strings.Split(*only, ",") {
			n = strings.TrimSpace(n)
			if !contains(benchNames, n) {
				fmt.Fprintf(os.Stderr, "bench: unknown benchmark %q: use %s\n", n, strings.Join(benchNames, ", "))
				os.Exit(2)
			}
			cfg.Only[n] = true
		}
	}
	// The sites' own logs: warnings and errors only, the output is the tables.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if *prof != "" {
		f, err := os.Create(*prof)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			os.Exit(2)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
		os.Setenv(siteProfileEnv, *prof)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	_, err := run(ctx, cfg, *tmp, os.Stdout, os.Stderr)
	fmt.Printf("\nbench took %s\n", time.Since(start).Round(time.Second))
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		exit = 1
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// results are what run measured, for the smoke test to check.
type results struct {
	Initial     *initialResult
	Incremental *incrementalResult
	Wire        *wireResult
	Metadata    *metadataResult
	Libvirt     *libvirtResult
	Failover    *failoverResult
	Failback    *failbackResult
	RPO         *rpoResult
}

// env is one run's shared state: its temporary directory and its output.
type env struct {
	cfg      config
	dir      string
	out      io.Writer
	progress func(format string, args ...any)
	log      *slog.Logger
	errs     []error
}

func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

func (e *env) printf(format string, args ...any) { fmt.Fprintf(e.out, format, args...) }

// stop runs a cleanup and keeps its error for the end of the run.
func (e *env) stop(what string, f func() error) {
	if err := f(); err != nil {
		e.errs = append(e.errs, fmt.Errorf("cleanup of %s: %w", what, err))
	}
}

// run runs the configured benchmarks in a temporary directory under tmpParent
// (deleted at the end), printing tables to out and progress to prog.
func run(ctx context.Context, cfg config, tmpParent string, out, prog io.Writer) (res *results, err error) {
	dir, err := os.MkdirTemp(tmpParent, "lbbench")
	if err != nil {
		return nil, fmt.Errorf("temporary directory: %w (set -tmp to a writable directory)", err)
	}
	// Unix socket paths of the daemons live under dir: at most 107 bytes.
	if len(dir) > 60 {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("temporary directory %s is too long for the daemons' unix sockets: use -tmp /tmp", dir)
	}
	e := &env{cfg: cfg, dir: dir, out: out,
		progress: func(format string, args ...any) {
			fmt.Fprintf(prog, "%s  ..  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
		},
		// Warnings and errors of the sites only: a benchmark's output is its tables.
		log: slog.New(slog.NewTextHandler(prog, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	steal0, start := stealSeconds(), time.Now()
	defer func() {
		if steal1 := stealSeconds(); steal0 >= 0 && steal1 >= 0 && err == nil {
			wall := time.Since(start).Seconds()
			e.printf("\nCPU time taken by the hypervisor (steal) during the run: %.1f s over %.0f s on %d CPUs (%.1f%%).\n",
				steal1-steal0, wall, runtime.NumCPU(), 100*(steal1-steal0)/(wall*float64(runtime.NumCPU())))
		}
		if rerr := os.RemoveAll(dir); rerr != nil {
			e.errs = append(e.errs, rerr)
		}
		err = errors.Join(append([]error{err}, e.errs...)...)
	}()
	printMachine(ctx, e)

	res = &results{}
	if cfg.runs("initial") {
		if res.Initial, err = benchInitial(ctx, e); err != nil {
			return res, fmt.Errorf("initial sync benchmark: %w", err)
		}
		res.Initial.print(e)
	}
	if cfg.runs("incremental") {
		if res.Incremental, err = benchIncremental(ctx, e); err != nil {
			return res, fmt.Errorf("incremental benchmark: %w", err)
		}
		res.Incremental.print(e)
	}
	if cfg.runs("wire") {
		if res.Wire, err = benchWire(ctx, e); err != nil {
			return res, fmt.Errorf("bytes-on-the-wire benchmark: %w", err)
		}
		res.Wire.print(e)
	}
	if cfg.runs("metadata") {
		if res.Metadata, err = benchMetadata(ctx, e); err != nil {
			return res, fmt.Errorf("metadata benchmark: %w", err)
		}
		res.Metadata.print(e)
	}
	if cfg.runs("libvirt") {
		if res.Libvirt, err = benchLibvirt(ctx, e); err != nil {
			return res, fmt.Errorf("libvirt benchmark: %w", err)
		}
		res.Libvirt.print(e)
	}
	if cfg.runs("failover") {
		if res.Failover, err = benchFailover(ctx, e); err != nil {
			return res, fmt.Errorf("failover benchmark: %w", err)
		}
		res.Failover.print(e)
	}
	if cfg.runs("failback") {
		if res.Failback, err = benchFailback(ctx, e); err != nil {
			return res, fmt.Errorf("failback benchmark: %w", err)
		}
		res.Failback.print(e)
	}
	if cfg.runs("rpo") {
		if res.RPO, err = benchRPO(ctx, e); err != nil {
			return res, fmt.Errorf("RPO benchmark: %w", err)
		}
		res.RPO.print(e)
	}
	return res, nil
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// A recovery site in a process of its own (this binary again, see
// serveRecoverySite), as a deployment runs it on another host: its RSS and
// its CPU are then its own, apart from the protected site's.

// recoverySiteEnv makes the bench binary a recovery site serving the directory it names.
const recoverySiteEnv = "LIFEBOAT_BENCH_RECOVERY_SITE"

// siteProfileEnv, set by -cpuprofile FILE, makes each recovery site's
// process write its own CPU profile to FILE.site-PID.
const siteProfileEnv = "LIFEBOAT_BENCH_SITE_PROFILE"

// siteStats is what the recovery site's process answers to a command.
type siteStats struct {
	Records     []recovery.RecordStat `json:"records,omitempty"`
	CatalogSize int64                 `json:"catalog_size,omitempty"`
	Image       string                `json:"image"`
	Err         string                `json:"err,omitempty"`
}

// serveRecoverySite runs a recovery site on dir (its pki/ and store/) until
// stdin closes (see siteProfileEnv for its profile): it prints its address, then answers each line on stdin with a
// siteStats line: "stats VM" (the catalog's records, the newest point's image
// of diskName), "image VM POINT DISK" (that image's path). Its log (Info,
// JSON) goes to dir/site.log.
func serveRecoverySite(dir string) int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "recovery site:", err); return 1 }
	ctx := context.Background()
	if prof := os.Getenv(siteProfileEnv); prof != "" {
		f, err := os.Create(fmt.Sprintf("%s.site-%d", prof, os.Getpid()))
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	logf, err := os.Create(filepath.Join(dir, "site.log"))
	if err != nil {
		return fail(err)
	}
	defer logf.Close()
	log := slog.New(slog.NewJSONHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	keep, _ := strconv.Atoi(os.Getenv(recoverySiteEnv + "_KEEP"))
	st, err := recovery.Open(ctx, filepath.Join(dir, "store"), recovery.Options{Keep: keep, Logger: log})
	if err != nil {
		return fail(err)
	}
	defer st.Close()
	tlsConf, err := pki.ServerTLS(pki.SiteFiles(filepath.Join(dir, "pki"), "dr"))
	if err != nil {
		return fail(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	srv := &wire.Server{Site: "dr", Store: wire.RecoveryStore(st), Log: log}
	go srv.Serve(l, tlsConf)
	defer srv.Stop()
	fmt.Println(l.Addr().String())
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var s siteStats
		var err error
		switch f := strings.Fields(in.Text()); {
		case len(f) == 2 && f[0] == "stats":
			if s.Records, err = st.RecordStats(f[1]); err == nil {
				s.Image, err = st.ImagePath(f[1], 0, diskName)
			}
			if fi, serr := os.Stat(filepath.Join(dir, "store", "catalog.db")); serr == nil {
				s.CatalogSize = fi.Size()
			}
		case len(f) == 4 && f[0] == "image":
			var id uint64
			if id, err = strconv.ParseUint(f[2], 10, 64); err == nil {
				s.Image, err = st.ImagePath(f[1], id, f[3])
			}
		default:
			err = fmt.Errorf("unknown command %q", in.Text())
		}
		if err != nil {
			s.Err = err.Error()
		}
		b, _ := json.Marshal(s)
		fmt.Println(string(b))
	}
	return 0
}

// recoveryProcess is the recovery site's process, seen from the harness.
type recoveryProcess struct {
	dir  string
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	addr string
}

// siteProcesses are the pids of the recovery sites' processes, which
// sampleCPU leaves out of this process's children: their CPU is the
// recovery site's (recoveryProcess.cpu), not the source's.
var siteProcesses sync.Map // pid -> struct{}

func startRecoveryProcess(ctx context.Context, dir string, keep int) (*recoveryProcess, error) {
	pkiDir := filepath.Join(dir, "pki")
	if err := pki.CreateCA(pkiDir, "bench", 24*time.Hour); err != nil {
		return nil, err
	}
	for _, site := range []string{"prod", "dr"} {
		if err := pki.IssueSite(pkiDir, pkiDir, site, []string{"127.0.0.1"}, 24*time.Hour); err != nil {
			return nil, err
		}
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, self)
	cmd.Env = append(os.Environ(), recoverySiteEnv+"="+dir, recoverySiteEnv+"_KEEP="+strconv.Itoa(keep))
	cmd.Stderr = os.Stderr
	r := &recoveryProcess{dir: dir, cmd: cmd}
	if r.in, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the recovery site's process: %w", err)
	}
	siteProcesses.Store(cmd.Process.Pid, struct{}{})
	r.out = bufio.NewScanner(stdout)
	r.out.Buffer(nil, 16<<20)
	if !r.out.Scan() {
		r.Stop()
		return nil, errors.New("the recovery site's process exited before printing its address")
	}
	r.addr = r.out.Text()
	return r, nil
}

func (r *recoveryProcess) client(ctx context.Context, comp wire.Compression) (*wire.Client, error) {
	tlsConf, err := pki.ClientTLS(pki.SiteFiles(filepath.Join(r.dir, "pki"), "prod"), "127.0.0.1")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return wire.Dial(ctx, r.addr, tlsConf, "prod", "dr", comp)
}

// ask sends one command line and reads its answer.
func (r *recoveryProcess) ask(format string, args ...any) (siteStats, error) {
	var s siteStats
	if _, err := fmt.Fprintf(r.in, format+"\n", args...); err != nil {
		return s, err
	}
	if !r.out.Scan() {
		return s, errors.New("the recovery site's process exited")
	}
	if err := json.Unmarshal(r.out.Bytes(), &s); err != nil {
		return s, err
	}
	if s.Err != "" {
		return s, errors.New(s.Err)
	}
	return s, nil
}

func (r *recoveryProcess) stats(vm string) (siteStats, error) { return r.ask("stats %s", vm) }

// imagePath is the path of a point's image of disk at the site.
func (r *recoveryProcess) imagePath(vm string, id uint64, disk string) (string, error) {
	s, err := r.ask("image %s %d %s", vm, id, disk)
	return s.Image, err
}

// cpu is the CPU the site's process has spent so far, with its children
// (the writer daemons it started and reaped, and those still running).
func (r *recoveryProcess) cpu() float64 { return processCPU(r.cmd.Process.Pid) }

// Stop closes the site's stdin (it stops, closing its store) and waits, bounded.
func (r *recoveryProcess) Stop() error {
	defer siteProcesses.Delete(r.cmd.Process.Pid)
	r.in.Close()
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(stopTimeout):
		r.cmd.Process.Kill()
		return fmt.Errorf("the recovery site's process did not stop within %s: killed", stopTimeout)
	}
}

// resetPeakRSS restarts the kernel's peak RSS (VmHWM) count of process pid.
func resetPeakRSS(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// peakRSS is process pid's VmHWM in bytes.
func peakRSS(pid int) (int64, error) { return procStatus(pid, "VmHWM:") }

// procStatus is a size (kB) that process pid's /proc status gives under key, in bytes.
func procStatus(pid int, key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", strings.TrimSuffix(key, ":"), pid)
}

// lastLogged is when the site's process last logged msg (site.log is JSON,
// one record a line), and whether it has.
func (r *recoveryProcess) lastLogged(msg string) (time.Time, bool) {
	b, _ := os.ReadFile(filepath.Join(r.dir, "site.log"))
	var last time.Time
	for _, line := range bytes.Split(b, []byte("\n")) {
		var rec struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}
		if json.Unmarshal(line, &rec) == nil && rec.Msg == msg {
			last = rec.Time
		}
	}
	return last, !last.IsZero()
}

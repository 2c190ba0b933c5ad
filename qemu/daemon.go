package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// maxSocketPath is the longest unix socket path Linux accepts (sun_path less its NUL).
const maxSocketPath = 107

// DaemonConfig describes a qemu-storage-daemon that lifeboat (or a test) owns.
type DaemonConfig struct {
	Dir  string   // runtime dir: qmp.sock, nbd.sock, qsd.pid and qsd.log live here (keep it short: unix socket paths max 107 bytes)
	Args []string // --blockdev/--export/... arguments as strings
	NBD  bool     // start an NBD server on Dir/nbd.sock
}

// Daemon is a running qemu-storage-daemon child process.
type Daemon struct {
	cfg     DaemonConfig
	sockDir string // where the sockets are: Dir, or a short temporary directory
	// ownSockDir: sockDir is ours to remove when the daemon ends.
	ownSockDir bool
	cmd        *exec.Cmd
	mon        *Monitor
	exited     chan struct{}
	waitErr    error
}

// StartDaemon starts qemu-storage-daemon with a QMP monitor on Dir/qmp.sock
// (and an NBD server on Dir/nbd.sock if cfg.NBD) ahead of cfg.Args, and waits,
// bounded by ctx, until QMP answers. If the daemon dies on the way the error
// carries its stderr. The process outlives ctx: stop it with Stop or Kill.
func StartDaemon(ctx context.Context, cfg DaemonConfig) (*Daemon, error) {
	if cfg.Dir == "" {
		return nil, errors.New("qemu-storage-daemon: DaemonConfig.Dir is required")
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("qemu-storage-daemon: runtime dir: %w", err)
	}
	cfg.Dir = dir
	d := &Daemon{cfg: cfg, sockDir: dir, exited: make(chan struct{})}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("qemu-storage-daemon: %w", err)
	}
	if len(d.ClientQMPSocket()) > maxSocketPath || len(d.NBDSocket()) > maxSocketPath {
		// A deep state directory cannot hold unix sockets (107 bytes at most):
		// they go to a short private directory, removed when the daemon ends.
		short, err := os.MkdirTemp("", "lbq")
		if err != nil {
			return nil, fmt.Errorf("qemu-storage-daemon: socket dir: %w", err)
		}
		d.sockDir, d.ownSockDir = short, true
	}
	// A socket left by an earlier run would be dialled before the new one binds.
	for _, s := range []string{d.QMPSocket(), d.ClientQMPSocket(), d.NBDSocket()} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("qemu-storage-daemon: remove stale socket: %w", err)
		}
	}
	args := []string{
		"--chardev", "socket,path=" + optEscape(d.QMPSocket()) + ",server=on,wait=off,id=lifeboat-qmp",
		"--monitor", "chardev=lifeboat-qmp",
		// A second monitor for another client: QMP serves one client per socket,
		// and a VM's own manager (here: whoever owns the daemon) holds the first.
		"--chardev", "socket,path=" + optEscape(d.ClientQMPSocket()) + ",server=on,wait=off,id=client-qmp",
		"--monitor", "chardev=client-qmp",
		"--pidfile", filepath.Join(dir, "qsd.pid"),
	}
	if cfg.NBD {
		args = append(args, "--nbd-server", "addr.type=unix,addr.path="+optEscape(d.NBDSocket()))
	}
	args = append(args, cfg.Args...)
	logPath := filepath.Join(dir, "qsd.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemu-storage-daemon: log: %w", err)
	}
	defer logf.Close() // the child holds its own descriptor
	d.cmd = exec.Command("qemu-storage-daemon", args...)
	d.cmd.Env = daemonEnv(os.Environ())
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu-storage-daemon: %w (is qemu-system-common installed?)", err)
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		if d.ownSockDir {
			os.RemoveAll(d.sockDir)
		}
		close(d.exited)
	}()

	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-d.exited:
			return nil, fmt.Errorf("qemu-storage-daemon exited at start (%v): %s", d.waitErr, d.logTail())
		default:
		}
		if _, err := os.Stat(d.QMPSocket()); err == nil {
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			mon, err := Dial(dctx, d.QMPSocket())
			cancel()
			if err == nil {
				d.mon = mon
				return d, nil
			}
		}
		select {
		case <-d.exited:
		case <-tick.C:
		case <-ctx.Done():
			d.Kill()
			return nil, fmt.Errorf("qemu-storage-daemon did not answer QMP on %s: %w; log: %s", d.QMPSocket(), context.Cause(ctx), d.logTail())
		}
	}
}

// logTail is the end of the daemon's stderr, for error messages.
func (d *Daemon) logTail() string {
	b, _ := os.ReadFile(filepath.Join(d.cfg.Dir, "qsd.log"))
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "(no output)"
	}
	return s
}

// Monitor is the daemon's QMP connection.
func (d *Daemon) Monitor() *Monitor { return d.mon }

// QMPSocket is the path of the QMP socket.
func (d *Daemon) QMPSocket() string { return filepath.Join(d.sockDir, "qmp.sock") }

// ClientQMPSocket is a second QMP monitor of the daemon, free for another client
// (lifeboat, when the daemon stands in for a VM that the test itself drives).
func (d *Daemon) ClientQMPSocket() string { return filepath.Join(d.sockDir, "client.qmp") }

// NBDSocket is the path of the NBD server socket (when started with NBD).
func (d *Daemon) NBDSocket() string { return filepath.Join(d.sockDir, "nbd.sock") }

// Dir is the runtime directory.
func (d *Daemon) Dir() string { return d.cfg.Dir }

// Pid is the process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Exited is closed once the process has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// Stop quits the daemon through QMP, so persistent bitmaps are saved, and
// waits for it to exit. If it has not exited when ctx ends it is killed
// (its bitmaps are then inconsistent) and the error says so.
func (d *Daemon) Stop(ctx context.Context) error {
	select {
	case <-d.exited:
		d.mon.Close()
		return nil
	default:
	}
	qerr := d.mon.Quit(ctx)
	d.mon.Close()
	select {
	case <-d.exited:
		if qerr != nil {
			return fmt.Errorf("stop qemu-storage-daemon %d: %w", d.Pid(), qerr)
		}
		return nil
	case <-ctx.Done():
	}
	kerr := d.Kill()
	return errors.Join(fmt.Errorf("qemu-storage-daemon %d did not quit in time and was killed; its persistent bitmaps are inconsistent: %w", d.Pid(), context.Cause(ctx)), qerr, kerr)
}

// Kill kills the daemon with SIGKILL, as a crash would, and waits for it to go.
func (d *Daemon) Kill() error {
	if d.mon != nil {
		defer d.mon.Close()
	}
	select {
	case <-d.exited:
		return nil
	default:
	}
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill qemu-storage-daemon %d: %w", d.Pid(), err)
	}
	select {
	case <-d.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("qemu-storage-daemon %d did not exit 10 s after SIGKILL", d.Pid())
	}
}

// optEscape escapes a value for QEMU's key=value option syntax, where a comma
// ends the value unless doubled.
func optEscape(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// Diagnosis says what the daemon is doing, for an error about a command it
// did not answer: whether it still runs, each thread's scheduler state and
// the kernel function it waits in (from /proc), and the end of its log. A
// hang then names itself (a thread in a lock wait, a read on a stuck file
// system, a starved process) instead of showing only a deadline.
func (d *Daemon) Diagnosis() string {
	select {
	case <-d.exited:
		return fmt.Sprintf("qemu-storage-daemon %d has exited (%v); log: %s", d.Pid(), d.waitErr, d.logTail())
	default:
	}
	return fmt.Sprintf("qemu-storage-daemon %d is running; threads: %s; log: %s", d.Pid(), procThreads(d.Pid()), d.logTail())
}

// procThreads describes each thread of process pid as "name state wchan",
// or says why /proc could not tell.
func procThreads(pid int) string {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Sprintf("(unreadable: %v)", err)
	}
	var out []string
	for _, t := range tasks {
		stat, err := os.ReadFile(filepath.Join(dir, t.Name(), "stat"))
		if err != nil {
			continue // the thread ended
		}
		// pid (comm) state ...: comm may hold spaces and parentheses.
		s := string(stat)
		name, state := "?", "?"
		if i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')'); i >= 0 && j > i {
			name = s[i+1 : j]
			if f := strings.Fields(s[j+1:]); len(f) > 0 {
				state = f[0]
			}
		}
		wchan, _ := os.ReadFile(filepath.Join(dir, t.Name(), "wchan"))
		w := strings.TrimSpace(string(wchan))
		if w == "" || w == "0" {
			w = "-"
		}
		out = append(out, fmt.Sprintf("%s/%s %s %s", t.Name(), name, state, w))
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, ", ")
}

// mallocTunables keep glibc from serving each NBD request's buffer (128 KiB
// to 32 MiB) with a fresh mmap: the default threshold does, and every page of
// it then faults in and is unmapped again. Measured on a daemon receiving
// 1 GiB over NBD: 5.0 s CPU and 263k page faults before, 0.7 s and 16k after.
// Freed memory above 128 MiB still goes back to the system.
const mallocTunables = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"

// daemonEnv is env with mallocTunables added to GLIBC_TUNABLES, unless the
// caller already sets either tunable.
func daemonEnv(env []string) []string {
	for i, kv := range env {
		v, ok := strings.CutPrefix(kv, "GLIBC_TUNABLES=")
		if !ok {
			continue
		}
		if strings.Contains(v, "malloc.mmap_threshold") || strings.Contains(v, "malloc.trim_threshold") {
			return env
		}
		out := append([]string(nil), env...)
		out[i] = kv + ":" + mallocTunables
		return out
	}
	return append(env, "GLIBC_TUNABLES="+mallocTunables)
}

// KillLeftover kills the qemu-storage-daemon a crashed lifeboat left
// running in runDir (its DaemonConfig.Dir), if any, so it neither holds image locks nor writes into
// files about to be deleted. The pid file is trusted only when the process
// is a qemu-storage-daemon using that directory.
func KillLeftover(ctx context.Context, runDir string) error {
	if runDir == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(runDir, "qsd.pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	isOurs := func() bool {
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		return err == nil && strings.Contains(string(cmd), "qemu-storage-daemon") && strings.Contains(string(cmd), runDir)
	}
	if !isOurs() {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing leftover qemu-storage-daemon %d: %w", pid, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for isOurs() { // a zombie's cmdline reads empty: its locks are gone
		select {
		case <-ctx.Done():
			return fmt.Errorf("leftover qemu-storage-daemon %d did not exit after SIGKILL", pid)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

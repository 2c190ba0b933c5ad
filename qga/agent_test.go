package qga_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/qga"
)

// lateBy is how far past its deadline a call may return on a loaded machine
// and still count as bounded: far below DefaultTimeout, which a call that
// ignored its deadline would hit.
const lateBy = 3 * time.Second

// One guest (booting takes seconds under TCG) serves every subtest, in order.
func TestAgent(t *testing.T) {
	g := testguest.Boot(t, testguest.Options{Workload: testguest.FsyncWriter, Name: "qga"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dial := func(t *testing.T) *qga.Agent {
		t.Helper()
		a, err := qga.Dial(ctx, g.AgentSocket())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close() })
		return a
	}

	t.Run("ping", func(t *testing.T) {
		if err := dial(t).Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("freeze and thaw", func(t *testing.T) {
		a := dial(t)
		steps := []struct {
			do     func(context.Context) (int, error)
			name   string
			n      int
			status string
		}{
			{a.Freeze, "freeze", 1, "frozen"}, // /data is the one disk-backed file system
			{a.Thaw, "thaw", 1, "thawed"},
			{a.Thaw, "thaw again", 0, "thawed"},
		}
		for _, s := range steps {
			n, err := s.do(ctx)
			if err != nil {
				a.Thaw(ctx)
				t.Fatalf("%s: %v", s.name, err)
			}
			status, err := a.FreezeStatus(ctx)
			if err != nil || n != s.n || status != s.status {
				a.Thaw(ctx)
				t.Fatalf("%s: %d file systems, status %q, %v; want %d, %q", s.name, n, status, err, s.n, s.status)
			}
		}
	})

	t.Run("freezing twice is refused", func(t *testing.T) {
		a := dial(t)
		if _, err := a.Freeze(ctx); err != nil {
			t.Fatal(err)
		}
		defer a.Thaw(ctx)
		_, err := a.Freeze(ctx)
		var agentErr *qga.Error
		if !errors.As(err, &agentErr) || agentErr.Command != "guest-fsfreeze-freeze" || agentErr.Class == "" {
			t.Fatalf("second freeze: %v, want an agent error naming guest-fsfreeze-freeze", err)
		}
	})

	t.Run("exec", func(t *testing.T) {
		a := dial(t)
		tests := []struct {
			name   string
			path   string
			args   []string
			input  string
			code   int
			stdout string // a substring
			stderr string
		}{
			{"data disk is ext4", "cat", []string{"/proc/mounts"}, "", 0, "/dev/vda /data ext4 rw", ""},
			{"stdin", "cat", nil, "from the host\n", 0, "from the host\n", ""},
			{"exit code and stderr", "sh", []string{"-c", "echo oops >&2; exit 3"}, "", 3, "", "oops"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				r, err := a.Exec(ctx, tt.path, tt.args, []byte(tt.input))
				if err != nil {
					t.Fatal(err)
				}
				if r.ExitCode != tt.code || !strings.Contains(string(r.Stdout), tt.stdout) || !strings.Contains(string(r.Stderr), tt.stderr) {
					t.Fatalf("got %+v (stdout %q, stderr %q); want exit %d, stdout with %q, stderr with %q",
						r, r.Stdout, r.Stderr, tt.code, tt.stdout, tt.stderr)
				}
			})
		}
		if _, err := a.Output(ctx, "false"); !errors.Is(err, qga.ErrExit) {
			t.Fatalf("Output(false): %v, want ErrExit", err)
		}
		_, err := a.Exec(ctx, "/no/such/program", nil, nil)
		var agentErr *qga.Error
		if !errors.As(err, &agentErr) {
			t.Fatalf("exec of a missing program: %v, want an agent error", err)
		}
	})

	t.Run("fsync-writer writes", func(t *testing.T) {
		a := dial(t)
		count := func() int {
			out, err := a.Output(ctx, "sh", "-c", "ls /data/w | wc -l")
			if err != nil {
				t.Fatal(err)
			}
			n, err := strconv.Atoi(strings.TrimSpace(string(out)))
			if err != nil {
				t.Fatalf("ls /data/w | wc -l said %q", out)
			}
			return n
		}
		first := count()
		deadline := time.Now().Add(20 * time.Second)
		for count() <= first {
			if time.Now().After(deadline) {
				t.Fatalf("/data/w stayed at %d files for 20 s; console:\n%s", first, g.Console())
			}
			time.Sleep(200 * time.Millisecond)
		}
		// Freeze in the middle of the writes: every file must still verify.
		if _, err := a.Freeze(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Thaw(ctx); err != nil {
			t.Fatal(err)
		}
		if out, err := a.Output(ctx, "lb-verify", "/data/w"); err != nil || !strings.Contains(string(out), "files ok") {
			t.Fatalf("lb-verify: %s %v", out, err)
		}
	})

	t.Run("dial discards stale replies", func(t *testing.T) {
		// A client that sends and leaves: the agent still answers, and QEMU
		// hands those answers to whoever connects next.
		c, err := net.Dial("unix", g.AgentSocket())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(`{"execute":"guest-sync-delimited","arguments":{"id":7}}` + "\n" + `{"execute":"guest-info"}` + "\n" + `{"execute":"guest-fsfreeze-`))
		c.Close()
		a := dial(t)
		status, err := a.FreezeStatus(ctx)
		if err != nil || status != "thawed" {
			t.Fatalf("status after a stale client: %q, %v", status, err)
		}
	})

	t.Run("a late reply is not taken for the next", func(t *testing.T) {
		a := dial(t)
		// A freeze hook that takes a second makes the agent's reply late.
		hook := "/etc/qemu/fsfreeze-hook.d/slow"
		if _, err := a.Output(ctx, "sh", "-c", `printf '#!/bin/sh\n[ "$1" = freeze ] && sleep 1\nexit 0\n' > `+hook+` && chmod +x `+hook); err != nil {
			t.Fatal(err)
		}
		defer a.Output(ctx, "rm", "-f", hook)
		defer a.Thaw(ctx)
		short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
		start := time.Now()
		_, err := a.Freeze(short)
		cancelShort()
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 300*time.Millisecond+lateBy {
			t.Fatalf("freeze with a 300 ms deadline: %v after %v, want a deadline error by then", err, time.Since(start))
		}
		// The freeze's reply (a number) arrives now; the status call must
		// resync past it and see the guest frozen.
		status, err := a.FreezeStatus(ctx)
		if err != nil || status != "frozen" {
			t.Fatalf("status after the abandoned freeze: %q, %v; want frozen", status, err)
		}
		if n, err := a.Thaw(ctx); err != nil || n != 1 {
			t.Fatalf("thaw: %d, %v", n, err)
		}
		log, err := a.Output(ctx, "cat", "/run/lifeboat-fsfreeze.log")
		if err != nil || !strings.HasSuffix(string(log), "freeze\nthaw\n") {
			t.Fatalf("fsfreeze hook log %q, %v: want the hook run for freeze then thaw", log, err)
		}
	})

	t.Run("concurrent calls take turns", func(t *testing.T) {
		a := dial(t)
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := range 8 {
			wg.Go(func() {
				if i%2 == 0 {
					errs <- a.Ping(ctx)
					return
				}
				out, err := a.Output(ctx, "echo", strconv.Itoa(i))
				if err == nil && strings.TrimSpace(string(out)) != strconv.Itoa(i) {
					err = errors.New("echo " + strconv.Itoa(i) + " printed " + string(out))
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("freeze-thaw latency", func(t *testing.T) {
		a := dial(t)
		// 50 rounds give a p99 worth reporting; CI affords 20.
		n := 50
		if testenv.Short() {
			n = 20
		}
		var rounds []time.Duration
		for range n {
			start := time.Now()
			if _, err := a.Freeze(ctx); err != nil {
				a.Thaw(ctx)
				t.Fatal(err)
			}
			if _, err := a.Thaw(ctx); err != nil {
				t.Fatal(err)
			}
			rounds = append(rounds, time.Since(start))
		}
		slices.Sort(rounds)
		p50, p99 := rounds[len(rounds)/2], rounds[len(rounds)*99/100]
		t.Logf("freeze+thaw round trip under TCG with fsync-writer running, %d rounds: p50 %v, p99 %v", n, p50, p99)
		// The freeze window holds only a QMP transaction: seconds would
		// mean the agent or this client is broken, not slow.
		if p99 > 3*time.Second {
			t.Fatalf("freeze+thaw p99 %v, want well under 3 s", p99)
		}
	})
}

// A real QEMU whose guest never runs (-S: the CPU is stopped) holds the
// agent's port open but nothing answers.
func TestAgentThatNeverAnswers(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	socket := filepath.Join(shortTempDir(t), "qga.sock")
	cmd := exec.Command("qemu-system-x86_64", "-S", "-accel", "tcg", "-M", "q35", "-display", "none",
		"-nodefaults", "-no-user-config", "-device", "virtio-serial-pci",
		"-chardev", "socket,path="+socket+",server=on,wait=off,id=qga0",
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListening(t, socket)

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := qga.Dial(ctx, socket)
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "qemu-ga running") {
		t.Fatalf("dial of a silent agent: %v; want a deadline error saying what to check (qemu says %s)", err, out)
	}
	if took < 400*time.Millisecond || took > 500*time.Millisecond+lateBy {
		t.Fatalf("dial of a silent agent returned after %v, want about 500 ms", took)
	}
}

// The real agent never stops answering in the middle of a session, so this
// is a deliberate fake: a listener that answers the sync and then goes
// silent. A call on it must return by its deadline, or on cancellation.
func TestCallThatNeverReturns(t *testing.T) {
	socket := filepath.Join(shortTempDir(t), "fake.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		n, _ := c.Read(buf)
		var req struct {
			Arguments struct {
				ID json.Number `json:"id"`
			} `json:"arguments"`
		}
		json.Unmarshal([]byte(strings.TrimLeft(string(buf[:n]), "\xff")), &req)
		c.Write([]byte("\xff{\"return\": " + req.Arguments.ID.String() + "}\n"))
		for { // swallow everything, answer nothing
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	a, err := qga.Dial(context.Background(), socket)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = a.Ping(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 200*time.Millisecond+lateBy {
		t.Fatalf("ping of a silent agent: %v after %v; want a deadline error after 200 ms", err, time.Since(start))
	}

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start = time.Now()
	_, err = a.FreezeStatus(ctx)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 100*time.Millisecond+lateBy {
		t.Fatalf("cancelled status call: %v after %v; want context.Canceled soon after 100 ms", err, time.Since(start))
	}
}

// shortTempDir is a temporary directory with a path short enough for unix
// sockets (108 bytes), which t.TempDir under a long test name may not be.
func shortTempDir(t *testing.T) string {
	dir := t.TempDir()
	if len(dir) < 80 {
		return dir
	}
	dir, err := os.MkdirTemp("", "qga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func waitListening(t *testing.T, socket string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", socket)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s after 10 s: %v", socket, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Package hostcmd runs the host commands an operator gives lifeboat (freeze
// hooks, failover plan hooks, a VM's start command) within a bound.
package hostcmd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"sync/atomic"
	"syscall"
	"time"
)

// WaitDelay is how long Run waits for a command's output to close once the
// command itself has ended (or been killed): a background child that keeps
// the output open (`sleep 600 &` in a script) does not hold the caller.
const WaitDelay = time.Second

// MaxOutput bounds the output Run keeps of a command (its first bytes):
// a command that prints without end cannot fill lifeboat's memory or log.
const MaxOutput = 16 << 10

// TimeoutError is a command that did not end within its bound: its process
// group was killed.
type TimeoutError struct {
	Timeout time.Duration
	// Caller says the bound was the caller's (ctx's deadline came before
	// Run's own timeout), not the command's.
	Caller bool
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("did not end within %v; it and every process it started in its process group were killed", e.Timeout)
}

// Result is what a command that ran left behind.
type Result struct {
	Output []byte // stdout and stderr interleaved, at most MaxOutput bytes
	// Lingering says the command ended but left a process holding its output
	// open: Run stopped reading after WaitDelay and left that process running.
	Lingering bool
}

// Run runs the command name with args (env: its environment, nil for
// lifeboat's own) in its own process group, with stdout and stderr
// collected into the Result, and bounded by timeout: if the command is still
// running at the bound, or when ctx ends, its whole group is killed
// (SIGKILL), so the children of a script end with it. Run returns at most
// WaitDelay after the command ended or was killed, whatever its children do
// with its output. A command that exits but leaves a child holding its
// output is not killed (Result.Lingering): starting something in the
// background is a hook's right; only its output is no longer read. A
// command past its bound returns a *TimeoutError.
func Run(ctx context.Context, timeout time.Duration, env []string, name string, args ...string) (Result, error) {
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(hctx, name, args...)
	cmd.Env = env
	out := &capped{max: MaxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var killed atomic.Bool
	// exec calls Cancel only while the command itself runs; the group's id
	// is its pid (Setpgid with Pgid 0).
	cmd.Cancel = func() error {
		killed.Store(true)
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = WaitDelay
	err := cmd.Run()
	res := Result{Output: out.bytes()}
	if killed.Load() {
		switch {
		case errors.Is(ctx.Err(), context.DeadlineExceeded):
			return res, &TimeoutError{Timeout: time.Since(start).Round(time.Millisecond), Caller: true}
		case ctx.Err() != nil:
			return res, fmt.Errorf("stopped (%w); it and every process it started in its process group were killed", context.Cause(ctx))
		}
		return res, &TimeoutError{Timeout: timeout}
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		// Exited 0; a child still holds the output.
		res.Lingering, err = true, nil
	}
	return res, err
}

// capped keeps the first max bytes written to it and counts the rest.
type capped struct {
	max     int
	buf     bytes.Buffer
	dropped int
}

func (c *capped) Write(p []byte) (int, error) {
	// exec copies stdout and stderr through one goroutine when both are the
	// same writer, so no lock is needed here.
	if room := c.max - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(room, len(p))])
		c.dropped += max(0, len(p)-room)
	} else {
		c.dropped += len(p)
	}
	return len(p), nil
}

func (c *capped) bytes() []byte {
	b := bytes.TrimSpace(c.buf.Bytes())
	if c.dropped > 0 {
		b = fmt.Appendf(append([]byte(nil), b...), " [%d more bytes not kept]", c.dropped)
	}
	return b
}

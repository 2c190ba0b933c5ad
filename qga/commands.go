package qga

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Ping checks that the agent answers.
func (a *Agent) Ping(ctx context.Context) error {
	return a.call(ctx, "guest-ping", nil, nil)
}

// FreezeStatus reports whether the guest's file systems are "thawed" or "frozen".
func (a *Agent) FreezeStatus(ctx context.Context) (string, error) {
	var s string
	err := a.call(ctx, "guest-fsfreeze-status", nil, &s)
	return s, err
}

// Freeze freezes the guest's file systems (running the guest's fsfreeze hook
// first, when the agent has one) and returns how many it froze. When it fails
// or times out, the guest may still be frozen, or become frozen: call Thaw.
func (a *Agent) Freeze(ctx context.Context) (int, error) {
	var n int
	err := a.call(ctx, "guest-fsfreeze-freeze", nil, &n)
	return n, err
}

// Thaw thaws the guest's file systems and returns how many it thawed. Thawing
// a guest that is not frozen succeeds and returns 0.
func (a *Agent) Thaw(ctx context.Context) (int, error) {
	var n int
	err := a.call(ctx, "guest-fsfreeze-thaw", nil, &n)
	return n, err
}

// ExecResult is how a command run in the guest ended.
type ExecResult struct {
	ExitCode int // -1 when a signal ended it
	Signal   int // the signal that ended it, or 0
	Stdout   []byte
	Stderr   []byte
	// Truncated is set when the agent kept only the first part of the
	// output (it holds at most 16 MiB of each stream).
	Truncated bool
}

// Exec runs path with args in the guest, feeding it input on stdin, and waits
// for it to exit, bounded by ctx. A non-zero exit is reported in the result,
// not as an error. path is looked up in the agent's PATH.
func (a *Agent) Exec(ctx context.Context, path string, args []string, input []byte) (ExecResult, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	var started struct {
		PID int `json:"pid"`
	}
	err := a.call(ctx, "guest-exec", struct {
		Path          string   `json:"path"`
		Arg           []string `json:"arg,omitempty"`
		InputData     []byte   `json:"input-data,omitempty"` // base64, as the agent expects
		CaptureOutput bool     `json:"capture-output"`
	}{path, args, input, true}, &started)
	if err != nil {
		return ExecResult{}, err
	}

	// Short commands end within milliseconds: poll fast first, then back off.
	wait := 2 * time.Millisecond
	for {
		var st struct {
			Exited       bool   `json:"exited"`
			ExitCode     *int   `json:"exitcode"`
			Signal       int    `json:"signal"`
			OutData      []byte `json:"out-data"`
			ErrData      []byte `json:"err-data"`
			OutTruncated bool   `json:"out-truncated"`
			ErrTruncated bool   `json:"err-truncated"`
		}
		err := a.call(ctx, "guest-exec-status", struct {
			PID int `json:"pid"`
		}{started.PID}, &st)
		if err != nil {
			return ExecResult{}, fmt.Errorf("%w (%s is pid %d in the guest)", err, path, started.PID)
		}
		if st.Exited {
			r := ExecResult{ExitCode: -1, Signal: st.Signal, Stdout: st.OutData, Stderr: st.ErrData,
				Truncated: st.OutTruncated || st.ErrTruncated}
			if st.ExitCode != nil {
				r.ExitCode = *st.ExitCode
			}
			return r, nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ExecResult{}, fmt.Errorf("qga: %s (pid %d in the guest) still running: %w", path, started.PID, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}

// ErrExit is matched by the error Output returns when the command ran but
// did not exit with status 0.
var ErrExit = errors.New("command failed in the guest")

// Output runs a command in the guest like Exec and returns its stdout. A
// non-zero exit is an error (matching ErrExit) that quotes stderr.
func (a *Agent) Output(ctx context.Context, path string, args ...string) ([]byte, error) {
	r, err := a.Exec(ctx, path, args, nil)
	if err != nil {
		return nil, err
	}
	if r.ExitCode != 0 {
		return r.Stdout, fmt.Errorf("qga: %s %q: exit code %d, signal %d, stderr %.500q: %w",
			path, args, r.ExitCode, r.Signal, r.Stderr, ErrExit)
	}
	return r.Stdout, nil
}

// Shutdown asks the guest to power off (guest-shutdown, mode powerdown). The
// agent answers nothing when it obeys, so Shutdown returns once the request
// is sent; the caller watches QEMU (its SHUTDOWN event) for the outcome. An
// error the agent does answer with is returned.
func (a *Agent) Shutdown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	err := a.call(ctx, "guest-shutdown", map[string]string{"mode": "powerdown"}, nil)
	var agentErr *Error
	if errors.As(err, &agentErr) {
		return err
	}
	return nil // no answer: the guest is shutting down (or the agent is gone, which QEMU will tell)
}

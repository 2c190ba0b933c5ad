package hostcmd_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/hostcmd"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// Real shell scripts: a command past its bound has its whole process group
// killed (the script and the child it started), a command that leaves a
// child holding its output returns and leaves the child, and output is kept
// up to MaxOutput.
func TestRun(t *testing.T) {
	pids := testenv.NewPIDs(t)
	child := "sleep 600 & echo $! >> " + pids.Path + "; "

	for _, tc := range []struct {
		name      string
		deadline  time.Duration // the caller's, if any
		script    string
		timeout   time.Duration
		err       string // "" for success
		caller    bool   // a *TimeoutError of the caller's deadline
		out       string
		lingering bool
		left      int // processes of the script still running after
	}{
		{name: "ends", script: "echo hello; echo world >&2", timeout: 10 * time.Second, out: "hello\nworld"},
		{name: "fails", script: "echo no >&2; exit 3", timeout: 10 * time.Second, err: "exit status 3", out: "no"},
		{name: "past its bound", script: "echo $$ >> " + pids.Path + "; " + child + "echo waiting; exec sleep 600", timeout: time.Second,
			err: "did not end within 1s", out: "waiting"},
		{name: "past the caller's deadline", deadline: time.Second, script: "echo $$ >> " + pids.Path + "; " + child + "exec sleep 600", timeout: time.Minute,
			err: "did not end within", caller: true},
		{name: "leaves a child holding its output", script: child + "echo started", timeout: 10 * time.Second, out: "started", lingering: true, left: 1},
		{name: "prints without end", script: "yes | head -c 100000", timeout: 10 * time.Second,
			out: strings.Repeat("y\n", hostcmd.MaxOutput/2)[:hostcmd.MaxOutput-1] + " [83616 more bytes not kept]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer pids.KillAll()
			ctx := context.Background()
			if tc.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.deadline)
				defer cancel()
			}
			start := time.Now()
			res, err := hostcmd.Run(ctx, tc.timeout, nil, "sh", "-c", tc.script)
			took := time.Since(start)
			t.Logf("%v after %v: %q", err, took.Round(time.Millisecond), res.Output)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("error %v, want %q", err, tc.err)
			}
			var te *hostcmd.TimeoutError
			if errors.As(err, &te) && te.Caller != tc.caller {
				t.Errorf("timeout of the caller's deadline: %v, want %v", te.Caller, tc.caller)
			}
			if string(res.Output) != tc.out {
				t.Errorf("output %q, want %q", res.Output, tc.out)
			}
			if res.Lingering != tc.lingering {
				t.Errorf("lingering %v, want %v", res.Lingering, tc.lingering)
			}
			if took > 10*time.Second {
				t.Errorf("took %v", took)
			}
			// SIGKILL is delivered at once, but a killed child is a zombie
			// until init reaps it: give it a moment.
			var live []int
			for range 50 {
				if live = pids.Alive(); len(live) == tc.left {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if len(live) != tc.left {
				t.Errorf("processes of the script still running: %v, want %d", live, tc.left)
			}
		})
	}
}

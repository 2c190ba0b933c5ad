package protect_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// Host hooks around a real guest's freeze that leave a child behind: a
// script that starts `sleep 600 &` (which keeps the script's output open),
// or that runs past hook_timeout. Before, the cycle waited for the child's
// output to close (the 600 s, far past hook_timeout and the freeze limit),
// a killed script's children went on, and a slow post-thaw hook held Thaw
// until it reported the guest "not confirmed thawed" and the next cycles
// fell back to crash. Now a hook's whole process group is killed at its
// bound, its output is read at most hostcmd.WaitDelay after it ends, the
// error names the VM, the hook and the bound, and the guest is thawed.
func TestHookThatLeavesAChildDoesNotHoldTheCycle(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	g := bootFreezeGuest(t, testguest.Options{Workload: testguest.FsyncWriter, DiskSize: 64 << 20, Name: "hooks"})
	site := testsite.Start(t, recovery.Options{})
	p := guestProtector(t, g, site, "g1")

	pids := testenv.NewPIDs(t)

	const (
		limit       = 4 * time.Second
		hookTimeout = time.Second
		// within bounds a cycle: the freeze limit, the hook's bound, and room
		// for a loaded 2-CPU machine; far below the children's 600 s.
		within = 40 * time.Second
	)
	child := "sleep 600 & echo $! >> " + pids.Path + "; "
	cases := []struct {
		name       string
		pre, post  string
		level      lifeboat.Consistency
		note       []string // in the point's note
		childAlive bool     // the hook's child still runs after the cycle
		log        []string // in the quiescer's log
	}{
		{name: "pre-freeze past its bound", pre: "echo $$ >> " + pids.Path + "; " + child + "exec sleep 600",
			level: lifeboat.Crash, note: []string{`vm "g1"`, "pre-freeze hook", "sleep 600", "within 1s", "hook_timeout 1s"}},
		{name: "pre-freeze leaves a child", pre: child + "echo flushed",
			level: lifeboat.Application, childAlive: true, log: []string{"left a process holding its output", "output=flushed"}},
		{name: "post-thaw leaves a child", post: child + "echo resumed",
			level: lifeboat.Application, childAlive: true, log: []string{"left a process holding its output", "output=resumed"}},
		{name: "post-thaw past its bound", post: "echo $$ >> " + pids.Path + "; " + child + "exec sleep 600",
			level: lifeboat.Application},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer pids.KillAll()
			var logs testenv.LogBuffer
			q := &protect.AgentQuiescer{VM: "g1", Socket: g.AgentSocket(), Level: lifeboat.Application, Limit: limit,
				MarkerDir: t.TempDir(), HookTimeout: hookTimeout, Log: slog.New(slog.NewTextHandler(&logs, nil))}
			if tc.pre != "" {
				q.PreFreeze = []string{tc.pre}
			}
			if tc.post != "" {
				q.PostThaw = []string{tc.post}
			}
			p.Quiescer = q
			// Two cycles: the second must not fall back because of the
			// first's hooks.
			for i := range 2 {
				type result struct {
					pt  lifeboat.Point
					err error
				}
				done := make(chan result, 1)
				start := time.Now()
				go func() {
					pt, err := p.Cycle(context.Background())
					done <- result{pt, err}
				}()
				var r result
				select {
				case r = <-done:
				case <-time.After(within):
					t.Fatalf("cycle %d still running after %v (freeze limit %v, hook_timeout %v): a hook's child holds it; log:\n%s", i, within, limit, hookTimeout, logs.String())
				}
				took := time.Since(start)
				if r.err != nil {
					t.Fatalf("cycle %d: %v", i, r.err)
				}
				t.Logf("cycle %d: point %d %s in %v, freeze %v: %s", i, r.pt.ID, r.pt.Consistency, took.Round(time.Millisecond), r.pt.Freeze, r.pt.Note)
				if r.pt.Consistency != tc.level {
					t.Errorf("cycle %d: point is %s (%s), want %s", i, r.pt.Consistency, r.pt.Note, tc.level)
				}
				for _, s := range tc.note {
					if !strings.Contains(r.pt.Note, s) {
						t.Errorf("cycle %d: note %q does not say %q", i, r.pt.Note, s)
					}
				}
				if tc.level != lifeboat.Crash && r.pt.Freeze > limit/2 {
					t.Errorf("cycle %d: the point records a freeze of %v: a post-thaw hook's time counted as frozen", i, r.pt.Freeze)
				}
				if st, err := g.WaitThawed(ctx(t), 10*time.Second); err != nil {
					t.Fatalf("after cycle %d: guest-fsfreeze-status %q: %v", i, st, err)
				}
			}
			// The hooks of the last cycle may still end in the background
			// (post-thaw): wait for their bound.
			time.Sleep(hookTimeout + 2*time.Second)
			if live := pids.Alive(); tc.childAlive != (len(live) > 0) {
				t.Errorf("processes of the hooks still running: %v; want children left running: %v", live, tc.childAlive)
			}
			for _, l := range tc.log {
				if !strings.Contains(logs.String(), l) {
					t.Errorf("the log does not say %q:\n%s", l, logs.String())
				}
			}
			if strings.Contains(logs.String(), "not confirmed thawed") {
				t.Errorf("a hook made lifeboat report the guest not thawed:\n%s", logs.String())
			}
		})
	}
}

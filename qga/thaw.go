package qga

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"syscall"
	"time"
)

// ErrNoGuest is EnsureThawed's answer when nothing serves the agent's socket:
// it is gone or refuses connections, so no QEMU runs there, and no guest that
// could be frozen. A live QEMU's chardev never refuses: a client beyond the one
// it serves waits in its backlog.
var ErrNoGuest = errors.New("no QEMU serves the guest agent's socket (the VM is shut down or removed): no guest runs there that could be frozen")

// The thaw loop's pace. An attempt is one connection: sync, thaw, status. An
// agent busy in a slow fsfreeze hook answers nothing until the hook ends, so
// an attempt may wait that long; the loop then closes it and dials again.
const (
	thawAttempt    = 5 * time.Second
	thawBackoffMin = 100 * time.Millisecond
	thawBackoffMax = time.Second
	// DefaultThawBound bounds EnsureThawed when its context has no deadline.
	DefaultThawBound = 10 * time.Minute
)

// EnsureThawed thaws the guest's file systems behind socket and returns once
// the agent says guest-fsfreeze-status "thawed", or an error when ctx ends
// first (DefaultThawBound when ctx has no deadline), or at once ErrNoGuest
// when no QEMU serves socket. It is lifeboat's one way to
// thaw a guest, safe whatever state the agent and the connection are in: a
// freeze that timed out and lands later (the guest's fsfreeze hook still
// running), a connection whose replies are out of step, an agent that is
// restarting.
//
// a, when not nil, is a connection to try first (the one a freeze went out
// on); EnsureThawed takes it over and closes it. Every new connection, and
// one whose last call gave up before its reply, syncs first with a fresh id
// (guest-sync-delimited), so the late reply to an abandoned freeze is not
// taken for a reply of ours. A failed connection is closed before the
// next dial: the agent's chardev serves one client at a time, and one left
// open would hold the socket so that every later dial waits behind it.
func EnsureThawed(ctx context.Context, socket string, a *Agent, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultThawBound)
		defer cancel()
	}
	start := time.Now()
	backoff := thawBackoffMin
	var lastErr error
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, thawAttempt)
		if a == nil {
			a, lastErr = Dial(actx, socket) // syncs with a fresh id
			if errors.Is(lastErr, syscall.ENOENT) || errors.Is(lastErr, syscall.ECONNREFUSED) {
				cancel()
				return fmt.Errorf("qga: %w: %w", ErrNoGuest, lastErr)
			}
		}
		if lastErr == nil {
			lastErr = a.thawAndCheck(actx) // a call on a connection out of step resyncs first
		}
		cancel()
		if a != nil {
			a.Close()
			a = nil
		}
		if lastErr == nil {
			level := slog.LevelDebug
			if attempt > 1 {
				level = slog.LevelInfo
			}
			log.Log(ctx, level, "guest confirmed thawed", "socket", socket, "attempts", attempt, "took", time.Since(start).Round(time.Millisecond))
			return nil
		}
		if attempt == 1 {
			log.Warn("guest not confirmed thawed yet (its agent may be busy in a freeze hook): retrying", "socket", socket, "err", lastErr)
		} else {
			log.Debug("thaw attempt failed", "socket", socket, "attempt", attempt, "err", lastErr)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("qga: could not confirm that the guest behind %s is thawed after %v and %d attempts (last: %w); "+
				"if it stays frozen, thaw it through its agent (guest-fsfreeze-thaw) or restart lifeboat, which thaws guests it left frozen",
				socket, time.Since(start).Round(time.Millisecond), attempt, lastErr)
		case <-t.C:
		}
		backoff = min(2*backoff, thawBackoffMax)
	}
}

// thawAndCheck thaws, then asks whether the guest is thawed: the status is
// what counts (a thaw refused by an agent that is not frozen is fine; a thaw
// that answered while a late freeze was still on its way is not).
func (a *Agent) thawAndCheck(ctx context.Context) error {
	_, err := a.Thaw(ctx)
	var agentErr *Error
	if err != nil && !errors.As(err, &agentErr) {
		return err
	}
	st, err := a.FreezeStatus(ctx)
	if err != nil {
		return err
	}
	if st != "thawed" {
		return fmt.Errorf("qga: guest-fsfreeze-status on %s says %q after guest-fsfreeze-thaw", a.socket, st)
	}
	return nil
}

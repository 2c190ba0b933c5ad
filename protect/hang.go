package protect

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"time"
)

// A VM's QEMU can stop answering at any moment of a cycle (SIGSTOP, a host
// under memory pressure, storage that hangs its main loop). The cycle
// then fails within a bound that says "hung" rather than "slow", and what it
// added to QEMU is taken down in the background as soon as QEMU answers
// again: its NBD exports, and the copy-before-write in the guest's write
// path. Until then the VM stays locked (cycle.detached), and its next cycles
// are refused saying why (Protector.busy).

// DefaultStallLimit is a Protector's StallLimit when it sets none. A QMP
// command is answered in milliseconds and an NBD read of a chunk in well
// under a second; a minute without an answer is a QEMU that does not work.
const DefaultStallLimit = time.Minute

// hungWait bounds how long lifeboat waits in the background for a VM's QEMU
// that did not answer in time, to clean up after it; past it, the VM's next
// cycle clears what is left (RemoveStale).
const hungWait = 10 * time.Minute

// stallPoll is how often a step on QEMU is checked for a hang.
const stallPoll = 50 * time.Millisecond

func (p *Protector) stallLimit() time.Duration { return cmp.Or(p.StallLimit, DefaultStallLimit) }

// hangNote is what a VM's next cycle is told while lifeboat waits for its
// QEMU to clean up after a cycle it left unanswered.
type hangNote struct {
	what  string    // what QEMU did not answer
	since time.Time // since when
	until time.Time // when lifeboat stops waiting
}

// busy is why a cycle of the VM cannot start now.
func (p *Protector) busy() error {
	if n := p.hung.Load(); n != nil {
		return fmt.Errorf("vm %q: its QEMU did not answer %s, since %s (%v ago), and lifeboat waits for it to clean up after that cycle before the next one (until %s at most, then the next cycle clears what is left): is its QEMU process stopped, or hung on its storage?",
			p.VM.Name, n.what, n.since.Format(time.RFC3339), time.Since(n.since).Round(time.Second), n.until.Format(time.RFC3339))
	}
	return fmt.Errorf("vm %q: a cycle is already running", p.VM.Name)
}

// bounded runs step, one QMP step of a group member within the group's
// instant, waiting at most bound in all: one that takes longer than a
// freeze is held is not the group's instant. See untilHung.
func (c *cycle) bounded(ctx context.Context, what string, bound time.Duration, step func(context.Context) error) error {
	return c.untilHung(ctx, func(start time.Time) (string, time.Time, bool) {
		if time.Since(start) < bound {
			return "", time.Time{}, false
		}
		return fmt.Sprintf("the %s within %v", what, bound), start, true
	}, step, c.undoInstant)
}

// watched runs step, a step on the VM's QEMU (phase says which, in
// words), for as long as it takes while QEMU answers: it is taken for hung
// only once one QMP command has waited StallLimit for its answer. See
// untilHung.
func (c *cycle) watched(ctx context.Context, phase string, step func(context.Context) error, undo func(context.Context, error)) error {
	stall := c.p.stallLimit()
	return c.untilHung(ctx, func(time.Time) (string, time.Time, bool) {
		cmd, waited := c.mon.Unanswered()
		if waited < stall {
			return "", time.Time{}, false
		}
		return fmt.Sprintf("QMP %q for %v %s", cmd, stall, phase), time.Now().Add(-waited), true
	}, step, undo)
}

// untilHung runs step and returns its error, unless hung (checked every
// stallPoll) says first that the VM's QEMU does not answer: then the cycle
// fails at once, rather than waiting for QEMU for as long as its context
// (hours in the daemon) holding a group's other members, their fleeces in
// their guests' write path, and a late answer would have made a point of
// instants apart. The step goes on in the background on a context of its
// own bounded by hungWait, and once it has returned undo cleans up after
// it (the cycle is detached: see detach). Until then, the caller's context
// ending ends the step.
func (c *cycle) untilHung(ctx context.Context, hung func(start time.Time) (what string, since time.Time, ok bool), step func(context.Context) error, undo func(context.Context, error)) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hungWait)
	stop := context.AfterFunc(ctx, cancel)
	log := c.log // the step may change c.log
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- step(sctx) }()
	tick := time.NewTicker(stallPoll)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			stop()
			cancel()
			return err
		case <-tick.C:
		}
		if what, since, ok := hung(start); ok {
			stop()
			return c.detach(log, &hangNote{what: what, since: since, until: start.Add(hungWait)}, func() {
				defer cancel()
				undo(sctx, <-done)
			})
		}
	}
}

// detach leaves the cycle, whose VM's QEMU did not answer n.what, to
// cleanup in the background: once cleanup has returned, the cycle's hold
// on QEMU ends and the VM is unlocked. Meanwhile its next cycles are
// refused saying so, and a group leaves the member alone (c.detached).
// cleanup must be bounded (hungWait). It returns the cycle's error.
func (c *cycle) detach(log *slog.Logger, n *hangNote, cleanup func()) error {
	c.detached = true
	c.p.hung.Store(n)
	log.Error("the VM's QEMU did not answer in time: the cycle fails; lifeboat cleans up after it once it answers", "unanswered", n.what, "until", n.until)
	go func() {
		cleanup()
		cctx, cancel := context.WithTimeout(context.Background(), boundedCleanup)
		c.close(cctx)
		cancel()
		c.p.hung.Store(nil)
		c.p.mu.Unlock()
		log.Info("the VM's QEMU answered again (or lifeboat stopped waiting): the failed cycle is cleaned up", "unanswered since", n.since)
	}()
	return fmt.Errorf("its QEMU did not answer %s (hung or stopped?): lifeboat takes down what the cycle added to it, in the background, once it answers", n.what)
}

// undoInstant cleans up after a step of the instant (the transaction, the
// export) that returned err: one that succeeded is rolled back; one that
// failed undid its own, and what is left of the fleece goes.
func (c *cycle) undoInstant(ctx context.Context, err error) {
	if c.lv != nil {
		c.settleFailed(ctx) // whatever libvirt did, ended
		return
	}
	if err == nil {
		c.rollback(ctx)
	} else if c.fleece != nil {
		c.fleece.Teardown(ctx)
	}
}

// undoPrepare cleans up after a cycle's preparation that returned err: a
// fleece prepared goes (one that failed undid itself); no generation
// turned yet.
func (c *cycle) undoPrepare(ctx context.Context, err error) {
	if err == nil && c.fleece != nil {
		c.fleece.Teardown(ctx)
	}
}

// rollback undoes a cycle whose instant was taken but whose point will not be
// sent: fleece down, the new generation merged back into the old one.
func (c *cycle) rollback(ctx context.Context) {
	if c.lv != nil {
		c.settleFailed(ctx)
		return
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
	defer cancel()
	if err := c.fleece.Teardown(cctx); err != nil {
		c.log.Error("fleece teardown failed", "err", err)
	}
	for _, d := range c.disks {
		if err := rollback(cctx, c.mon, d.node, d.old, d.new); err != nil {
			c.bookkeepingFailed(cctx, d, err)
		}
	}
}

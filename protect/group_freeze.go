package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// freezeAll freezes the group's members at once, each in its own goroutine
// and bounded by its own quiescer's limit, and returns once every freeze has
// returned (frozen, fallen back, or failed): the group's instant comes
// after all of them. One after the other, the first member frozen stayed
// frozen for the sum of the members' freezes (seconds each with
// application hooks), and a silent agent kept every member frozen before
// it for its whole limit, thawed by its timer before the instant: their
// points dropped to crash consistent.
//
// A member frozen at Since with limit L is thawed by its own timer at
// Since+L; the instant must come before. So once a member is frozen, the
// freezes still under way are cut (their contexts cancelled) at the
// earliest Since+L-instantReserve(L) of the frozen members: a silent or
// slow agent then costs its own member a crash-consistent point (the
// quiescer falls back, or under a strict policy fails, which fails the
// group), and the others keep theirs. Frozen members stay frozen until
// then at most, less than their limit.
//
// A freeze that fails fails the group: the freezes under way are cut and
// waited for, and the members frozen are returned with the error, to be
// thawed. A freeze that does not return within cutWait of its cut fails
// the group too (its quiescer ignored the cut: whether it froze, and
// under which policy, is not known); whatever it returns later is thawed
// at once.
func (g *Group) freezeAll(ctx context.Context, cycles []*cycle, logs []*slog.Logger) ([]*freezeState, error) {
	type result struct {
		i   int
		st  *freezeState
		err error
	}
	n := len(cycles)
	results := make(chan result, n) // never blocks: a freeze abandoned still lands
	cuts := make([]context.CancelFunc, n)
	for i, c := range cycles {
		fctx, cancel := context.WithCancel(ctx)
		cuts[i] = cancel
		go func() {
			q := c.p.Quiescer
			if c.quiet {
				q = nil // the guest cannot write: nothing to freeze
			}
			st, err := freeze(fctx, q)
			results <- result{i, st, err}
		}()
	}
	frozen := make([]*freezeState, n)
	done := make([]bool, n)
	var (
		errs    []error
		cutWhy  string // why the freezes under way were cut, "" until they are
		due     time.Time
		dueBy   string // the member whose limit due is
		timer   = time.NewTimer(time.Hour)
		hangs   <-chan time.Time
		pending = n
	)
	timer.Stop()
	defer timer.Stop()
	cutAll := func(why string) {
		if cutWhy != "" {
			return
		}
		cutWhy = why
		for i, d := range done {
			if !d {
				cuts[i]()
			}
		}
		hangs = time.After(cutWait)
	}
	for pending > 0 {
		select {
		case r := <-results:
			pending--
			done[r.i] = true
			cuts[r.i]()
			name := cycles[r.i].p.VM.Name
			if r.err != nil {
				switch {
				case cutWhy == "":
					errs = append(errs, fmt.Errorf("group %q: vm %q: %w", g.Name, name, r.err))
				case len(errs) == 0: // cut at the others' limit
					errs = append(errs, fmt.Errorf("group %q: vm %q: %s: %w", g.Name, name, cutWhy, r.err))
				default: // cut since another member failed: that one's error says it
					logs[r.i].Info("the guest's freeze was cut: another member's freeze failed", "err", r.err)
				}
				cutAll("another member's freeze failed")
				continue
			}
			frozen[r.i] = r.st
			if cutWhy != "" && r.st.fellBack() {
				r.st.note = cutWhy + ": " + r.st.note
			}
			if until, ok := r.st.holdUntil(); ok && (due.IsZero() || until.Before(due)) {
				due, dueBy = until, name
				timer.Reset(time.Until(due))
			}
		case <-timer.C:
			cutAll(fmt.Sprintf("its freeze did not finish while the group's other members could stay frozen for the instant (vm %q's freeze_limit)", dueBy))
		case <-hangs:
			var hung []string
			for i, d := range done {
				if !d {
					hung = append(hung, cycles[i].p.VM.Name)
					logs[i].Error("the guest's freeze did not return though cut: the group's cycle fails; lifeboat thaws the guest if the freeze lands", "waited", cutWait)
				}
			}
			go func(pending int) {
				for range pending {
					if r := <-results; r.st != nil {
						r.st.thaw(ctx, logs[r.i])
					}
				}
			}(pending)
			errs = append(errs, fmt.Errorf("group %q: the freeze of %q did not return within %v of being cut (%s): the group's cycle fails, and lifeboat thaws the guest if the freeze lands later", g.Name, hung, cutWait, cutWhy))
			return frozen, errors.Join(errs...)
		}
	}
	return frozen, errors.Join(errs...)
}

// cutWait bounds the wait for a member's freeze once the group has cut it:
// a quiescer returns at once when its context ends.
const cutWait = 3 * time.Second

// instantReserve is what a frozen member's limit keeps back for the
// group's instant once every freeze has returned: the members' fleece
// transactions (milliseconds each) and the thaw calls that stop the
// freezes' timers. A quarter of the limit, at most a second.
func instantReserve(limit time.Duration) time.Duration {
	return min(limit/4, time.Second)
}

// holdUntil is when the group must have taken its instant for this freeze
// to hold through it: false when it gives no more than crash consistency
// whenever the instant comes.
func (s *freezeState) holdUntil() (time.Time, bool) {
	if s.f == nil || !s.ok || s.f.Since.IsZero() {
		return time.Time{}, false
	}
	limit := s.f.Limit
	if limit <= 0 {
		limit = DefaultFreezeLimit
	}
	return s.f.Since.Add(limit - instantReserve(limit)), true
}

// fellBack is a quiescer's fallback: nothing was frozen, and the note says
// why.
func (s *freezeState) fellBack() bool {
	return s.f != nil && s.f.Since.IsZero() && s.note != ""
}

// thawAll thaws every frozen member at once: a member whose agent is slow
// to confirm its thaw does not keep the others frozen.
func thawAll(ctx context.Context, frozen []*freezeState, logs []*slog.Logger) {
	var wg sync.WaitGroup
	for i, f := range frozen {
		if f == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.thaw(ctx, logs[i])
		}()
	}
	wg.Wait()
}

package protect

import (
	"context"
	"log/slog"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// Quiescer makes an instant more than crash consistent.
type Quiescer interface {
	// Freeze quiesces the guest, bounded by ctx. When quiescing fails it either
	// falls back (a Frozen at level Crash whose Note says why) or, if the policy
	// says so, returns an error that fails the cycle. The guest is thawed on
	// every path: by Thaw, or by the Quiescer itself when its bound expires.
	Freeze(ctx context.Context) (*Frozen, error)
}

// Frozen is a quiesced guest until Thaw.
type Frozen struct {
	Level lifeboat.Consistency
	Note  string
	// Since is when the guest's writes stopped (zero when nothing was frozen).
	Since time.Time
	// Limit is the quiescer's freeze limit, also on a fallback: a group
	// gives each member's instant no longer than its members' smallest.
	Limit time.Duration
	// Thaw lets the guest write again. held is false when the freeze bound
	// expired before Thaw and the guest was thawed already: the instant taken
	// since is then only crash consistent.
	Thaw func(ctx context.Context) (held bool, err error)
}

// frozeNothing is the note of a freeze that froze no file system. qemu-ga
// answers guest-fsfreeze-freeze with the number it froze, and with success and
// 0 when none it can freeze is mounted (it skips file systems without FIFREEZE:
// ZFS, FUSE, tmpfs): the instant is then crash consistent, whatever hooks ran.
func frozeNothing(level lifeboat.Consistency) string {
	note := "the guest agent froze no file system (none it can freeze is mounted; qemu-ga skips those without FIFREEZE, such as ZFS and FUSE)"
	if level == lifeboat.Application {
		note += "; the application hooks ran around the instant, but with no file system frozen what they flushed is not known to be on disk"
	}
	return note
}

// freezeState is a cycle's view of its freeze: what it reached and how long
// the guest was held.
type freezeState struct {
	f    *Frozen
	note string
	held time.Duration
	ok   bool
}

// freeze quiesces through q (nil: no quiescing, crash consistent).
func freeze(ctx context.Context, q Quiescer) (*freezeState, error) {
	if q == nil {
		return &freezeState{}, nil
	}
	f, err := q.Freeze(ctx)
	if err != nil {
		return nil, err
	}
	return &freezeState{f: f, note: f.Note, ok: f.Level != lifeboat.Crash}, nil
}

// thaw runs right after the instant, once.
func (s *freezeState) thaw(ctx context.Context, log *slog.Logger) {
	if s.f == nil || s.f.Thaw == nil {
		return
	}
	thaw := s.f.Thaw
	s.f.Thaw = nil
	held, err := thaw(context.WithoutCancel(ctx))
	if !s.f.Since.IsZero() {
		s.held = time.Since(s.f.Since)
	}
	if err != nil {
		log.Error("thaw after the instant failed", "err", err)
	}
	if !held && s.ok {
		s.ok = false
		s.note = "the freeze bound expired before the instant: crash consistent"
		log.Warn(s.note)
	}
}

func (s *freezeState) level() lifeboat.Consistency {
	if s.f == nil || !s.ok {
		return lifeboat.Crash
	}
	return s.f.Level
}

// setLevel records how consistent the instant really was.
func (c *cycle) setLevel(f *freezeState) {
	c.point.Consistency, c.point.Note, c.point.Freeze = f.level(), f.note, f.held
}

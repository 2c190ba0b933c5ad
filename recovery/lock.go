package recovery

import (
	"context"
	"fmt"
	"sync"
)

// vmLock serializes the work on one VM's chains. A writer appends a point: it
// holds the writer slot and shares the chain, so exports and verifies of the
// points already committed keep working while it writes. A retention merge
// rewrites images in the chain and holds it alone.
type vmLock struct {
	writer chan struct{} // one slot: one point in progress per VM
	chain  rwLock
}

func newVMLock() *vmLock { return &vmLock{writer: make(chan struct{}, 1)} }

func (l *vmLock) lockWriter(ctx context.Context, vm string) error {
	select {
	case l.writer <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("vm %q: another point is still being written: %w", vm, ctx.Err())
	}
}

func (l *vmLock) unlockWriter() { <-l.writer }

// rwLock is a readers-writer lock whose waits end with their context.
type rwLock struct {
	mu      sync.Mutex
	readers int
	writing bool
	changed chan struct{} // closed and replaced whenever the lock is released
}

func (l *rwLock) acquire(ctx context.Context, exclusive bool) error {
	for {
		l.mu.Lock()
		if !l.writing && (!exclusive || l.readers == 0) {
			if exclusive {
				l.writing = true
			} else {
				l.readers++
			}
			l.mu.Unlock()
			return nil
		}
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (l *rwLock) release(exclusive bool) {
	l.mu.Lock()
	if exclusive {
		l.writing = false
	} else {
		l.readers--
	}
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
	l.mu.Unlock()
}

// lockChain takes the VM's chain shared (export, verify, writing a new point) or
// alone (retention), waiting at most as long as ctx allows.
func (s *Store) lockChain(ctx context.Context, vm string, exclusive bool) (unlock func(), err error) {
	l := s.vmLock(vm)
	if err := l.chain.acquire(ctx, exclusive); err != nil {
		return nil, fmt.Errorf("vm %q: waiting for its chain (a point is being written or merged): %w", vm, err)
	}
	var once sync.Once
	return func() { once.Do(func() { l.chain.release(exclusive) }) }, nil
}

func (s *Store) vmLock(vm string) *vmLock {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.locks[vm]
	if !ok {
		l = newVMLock()
		s.locks[vm] = l
	}
	return l
}

package recovery

import (
	"context"
	"fmt"
	"sync"
)

// vmLock serializes the work on one VM's chains.
//
//   - A writer appends a point: it holds the writer slot for its life, and the
//     shape while it reads the catalog's chain and opens it.
//   - Exports, verifies and pins share the chain: each opens the images with
//     QEMU's image locks.
//   - A retention merge rewrites the oldest images of the chain and holds it
//     alone. It does not wait for a writer: the writer opens the committed
//     images below its own without QEMU's image locks, and what a merge
//     changes in them (the data committed into the older image) reads the
//     same through the chain at every moment. The merge holds the shape while
//     it rewrites headers, the catalog and the files that a writer being set
//     up reads. A merge into the latest point, which a writer's own image
//     names as its backing, holds the writer slot as well.
type vmLock struct {
	writer chan struct{} // one slot: one point in progress per VM
	shape  chan struct{} // one slot: images' headers, the catalog's chain and its files
	chain  rwLock
}

func newVMLock() *vmLock {
	return &vmLock{writer: make(chan struct{}, 1), shape: make(chan struct{}, 1)}
}

func (l *vmLock) lockWriter(ctx context.Context, vm string) error {
	select {
	case l.writer <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("vm %q: another point is still being written: %w", vm, ctx.Err())
	}
}

func (l *vmLock) unlockWriter() { <-l.writer }

// lockShape takes the shape, waiting as long as ctx allows; unlock is idempotent.
func (l *vmLock) lockShape(ctx context.Context, vm string) (unlock func(), err error) {
	select {
	case l.shape <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("vm %q: waiting for a retention merge to finish rewriting its chain: %w", vm, ctx.Err())
	}
	var once sync.Once
	return func() { once.Do(func() { <-l.shape }) }, nil
}

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

// lockChain takes the VM's chain shared (export, verify, pin) or alone
// (retention), waiting at most as long as ctx allows.
func (s *Store) lockChain(ctx context.Context, vm string, exclusive bool) (unlock func(), err error) {
	l := s.vmLock(vm)
	if err := l.chain.acquire(ctx, exclusive); err != nil {
		return nil, fmt.Errorf("vm %q: waiting for its chain (a point is being merged, exported or verified): %w", vm, err)
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

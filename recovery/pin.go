package recovery

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// Pin keeps retention from merging a VM's points while a VM started from
// one of them runs: a merge rewrites the images under every later point,
// and the started VM reads its point's image as the backing file of its own
// overlay. Pins are kept in the catalog, so they outlive a restart.
type Pin struct {
	Point  uint64    `json:"point"`
	Reason string    `json:"reason"` // "failover", "test failover"
	Since  time.Time `json:"since"`
}

var keyPins = []byte("pins")

func readPins(tx *bolt.Tx, vm string) (map[string]Pin, error) {
	b := vmBucket(tx, vm)
	if b == nil {
		return nil, nil
	}
	v := b.Get(keyPins)
	if v == nil {
		return nil, nil
	}
	var pins map[string]Pin
	if err := json.Unmarshal(v, &pins); err != nil {
		return nil, fmt.Errorf("vm %q: catalog pins record is corrupt (%v): %w", vm, err, errCatalog)
	}
	return pins, nil
}

// AddPin pins vm's point under name (a failover run's id). The point must
// exist. It waits, within ctx, for a merge under way to end (retention holds
// the chain while it merges, and checks the pins once it holds it), so that
// once AddPin returns the point's images stay as they are.
func (s *Store) AddPin(ctx context.Context, vm, name string, p Pin) error {
	unlock, err := s.lockChain(ctx, vm, false)
	if err != nil {
		return err
	}
	defer unlock()
	return s.db.Update(func(tx *bolt.Tx) error {
		if _, err := pointAt(tx, vm, p.Point); err != nil {
			return err
		}
		pins, err := readPins(tx, vm)
		if err != nil {
			return err
		}
		if pins == nil {
			pins = map[string]Pin{}
		}
		pins[name] = p
		b, err := vmBucketCreate(tx, vm)
		if err != nil {
			return err
		}
		return putJSON(b, keyPins, pins)
	})
}

// RemovePin removes a pin; a missing one is fine (a repeat).
func (s *Store) RemovePin(vm, name string) error {
	last := false
	err := s.db.Update(func(tx *bolt.Tx) error {
		pins, err := readPins(tx, vm)
		if err != nil || pins == nil {
			return err
		}
		delete(pins, name)
		b, err := vmBucketCreate(tx, vm)
		if err != nil {
			return err
		}
		if len(pins) == 0 {
			last = true
			return b.Delete(keyPins)
		}
		return putJSON(b, keyPins, pins)
	})
	if err == nil && last {
		// Retention waited for the pin: it catches up now, not at the VM's
		// next point, which may never come (production lost, or the VM
		// protected elsewhere since).
		s.retainLater(vm)
	}
	return err
}

// Pins are vm's pins, by name.
func (s *Store) Pins(vm string) (map[string]Pin, error) {
	var pins map[string]Pin
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		pins, err = readPins(tx, vm)
		return err
	})
	return maps.Clone(pins), err
}

// pointCount is how many committed points vm has.
func (s *Store) pointCount(vm string) (int, error) {
	var n int
	err := s.db.View(func(tx *bolt.Tx) error {
		pts, err := readPoints(tx, vm)
		n = len(pts)
		return err
	})
	return n, err
}

// MarkTested records in point id's catalog record that a test failover of
// it came up (its guest agent answered).
func (s *Store) MarkTested(vm string, id uint64, m lifeboat.TestMark) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		r, err := pointAt(tx, vm, id)
		if err != nil {
			return err
		}
		m.At = m.At.UTC()
		r.Point.Tested = &m
		return putPoint(vmBucket(tx, vm), r)
	})
}

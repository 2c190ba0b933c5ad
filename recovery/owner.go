package recovery

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Owner is the protected site that may write a VM's points here. It is
// recorded with the VM's first committed point (or declared in the recovery
// site's config beforehand), and changes only by an explicit handover, which
// raises the epoch.
type Owner struct {
	Site  string    `json:"site"`
	Epoch uint64    `json:"epoch"`
	Since time.Time `json:"since"`
	// FailedOver is set when the recovery site took the VM itself: a failover
	// started it here from a point (FromPoint), so no protected site may
	// replicate it until it is handed back.
	FailedOver bool   `json:"failed_over,omitempty"`
	FromPoint  uint64 `json:"from_point,omitempty"`
}

// ErrNotOwner is wrapped by the error of a call made for a VM by a site that
// does not own it.
var ErrNotOwner = errors.New("the site does not own the VM")

// NotOwnerError says which site asked and which one owns the VM.
type NotOwnerError struct {
	VM       string
	Site     string // the site that asked
	Owner    Owner
	Declared bool // the owner comes from the recovery site's config, not from a point
}

// failedOverPhrase is how a refusal for a failed-over VM reads: the
// protected site learns of the failover from it (the wire carries the text).
const failedOverPhrase = "was failed over to recovery site"

// IsFailedOver reports whether err is a recovery site's refusal of a VM it
// failed over (as the protected site receives it, through the wire).
func IsFailedOver(err error) bool {
	return err != nil && strings.Contains(err.Error(), failedOverPhrase)
}

func (e *NotOwnerError) Error() string {
	if e.Owner.FailedOver {
		return fmt.Sprintf("vm %q "+failedOverPhrase+" %q at %s (from point %d, epoch %d): it runs there now, and site %q may not replicate it any more. "+
			"Do not start it here as well. To bring it home, fail it back from %q; to give the failover up, run `lifeboat failover %s --undo` there",
			e.VM, e.Owner.Site, e.Owner.Since.UTC().Format(time.RFC3339), e.Owner.FromPoint, e.Owner.Epoch, e.Site, e.Owner.Site, e.VM)
	}
	how := fmt.Sprintf("since %s, epoch %d", e.Owner.Since.UTC().Format(time.RFC3339), e.Owner.Epoch)
	if e.Declared {
		how = "as declared in the recovery site's config (`owners:`)"
	}
	return fmt.Sprintf("vm %q at this recovery site belongs to site %q (%s); site %q may not replicate or read it. "+
		"If %q protects a different VM that happens to have the same name, give it another name in %q's config (`vms[].name`); "+
		"to move the VM to %q, hand it over at the recovery site: `lifeboat handover %s --to %s`",
		e.VM, e.Owner.Site, how, e.Site, e.Site, e.Site, e.Site, e.VM, e.Site)
}

func (e *NotOwnerError) Unwrap() error { return ErrNotOwner }

var keyOwner = []byte("owner")

// readOwner returns the VM's recorded owner, if any.
func readOwner(tx *bolt.Tx, vm string) (Owner, bool, error) {
	b := vmBucket(tx, vm)
	if b == nil {
		return Owner{}, false, nil
	}
	v := b.Get(keyOwner)
	if v == nil {
		return Owner{}, false, nil
	}
	var o Owner
	if err := json.Unmarshal(v, &o); err != nil || o.Site == "" {
		return Owner{}, false, fmt.Errorf("vm %q: catalog owner record is corrupt (%v): %w", vm, err, errCatalog)
	}
	return o, true, nil
}

// authorize checks, in tx, that site may write and read vm: it owns it, or
// nobody does yet and the config declares no other owner.
func (s *Store) authorize(tx *bolt.Tx, vm, site string) error {
	o, ok, err := readOwner(tx, vm)
	if err != nil {
		return err
	}
	if !ok {
		declared, ok := s.owners[vm]
		if !ok || declared == site {
			return nil
		}
		return &NotOwnerError{VM: vm, Site: site, Owner: Owner{Site: declared}, Declared: true}
	}
	if o.Site != site {
		return &NotOwnerError{VM: vm, Site: site, Owner: o}
	}
	return nil
}

// claim records site as vm's owner (epoch 1) if nobody owns it yet, in tx.
func claim(tx *bolt.Tx, b *bolt.Bucket, vm, site string, now time.Time) error {
	if site == "" {
		return nil
	}
	if _, ok, err := readOwner(tx, vm); err != nil || ok {
		return err
	}
	return putJSON(b, keyOwner, Owner{Site: site, Epoch: 1, Since: now.UTC()})
}

// Authorize checks that site may replicate vm here and read its points.
func (s *Store) Authorize(vm, site string) error {
	return s.db.View(func(tx *bolt.Tx) error { return s.authorize(tx, vm, site) })
}

// Owner returns the site that owns vm here, and false when none does yet (a
// site declared in the config counts, with epoch 0 until its first point).
func (s *Store) Owner(vm string) (Owner, bool, error) {
	var (
		o  Owner
		ok bool
	)
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		o, ok, err = readOwner(tx, vm)
		return err
	})
	if err == nil && !ok {
		if site, declared := s.owners[vm]; declared {
			return Owner{Site: site}, true, nil
		}
	}
	return o, ok, err
}

// Handover makes site the owner of vm under the next epoch: from now on only
// it may replicate the VM here. Its first point continues the VM's history
// (the same lineage, a resync by hashes where its bitmaps cannot prove it).
func (s *Store) Handover(vm, site string) (Owner, error) {
	o, _, err := s.handover(vm, Owner{Site: site})
	return o, err
}

// TakeOver makes the recovery site itself (named site) the owner of vm under
// the next epoch, for a failover from point: every protected site is refused
// from then on, told that the VM was failed over. It returns the owner
// before, to whom an undo hands the VM back.
func (s *Store) TakeOver(vm, site string, point uint64) (now, before Owner, err error) {
	return s.handover(vm, Owner{Site: site, FailedOver: true, FromPoint: point})
}

func (s *Store) handover(vm string, o Owner) (now, before Owner, err error) {
	if err := checkName("vm", vm); err != nil {
		return Owner{}, Owner{}, err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		old, ok, err := readOwner(tx, vm)
		if err != nil {
			return err
		}
		if !ok {
			if site, declared := s.owners[vm]; declared {
				old = Owner{Site: site}
			}
		}
		b, err := vmBucketCreate(tx, vm)
		if err != nil {
			return err
		}
		before = old
		o.Epoch, o.Since = old.Epoch+1, time.Now().UTC()
		return putJSON(b, keyOwner, o)
	})
	if err != nil {
		return Owner{}, Owner{}, fmt.Errorf("vm %q: handover to site %q: %w", vm, o.Site, err)
	}
	s.log.Warn("vm handed over", "vm", vm, "site", o.Site, "epoch", o.Epoch, "failed_over", o.FailedOver)
	return o, before, nil
}

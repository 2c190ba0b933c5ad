package failover

import (
	"cmp"
	"errors"
	"fmt"
	"time"
)

// DefaultContactWindow is how recent a production site's contact refuses
// a failover: a few cycles' worth.
const DefaultContactWindow = 2 * time.Minute

// ErrSplitBrain is wrapped by a failover refused because the production
// site was in contact a moment ago, or may have been: this site restarted
// since and cannot tell.
var ErrSplitBrain = errors.New("the production site seems to be running the VM")

// checkContact is the split-brain guard of a real failover of vm: it refuses
// while the VM's production site was in contact within the contact window,
// and, after a restart of this site, while it may have been (a call this
// site cannot date counts as made just before its start). Its refusal says
// what is known, how long to wait, and when --force is right.
func (m *Manager) checkContact(vm string) error {
	if m.LastContact == nil {
		return nil
	}
	window := cmp.Or(m.ContactWindow, DefaultContactWindow)
	c := m.LastContact(vm)
	silent := time.Since(c.At)
	if silent >= window {
		return nil
	}
	until := c.At.Add(window)
	wait := fmt.Sprintf("if %q stays silent, a failover goes through from %s (in %v)", c.Site, until.UTC().Format(time.RFC3339), (window - silent).Round(time.Second))
	if !c.Unknown {
		known := fmt.Sprintf("%v ago (at %s)", silent.Round(time.Second), c.At.UTC().Format(time.RFC3339))
		if c.Restarted {
			// The record may lag the call a little: At is the latest it can
			// have been, which is the start at most.
			when := fmt.Sprintf("%v ago, before this site restarted at %s", silent.Round(time.Second), c.Started.UTC().Format(time.RFC3339))
			if !c.At.Before(c.Started) {
				when = fmt.Sprintf("just before this site restarted at %s, %v ago", c.Started.UTC().Format(time.RFC3339), silent.Round(time.Second))
			}
			known = fmt.Sprintf("%s (its last call on record: %s)", when, c.Wall.UTC().Format(time.RFC3339))
		}
		return fmt.Errorf("vm %q: its production site %q was in contact %s, so it is probably still running the VM, and a failover now would run it at two sites: %w. "+
			"Move it without loss with `lifeboat failover %s --planned` at %q; if %q is really lost (or fenced), repeat with --force; %s",
			vm, c.Site, known, ErrSplitBrain, vm, c.Site, c.Site, wait)
	}
	// Nothing heard since this site started: only a VM that a protected
	// site owns may be running there.
	o, ok, err := m.Store.Owner(vm)
	if err != nil {
		return fmt.Errorf("vm %q: reading its owner for the split-brain check: %w", vm, err)
	}
	if !ok || o.FailedOver || o.Site == m.Site {
		return nil
	}
	record := "no call of it is on record, so it may have called just before"
	if !c.Wall.IsZero() && c.Site == o.Site {
		record = fmt.Sprintf("its last call on record was at %s by the clock before this host restarted, which this site cannot date now", c.Wall.UTC().Format(time.RFC3339))
	}
	wait = fmt.Sprintf("Wait until %s (%v more) for %q to call: if it does, it still runs the VM and a failover stays refused; if it does not, the failover goes through then",
		until.UTC().Format(time.RFC3339), (window - silent).Round(time.Second), o.Site)
	return fmt.Errorf("vm %q: this site started at %s (%v ago) and has heard nothing from the VM's production site %q since (%s), so whether %q still runs the VM is unknown, and a failover now might run it at two sites: %w. "+
		"%s. If %q is known lost (or fenced), repeat with --force now; to move the VM without loss, run `lifeboat failover %s --planned` at %q",
		vm, c.Started.UTC().Format(time.RFC3339), silent.Round(time.Second), o.Site, record, o.Site, ErrSplitBrain,
		wait, o.Site, vm, o.Site)
}

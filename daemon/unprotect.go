package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// Unprotected says that a VM of the config is not protected any more
// (`lifeboat unprotect VM`): when, for which recovery site, and what of
// lifeboat's was taken out of the VM and what is left there. It is kept in
// the VM's work directory, so the VM stays unprotected across restarts of
// the site until `lifeboat sync VM` protects it again.
type Unprotected struct {
	VM    string    `json:"vm"`
	Peer  string    `json:"peer"`
	Since time.Time `json:"since"`
	protect.Released
	// Error is why the release did not finish, if it did not: the VM stays
	// unprotected, and `lifeboat unprotect` can be run again.
	Error string `json:"error,omitempty"`
}

// stateUnprotected is a protected VM's state once `lifeboat unprotect` ran.
const stateUnprotected = "unprotected"

// errUnprotected is the schedule's answer for an unprotected VM: no cycle.
var errUnprotected = errors.New("unprotected (`lifeboat unprotect`): no cycles until `lifeboat sync` protects it again")

// errReleasing is an unprotected record's Error while its release runs,
// and after a site died during it.
const errReleasing = "the release was under way, and had not ended when this was recorded (the site stopped during it?)"

func (v *vm) unprotectedPath() string { return filepath.Join(v.p.VM.WorkDir, "unprotected.json") }

// loadUnprotected reads the VM's unprotected record as the site starts. A
// record that cannot be read keeps the VM unprotected: cycles would put back
// what the user had lifeboat take out.
func (v *vm) loadUnprotected() {
	b, err := os.ReadFile(v.unprotectedPath())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	u := &Unprotected{VM: v.cfg.Name, Peer: v.cfg.Peer}
	if err == nil {
		err = json.Unmarshal(b, u)
	}
	if err != nil {
		v.d.log.Error("the VM's unprotected record cannot be read: it stays unprotected; `lifeboat sync` protects it again", "vm", v.cfg.Name, "file", v.unprotectedPath(), "err", err)
	}
	v.unprotected = u
	v.state = stateUnprotected
}

// isUnprotected reports whether `lifeboat unprotect` took the VM out of protection.
func (v *vm) isUnprotected() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.unprotected != nil
}

// unprotect stops the VM's cycles and takes lifeboat's change tracking for
// its recovery site out of it (protect.Protector.Release). The record is
// written before anything is removed, so a site that dies meanwhile starts
// with the VM unprotected, and a later unprotect finishes the release.
func (v *vm) unprotect(ctx context.Context) (Unprotected, error) {
	u := Unprotected{VM: v.cfg.Name, Peer: v.cfg.Peer}
	if v.group != "" {
		return u, fmt.Errorf("vm %q is a member of consistency group %q, whose VMs are protected together: take it out of the group's `vms:` in %s and restart the site, then unprotect it", v.cfg.Name, v.group, v.d.cfg.Path())
	}
	if v.reversedHere() {
		return u, fmt.Errorf("vm %q runs at its old recovery site and is protected from there to this site: this site protects it no more, there is nothing of its own to release; remove it from `vms:`", v.cfg.Name)
	}
	v.cycleMu.Lock()
	defer v.cycleMu.Unlock()
	v.mu.Lock()
	homing, failedOver := v.homing, v.state == stateFailedOver
	v.mu.Unlock()
	if homing {
		return u, fmt.Errorf("vm %q is coming home from a failback: unprotect it once its first cycle here has run (`lifeboat status`)", v.cfg.Name)
	}
	if failedOver {
		return u, fmt.Errorf("vm %q was failed over and runs at recovery site %q: there is nothing to unprotect here until it is handed back (a failback home, or `lifeboat failover %s --undo` there); to retire it there, `lifeboat forget %s` at that site once no run of it is left", v.cfg.Name, v.cfg.Peer, v.cfg.Name, v.cfg.Name)
	}
	// The record's Peer is the first site whose generations are not yet
	// released: one the config no longer names is released too.
	peers := []string{v.cfg.Peer}
	v.mu.Lock()
	if prev := v.unprotected; prev != nil && prev.Error != "" && prev.Peer != "" && prev.Peer != v.cfg.Peer {
		peers = []string{prev.Peer, v.cfg.Peer}
	}
	v.mu.Unlock()
	u.Peer = peers[0]
	u.Since = time.Now().UTC()
	// Until the release ends, the record says it has not: a site that dies
	// meanwhile starts saying to run unprotect again, not that it finished.
	u.Error = errReleasing
	if err := v.saveUnprotected(u); err != nil {
		// Nothing recorded, nothing done: the VM is protected as before.
		return Unprotected{VM: u.VM, Peer: u.Peer}, err
	}
	v.mu.Lock()
	v.unprotected = &u
	v.progress = nil
	v.mu.Unlock()
	v.setState(stateUnprotected, nil)
	var rel protect.Released
	var err error
	for _, peer := range peers {
		u.Peer = peer
		var r protect.Released
		r, err = v.p.Release(ctx, peer)
		rel.Removed = append(rel.Removed, r.Removed...)
		rel.Left = append(rel.Left, r.Left...)
		if err != nil {
			break
		}
	}
	u.Released, u.Error = rel, ""
	if err != nil {
		u.Error = err.Error()
	}
	if serr := v.saveUnprotected(u); serr != nil {
		v.d.log.Error("recording what unprotect removed", "vm", v.cfg.Name, "err", serr)
	}
	v.mu.Lock()
	v.unprotected = &u
	v.mu.Unlock()
	if err != nil {
		v.setState(stateUnprotected, err)
		v.d.log.Error("unprotect: the VM is not protected any more, but lifeboat's change tracking could not all be removed: run `lifeboat unprotect` again", "vm", v.cfg.Name, "peer", v.cfg.Peer, "removed", len(rel.Removed), "err", err)
		return u, fmt.Errorf("vm %q is not protected any more (no cycles), but not everything of lifeboat's could be taken out of it: %w; run `lifeboat unprotect %s` again", v.cfg.Name, err, v.cfg.Name)
	}
	v.d.log.Warn("vm unprotected by the local API: no cycles, lifeboat's change tracking removed; the recovery site keeps its points", "vm", v.cfg.Name, "peer", v.cfg.Peer, "removed", len(rel.Removed), "left", len(rel.Left))
	return u, nil
}

func (v *vm) saveUnprotected(u Unprotected) error {
	if err := os.MkdirAll(v.p.VM.WorkDir, 0o750); err != nil {
		return fmt.Errorf("vm %q: work dir: %w", v.cfg.Name, err)
	}
	b, err := json.MarshalIndent(u, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(v.unprotectedPath(), b, 0o640); err != nil {
		return fmt.Errorf("vm %q: record that it is unprotected: %w", v.cfg.Name, err)
	}
	return nil
}

// resume protects an unprotected VM again (`lifeboat sync VM`); the caller
// holds cycleMu. Its next cycle is a hash resync: its generations are gone.
func (v *vm) resume() error {
	if !v.isUnprotected() {
		return nil
	}
	if err := os.Remove(v.unprotectedPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vm %q: protect it again: %w", v.cfg.Name, err)
	}
	v.mu.Lock()
	v.unprotected = nil
	v.mu.Unlock()
	v.d.log.Warn("vm protected again by `lifeboat sync`: its first cycle compares hashes with the recovery site", "vm", v.cfg.Name, "peer", v.cfg.Peer)
	return nil
}

// unprotectedDetail is what status says of an unprotected VM.
func (u *Unprotected) detail(vm string) string {
	s := fmt.Sprintf("unprotected at %s: no cycles; lifeboat's change tracking for site %s was taken out of the VM (%d removed", u.Since.Format(time.RFC3339), u.Peer, len(u.Removed))
	if len(u.Left) > 0 {
		s += fmt.Sprintf(", %d left: %s", len(u.Left), u.Left[0])
	}
	s += fmt.Sprintf("); site %s keeps its restore points. `lifeboat sync %s` protects it again (a hash resync), or remove it from `vms:`", u.Peer, vm)
	if u.Error != "" {
		s += "; the release did not finish (" + u.Error + "): run `lifeboat unprotect " + vm + "` again"
	}
	return s
}

func (a *apiServer) unprotect(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if g, ok := a.d.groups[name]; ok {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("%q is a consistency group: unprotect names one VM, and a group's members are protected together (take a VM out of the group's `vms:` first); members: %v", name, g.cfg.VMs))
		return
	}
	v, ok := a.d.vmOf(name)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q is not protected by site %q (see `vms:` in %s)", name, a.d.cfg.Site, a.d.cfg.Path()))
		return
	}
	if v.reverse != "" {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q is protected in reverse from this site (failover run %s), not by its config: unprotect is for the VMs under `vms:`", name, v.reverse))
		return
	}
	u, err := v.unprotect(r.Context())
	if err != nil && u.Since.IsZero() {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, u) // a release that did not finish says so in Error
}

// Unprotect stops protecting vm and takes lifeboat's change tracking out of
// it. A release that did not finish is returned with its Error set.
func (c *Client) Unprotect(ctx context.Context, vm string) (Unprotected, error) {
	var u Unprotected
	err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/unprotect", nil, &u)
	if err == nil && u.VM == "" {
		err = errors.New("the site answered without the VM")
	}
	return u, err
}

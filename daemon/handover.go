package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/lifeboat-dr/lifeboat/recovery"
)

// HandoverRequest moves the ownership of a VM at a recovery site to Site.
type HandoverRequest struct {
	Site string `json:"site"`
}

func (a *apiServer) handover(w http.ResponseWriter, r *http.Request) {
	vm := r.PathValue("vm")
	if a.d.store == nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("site %q is not a recovery site (no `listen:` in %s): run `lifeboat handover` at the recovery site that holds vm %q", a.d.cfg.Site, a.d.cfg.Path(), vm))
		return
	}
	var req HandoverRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("handover request: %w", err))
		return
	}
	if !nameRE.MatchString(req.Site) {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("%q is not a site name: name the protected site that is to own vm %q, e.g. `lifeboat handover %s --to prod`", req.Site, vm, vm))
		return
	}
	if _, found, err := a.d.store.Latest(vm); err != nil || !found {
		if err == nil {
			err = fmt.Errorf("vm %q has no restore point at site %q: there is nothing to hand over (a new VM belongs to the first site that replicates it)", vm, a.d.cfg.Site)
		}
		writeErr(w, http.StatusNotFound, err)
		return
	}
	// A VM failed over here runs here: handed to a protected site now, it
	// would be replicated from there too, running at two sites. A failed-
	// over owner with no run left (its record lost) is what a handover
	// repairs, and goes through.
	runs, err := a.d.runs.Runs(vm)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	if run := lastRealRun(runs); run != nil {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q runs here from point %d (failover %s since %s): handed to site %q now, it would be replicated from there while it runs here. End the failover first: `lifeboat failover %s --undo` gives it back to the site it was taken from, `lifeboat failback %s --finalize` brings it home; then hand it over",
			vm, run.Point, run.ID, run.Started.UTC().Format(time.RFC3339), req.Site, vm, vm))
		return
	}
	o, err := a.d.store.Handover(vm, req.Site)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	a.d.log.Warn("ownership handed over by the local API", "vm", vm, "site", o.Site, "epoch", o.Epoch)
	writeJSON(w, http.StatusOK, o)
}

// Handover makes site the owner of vm at this recovery site, under a new epoch.
func (c *Client) Handover(ctx context.Context, vm, site string) (recovery.Owner, error) {
	var o recovery.Owner
	err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/handover", HandoverRequest{Site: site}, &o)
	if err == nil && o.Site == "" {
		err = errors.New("the site answered without an owner")
	}
	return o, err
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"

	"github.com/lifeboat-dr/lifeboat/recovery"
)

// forget deletes every restore point of a VM at this recovery site
// (recovery.Store.Forget): POST /v1/vms/{vm}/forget.
func (a *apiServer) forget(w http.ResponseWriter, r *http.Request) {
	vm := r.PathValue("vm")
	if a.d.store == nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("site %q is not a recovery site (no `listen:` in %s): run `lifeboat forget` at the recovery site that holds vm %q", a.d.cfg.Site, a.d.cfg.Path(), vm))
		return
	}
	a.d.mu.Lock()
	fb, undoing := a.d.backs[vm], a.d.undoing[vm]
	a.d.mu.Unlock()
	if (fb != nil && fb.Running) || undoing {
		writeErr(w, http.StatusConflict, fmt.Errorf("vm %q: a failback or the undo of its failover is under way: forget it once that has ended", vm))
		return
	}
	f, err := a.d.store.Forget(r.Context(), vm)
	switch {
	case errors.Is(err, recovery.ErrUnknownVM):
		writeErr(w, http.StatusNotFound, err)
		return
	case err != nil && len(f.Points) == 0:
		writeErr(w, http.StatusConflict, err)
		return
	case err != nil:
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	a.d.log.Warn("vm forgotten by the local API: its restore points are deleted", "vm", vm, "points", len(f.Points), "owner", f.Owner)
	writeJSON(w, http.StatusOK, f)
}

// Forget deletes every restore point of vm at the recovery site.
func (c *Client) Forget(ctx context.Context, vm string) (recovery.Forgotten, error) {
	var f recovery.Forgotten
	err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/forget", nil, &f)
	if err == nil && f.VM == "" {
		err = errors.New("the site answered without the VM")
	}
	return f, err
}

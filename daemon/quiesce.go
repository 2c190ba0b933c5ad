package daemon

import (
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// quiescer returns what makes a VM's points as consistent as its policy asks.
func (d *Daemon) quiescer(c VMConfig) (protect.Quiescer, error) {
	level := lifeboat.Consistency(c.Consistency)
	if level == lifeboat.Crash {
		return nil, nil
	}
	if c.Libvirt != nil {
		return &protect.LibvirtQuiescer{
			VM: c.Name, Domain: protect.LibvirtDomain{URI: c.Libvirt.URI, Domain: c.Libvirt.Domain}, Level: level,
			Limit:     time.Duration(c.FreezeLimit),
			Strict:    c.OnQuiesceFailure == "fail",
			MarkerDir: d.frozenDir(),
			Guard:     d.guardCommand(),
			Log:       d.log,
		}, nil
	}
	return &protect.AgentQuiescer{
		VM: c.Name, Socket: c.Agent, Level: level,
		Limit:     time.Duration(c.FreezeLimit),
		Strict:    c.OnQuiesceFailure == "fail",
		PreFreeze: c.PreFreeze, PostThaw: c.PostThaw, HookTimeout: time.Duration(c.HookTimeout),
		MarkerDir: d.frozenDir(),
		Guard:     d.guardCommand(),
		Log:       d.log,
	}, nil
}

// quiescer is the VM's one quiescer for the daemon's life, shared by its own
// cycles and its group's. It remembers a freeze not yet confirmed thawed (a
// guest fsfreeze hook that outlasted freeze_limit): the VM's next cycle then
// falls back to crash at once instead of queueing a freeze on the busy agent
// and removing the marker of the pending one. A vm's config is fixed for its
// life (a new config means a restart, where the markers take over).
func (v *vm) quiescer() (protect.Quiescer, error) {
	v.quiesceMu.Lock()
	defer v.quiesceMu.Unlock()
	if v.quiesce != nil {
		return v.quiesce, nil
	}
	q, err := v.d.quiescer(v.cfg)
	if err != nil {
		return nil, err
	}
	v.quiesce = q
	return q, nil
}

// vmQuiescer is the quiescer of a VM configured here, if it has one.
func (d *Daemon) vmQuiescer(name string) protect.Quiescer {
	v, ok := d.vmOf(name)
	if !ok {
		return nil
	}
	q, err := v.quiescer()
	if err != nil {
		return nil
	}
	return q
}

// guardCommand starts a thaw guard: this very binary, as `lifeboat thaw-guard`.
func (d *Daemon) guardCommand() []string {
	exe, err := os.Executable()
	if err != nil {
		d.log.Warn("cannot find lifeboat's own binary for thaw guards; a guest frozen when lifeboat dies is thawed at its next start", "err", err)
		return nil
	}
	return []string{exe, "thaw-guard"}
}

// frozenDir holds a marker per guest frozen right now (see protect.ThawLeftovers).
func (d *Daemon) frozenDir() string { return filepath.Join(d.cfg.StateDir, "frozen") }

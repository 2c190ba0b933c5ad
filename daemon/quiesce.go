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
			Limit:  time.Duration(c.FreezeLimit),
			Strict: c.OnQuiesceFailure == "fail",
			Log:    d.log,
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

// Package daemon is one lifeboat site: its config, the protected VMs' scheduler
// and RPO monitor, the recovery service, and the local API the CLI talks to.
package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Config is a site's configuration file (see site.example.yaml).
type Config struct {
	path string

	Site     string    `yaml:"site"`
	StateDir string    `yaml:"state_dir"`
	API      string    `yaml:"api_socket"`
	TLS      TLSConfig `yaml:"tls"`
	// Listen makes the site a recovery site: protected sites connect here.
	Listen string `yaml:"listen"`
	// Keep is how many points per VM the recovery site keeps.
	Keep int `yaml:"keep"`
	// Owners declares, at a recovery site, which protected site owns a VM
	// (vm name -> site name) before its first point; a VM not named here is
	// owned by the first site that commits a point of it.
	Owners map[string]string `yaml:"owners"`
	// Networks maps, at a recovery site, a production network (as a VM's
	// definition names its NIC's network) to a local bridge: a failover puts
	// the NIC there. A NIC on a network not named here, and every NIC of a
	// test failover, is isolated (a user-mode network with no route out).
	Networks map[string]string `yaml:"networks"`
	// Overrides, at a recovery site, change a VM's vCPUs and memory for a
	// failover here (vm name -> what to change).
	Overrides map[string]OverrideConfig `yaml:"overrides"`
	// CommitAfter, at a recovery site, commits a real failover nobody
	// committed or undid within it (0, the default: wait for the decision).
	CommitAfter Duration `yaml:"commit_after"`
	// Libvirt, at a recovery site, is the libvirtd (a URI such as
	// qemu:///system) that runs failed-over VMs whose points carry a libvirt
	// domain's XML, as domains of it. Networks may then also map to a
	// libvirt network: `lan: network:default`.
	Libvirt string `yaml:"libvirt"`
	// Plans are, at a recovery site, recovery plans: `lifeboat plan run NAME`.
	Plans  []PlanConfig  `yaml:"plans"`
	Peers  []PeerConfig  `yaml:"peers"`
	VMs    []VMConfig    `yaml:"vms"`
	Groups []GroupConfig `yaml:"groups"`
}

// OverrideConfig is what a recovery site changes of a VM's definition.
type OverrideConfig struct {
	CPUs      int   `yaml:"cpus"`
	MemoryMiB int64 `yaml:"memory_mib"`
}

// overrides is c's Overrides as the failover manager takes them.
func (c *Config) overrides() map[string]failover.Override {
	out := map[string]failover.Override{}
	for vm, o := range c.Overrides {
		out[vm] = failover.Override{CPUs: o.CPUs, MemoryMiB: o.MemoryMiB}
	}
	return out
}

// PlanConfig is a recovery plan: steps of VMs started in order.
type PlanConfig struct {
	Name  string `yaml:"name"`
	Steps []struct {
		VMs []string `yaml:"vms"`
		// Wait is "agent" (the default: every VM's guest agent answers),
		// "none", or a delay such as 30s.
		Wait    string   `yaml:"wait"`
		Timeout Duration `yaml:"timeout"` // bounds the agent wait (default 5m)
	} `yaml:"steps"`
	Hooks       []string `yaml:"hooks"`
	HookTimeout Duration `yaml:"hook_timeout"`
}

// plan is p as the failover manager runs it.
func (p PlanConfig) plan() failover.Plan {
	out := failover.Plan{Name: p.Name, Hooks: p.Hooks, HookTimeout: time.Duration(p.HookTimeout)}
	for _, st := range p.Steps {
		s := failover.Step{VMs: st.VMs, Timeout: time.Duration(st.Timeout)}
		switch st.Wait {
		case "", "agent":
			s.WaitAgent = true
		case "none":
		default:
			s.Delay, _ = time.ParseDuration(st.Wait) // checked by validate
		}
		out.Steps = append(out.Steps, s)
	}
	return out
}

// Plan is the recovery plan named name.
func (c *Config) Plan(name string) (PlanConfig, bool) {
	for _, p := range c.Plans {
		if p.Name == name {
			return p, true
		}
	}
	return PlanConfig{}, false
}

// GroupConfig is a consistency group: VMs whose points share one instant.
type GroupConfig struct {
	Name     string   `yaml:"name"`
	VMs      []string `yaml:"vms"`
	Interval Duration `yaml:"interval"`
}

type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
	// CRL is the CA's revocation list (`lifeboat cert revoke` writes it);
	// unset: ca.crl beside ca, if it is there or comes. Named here, it must
	// be there at start.
	CRL string `yaml:"crl"`
}

// PeerConfig is a recovery site this site replicates to.
type PeerConfig struct {
	Name        string `yaml:"name"`
	Address     string `yaml:"address"`
	Compression string `yaml:"compression"`
}

// VMConfig is one protected VM.
type VMConfig struct {
	Name string `yaml:"name"`
	// Libvirt is the libvirt domain the VM is (instead of qmp:): reached
	// through libvirtd, with no change to the domain's XML.
	Libvirt   *LibvirtConfig `yaml:"libvirt"`
	QMP       string         `yaml:"qmp"`
	NBDSocket string         `yaml:"nbd_socket"`
	Disks     []string       `yaml:"disks"`
	Peer      string         `yaml:"peer"`
	Interval  Duration       `yaml:"interval"`
	// RPOTarget is the age of the newest point past which status and metrics
	// say the VM is behind (default: three intervals, or none without an interval).
	RPOTarget   Duration `yaml:"rpo_target"`
	Consistency string   `yaml:"consistency"`
	Agent       string   `yaml:"agent"`
	// OnQuiesceFailure: "crash" (default: take a crash-consistent point, recorded
	// as such) or "fail" (fail the cycle).
	OnQuiesceFailure string   `yaml:"on_quiesce_failure"`
	FreezeLimit      Duration `yaml:"freeze_limit"`
	PreFreeze        []string `yaml:"pre_freeze"`
	PostThaw         []string `yaml:"post_thaw"`
	HookTimeout      Duration `yaml:"hook_timeout"`
	// Start is the command (argv, no shell) that starts the VM at this site
	// when a failback has brought it home (`lifeboat failback --finalize`):
	// `[systemctl, start, qemu@web1]`, say. It is run once the recovery site
	// has handed the VM back, unless the VM runs already; lifeboat then
	// waits until the VM's QMP answers and replicates it at once. Without
	// it the log says to start the VM, and lifeboat waits the same way.
	Start []string `yaml:"start"`
	// Definition is how to start the VM elsewhere, where the VM cannot tell
	// (its qmp: is a storage daemon's, say): each point carries what the VM
	// tells, and this for the rest.
	Definition *DefinitionConfig `yaml:"definition"`
}

// DefinitionConfig is a VM's `definition:`.
type DefinitionConfig struct {
	Machine   string `yaml:"machine"`
	CPUs      int    `yaml:"cpus"`
	MemoryMiB int64  `yaml:"memory_mib"`
	Firmware  string `yaml:"firmware"`
	Kernel    string `yaml:"kernel"`
	Initrd    string `yaml:"initrd"`
	Append    string `yaml:"append"`
	Disks     []struct {
		Name      string `yaml:"name"`
		Device    string `yaml:"device"`
		Serial    string `yaml:"serial"`
		BootIndex int    `yaml:"boot_index"`
	} `yaml:"disks"`
	NICs []struct {
		Model   string `yaml:"model"`
		MAC     string `yaml:"mac"`
		Network string `yaml:"network"`
	} `yaml:"nics"`
}

// definition is the config's part of each point's VM definition.
func (v VMConfig) definition() lifeboat.Definition {
	c := v.Definition
	if c == nil {
		return lifeboat.Definition{}
	}
	d := lifeboat.Definition{Source: "config", Machine: c.Machine, CPUs: c.CPUs, MemoryMiB: c.MemoryMiB,
		Firmware: c.Firmware, Kernel: c.Kernel, Initrd: c.Initrd, Append: c.Append}
	for _, x := range c.Disks {
		d.Disks = append(d.Disks, lifeboat.DefinitionDisk{Name: x.Name, Device: x.Device, Serial: x.Serial, BootIndex: x.BootIndex})
	}
	for _, x := range c.NICs {
		d.NICs = append(d.NICs, lifeboat.DefinitionNIC{Model: x.Model, MAC: x.MAC, Network: x.Network})
	}
	return d
}

// check names the first field of a definition that cannot be right.
func (c *DefinitionConfig) check(disks []string) (field, msg string) {
	switch {
	case c.CPUs < 0:
		return "cpus", "must not be negative"
	case c.MemoryMiB < 0:
		return "memory_mib", "must not be negative (MiB, e.g. `memory_mib: 2048`)"
	}
	seen := map[string]bool{}
	for i, d := range c.Disks {
		f := fmt.Sprintf("disks[%d]", i)
		switch {
		case d.Name == "":
			return f + ".name", "missing: the disk's name as lifeboat names it (`lifeboat status` lists them)"
		case seen[d.Name]:
			return f + ".name", fmt.Sprintf("%q appears twice", d.Name)
		case len(disks) > 0 && !slices.Contains(disks, d.Name):
			return f + ".name", fmt.Sprintf("%q is not one of the VM's `disks:` (%s)", d.Name, strings.Join(disks, ", "))
		case d.BootIndex < 0:
			return f + ".boot_index", "must not be negative"
		}
		seen[d.Name] = true
	}
	for i, n := range c.NICs {
		if n.MAC != "" {
			if _, err := net.ParseMAC(n.MAC); err != nil {
				return fmt.Sprintf("nics[%d].mac", i), fmt.Sprintf("%q is not a MAC address (write it like 52:54:00:12:34:56)", n.MAC)
			}
		}
	}
	return "", ""
}

// LibvirtConfig names a libvirt domain.
type LibvirtConfig struct {
	URI    string `yaml:"uri"`    // default qemu:///system
	Domain string `yaml:"domain"` // default: the VM's name
}

// Duration is a time.Duration written as "30s" in YAML.
type Duration time.Duration

func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (write it like 30s or 5m)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// LoadConfig reads and checks a site's config. Errors name the file, the field and the fix.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("config %s: no such file (start from site.example.yaml in the lifeboat repository)", path)
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return parseConfig(path, b)
}

// parseConfig decodes and checks a config read from path (relative paths in
// it are relative to path's directory).
func parseConfig(path string, b []byte) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, yamlError(path, b, err)
	}
	c.path = path
	if err := c.check(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Path is the file the config was read from.
func (c *Config) Path() string { return c.path }

func (c *Config) fail(field, format string, args ...any) error {
	return fmt.Errorf("config %s: %s: %s", c.path, field, fmt.Sprintf(format, args...))
}

func (c *Config) check() error {
	base := filepath.Dir(c.path)
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(base, p)
	}
	if !nameRE.MatchString(c.Site) {
		return c.fail("site", "%q is not a site name: use letters, digits, '.', '_' or '-', e.g. `site: dr-east`", c.Site)
	}
	if err := pki.CheckSiteName(c.Site); err != nil {
		return c.fail("site", "%v", err) // a site must be able to hold a certificate of its name
	}
	if c.StateDir == "" {
		return c.fail("state_dir", "missing: set the directory for the catalog, replicas and sockets, e.g. `state_dir: /var/lib/lifeboat`")
	}
	c.StateDir = abs(c.StateDir)
	if c.API == "" {
		c.API = filepath.Join(c.StateDir, "api.sock")
	}
	c.API = abs(c.API)
	c.TLS.CA, c.TLS.Cert, c.TLS.Key, c.TLS.CRL = abs(c.TLS.CA), abs(c.TLS.Cert), abs(c.TLS.Key), abs(c.TLS.CRL)
	needTLS := c.Listen != "" || len(c.VMs) > 0
	if needTLS && (c.TLS.CA == "" || c.TLS.Cert == "" || c.TLS.Key == "") {
		return c.fail("tls", "ca, cert and key are all needed: sites only talk over mutual TLS (create them with `lifeboat cert ca` and `lifeboat cert site %s`)", c.Site)
	}
	if c.Keep < 0 {
		return c.fail("keep", "%d: must be at least 1 (points kept per VM)", c.Keep)
	}
	if c.Keep == 0 {
		c.Keep = 24
	}
	if len(c.Owners) > 0 && c.Listen == "" {
		return c.fail("owners", "only a recovery site (one with `listen:`) keeps owners of VMs; remove `owners:` or add `listen:`")
	}
	if len(c.Plans) > 0 && c.Listen == "" {
		return c.fail("plans", "only a recovery site (one with `listen:`) runs recovery plans; remove `plans:` or add `listen:`")
	}
	plans := map[string]bool{}
	for i, p := range c.Plans {
		f := fmt.Sprintf("plans[%d]", i)
		if !nameRE.MatchString(p.Name) || plans[p.Name] {
			return c.fail(f+".name", "%q is not a usable plan name (letters, digits, '.', '_' or '-', each plan named once)", p.Name)
		}
		plans[p.Name] = true
		if len(p.Steps) == 0 {
			return c.fail(f+".steps", "a plan needs at least one step, e.g. `steps: [{vms: [db1]}, {vms: [web1, web2]}]`")
		}
		in := map[string]int{}
		for j, st := range p.Steps {
			sf := fmt.Sprintf("%s.steps[%d]", f, j)
			if len(st.VMs) == 0 {
				return c.fail(sf+".vms", "a step names at least one VM")
			}
			for _, vm := range st.VMs {
				if !nameRE.MatchString(vm) {
					return c.fail(sf+".vms", "%q is not a VM name", vm)
				}
				if k, ok := in[vm]; ok {
					return c.fail(sf+".vms", "vm %q is already in step %d: a VM starts once per plan", vm, k+1)
				}
				in[vm] = j
			}
			switch st.Wait {
			case "", "agent", "none":
			default:
				if d, err := time.ParseDuration(st.Wait); err != nil || d < 0 {
					return c.fail(sf+".wait", "%q: use agent (every guest agent answers), none, or a delay such as 30s", st.Wait)
				}
			}
			if st.Timeout < 0 {
				return c.fail(sf+".timeout", "must not be negative")
			}
		}
		for _, h := range p.Hooks {
			if !filepath.IsAbs(h) {
				return c.fail(f+".hooks", "%q: give hooks as absolute paths", h)
			}
		}
	}
	if len(c.Networks) > 0 && c.Listen == "" {
		return c.fail("networks", "only a recovery site (one with `listen:`) starts failed-over VMs; remove `networks:` or add `listen:`")
	}
	if len(c.Overrides) > 0 && c.Listen == "" {
		return c.fail("overrides", "only a recovery site (one with `listen:`) starts failed-over VMs; at the protected site, a VM's definition is under its `definition:`")
	}
	for vm, o := range c.Overrides {
		switch {
		case o.CPUs < 0:
			return c.fail("overrides."+vm+".cpus", "must not be negative")
		case o.MemoryMiB < 0:
			return c.fail("overrides."+vm+".memory_mib", "must not be negative (MiB, e.g. `memory_mib: 8192`)")
		case o.CPUs == 0 && o.MemoryMiB == 0:
			return c.fail("overrides."+vm, "changes nothing: give `cpus:` or `memory_mib:`")
		}
	}
	if c.CommitAfter != 0 && c.Listen == "" {
		return c.fail("commit_after", "only a recovery site (one with `listen:`) runs failovers; remove `commit_after:` or add `listen:`")
	}
	if c.CommitAfter < 0 {
		return c.fail("commit_after", "must not be negative (e.g. `commit_after: 60m`, or 0 to wait for --commit or --undo)")
	}
	if c.Libvirt != "" {
		if c.Listen == "" {
			return c.fail("libvirt", "only a recovery site (one with `listen:`) starts failed-over VMs; a protected libvirt domain is named under its VM: `libvirt: {domain: web1}`")
		}
		if u, err := url.Parse(c.Libvirt); err != nil || u.Scheme == "" {
			return c.fail("libvirt", "%q is not a libvirt URI, e.g. `libvirt: qemu:///system`", c.Libvirt)
		}
	}
	for net, br := range c.Networks {
		if lvnet, ok := strings.CutPrefix(br, "network:"); ok {
			if c.Libvirt == "" {
				return c.fail("networks."+net, "%q is a libvirt network, and only VMs started under libvirt join one: add `libvirt: qemu:///system`, or name a bridge", br)
			}
			if lvnet == "" || strings.ContainsAny(lvnet, ", /") {
				return c.fail("networks."+net, "%q: name the libvirt network, e.g. `%s: network:default`", br, net)
			}
			continue
		}
		if br == "" || strings.ContainsAny(br, ", /:") {
			return c.fail("networks."+net, "%q is not a bridge name: name the local bridge for production network %q, e.g. `%s: br0`", br, net, net)
		}
	}
	for vm, site := range c.Owners {
		if !nameRE.MatchString(site) {
			return c.fail("owners."+vm, "%q is not a site name: name the protected site that owns vm %q, e.g. `%s: prod`", site, vm, vm)
		}
	}
	peers := map[string]bool{}
	for i := range c.Peers {
		p := &c.Peers[i]
		f := fmt.Sprintf("peers[%d]", i)
		if !nameRE.MatchString(p.Name) {
			return c.fail(f+".name", "%q is not a site name", p.Name)
		}
		if err := pki.CheckSiteName(p.Name); err != nil {
			return c.fail(f+".name", "%v", err)
		}
		if peers[p.Name] {
			return c.fail(f+".name", "%q appears twice", p.Name)
		}
		peers[p.Name] = true
		if p.Address == "" {
			return c.fail(f+".address", "missing: the recovery site's host:port, e.g. `address: dr.example.net:7420`")
		}
		comp, err := wire.ParseCompression(p.Compression)
		if err != nil {
			return c.fail(f+".compression", "%v", err)
		}
		p.Compression = string(comp)
	}
	vms := map[string]bool{}
	for i := range c.VMs {
		v := &c.VMs[i]
		f := fmt.Sprintf("vms[%d]", i)
		if !nameRE.MatchString(v.Name) {
			return c.fail(f+".name", "%q is not a VM name: use letters, digits, '.', '_' or '-'", v.Name)
		}
		f = fmt.Sprintf("vms[%d] (%s)", i, v.Name)
		if vms[v.Name] {
			return c.fail(f+".name", "%q appears twice", v.Name)
		}
		vms[v.Name] = true
		switch {
		case v.Libvirt != nil && (v.QMP != "" || v.NBDSocket != "" || v.Agent != ""):
			return c.fail(f+".libvirt", "a libvirt domain is reached through libvirtd: drop qmp:, nbd_socket: and agent: (libvirt owns the domain's monitor and agent)")
		case v.Libvirt != nil:
			if v.Libvirt.URI == "" {
				v.Libvirt.URI = "qemu:///system"
			}
			if v.Libvirt.Domain == "" {
				v.Libvirt.Domain = v.Name
			}
		case v.QMP == "":
			return c.fail(f+".qmp", "missing: the VM's QMP unix socket, e.g. `qmp: /run/qemu/%s.qmp`, or for a libvirt domain `libvirt: {domain: %s}`", v.Name, v.Name)
		}
		v.QMP, v.NBDSocket, v.Agent = abs(v.QMP), abs(v.NBDSocket), abs(v.Agent)
		if v.Libvirt == nil {
			own := v.NBDSocket
			if own == "" {
				own = protect.NBDSocketPath(filepath.Join(c.StateDir, "protect", v.Name))
			}
			if len(own) > maxUnixPath {
				return c.fail(f+".nbd_socket", "the VM's NBD socket would be %s, %d bytes, and a unix socket's path holds at most %d: set `nbd_socket:` to a shorter path (e.g. /run/lifeboat/%s.nbd), or use a shorter state_dir", own, len(own), maxUnixPath, v.Name)
			}
		}
		if v.Peer == "" && len(c.Peers) == 1 {
			v.Peer = c.Peers[0].Name
		}
		if !peers[v.Peer] {
			return c.fail(f+".peer", "%q is not one of `peers:`; name the recovery site this VM replicates to", v.Peer)
		}
		if v.Interval < 0 {
			return c.fail(f+".interval", "must not be negative (0 = only on `lifeboat sync`)")
		}
		if v.RPOTarget < 0 {
			return c.fail(f+".rpo_target", "must not be negative")
		}
		if v.RPOTarget == 0 {
			v.RPOTarget = 3 * v.Interval
		}
		cons, err := lifeboat.ParseConsistency(v.Consistency)
		if err != nil {
			return c.fail(f+".consistency", "%v", err)
		}
		if cons != lifeboat.Crash && v.Agent == "" && v.Libvirt == nil {
			return c.fail(f+".agent", "consistency %q needs the guest agent's socket, e.g. `agent: /run/qemu/%s.qga`", cons, v.Name)
		}
		v.Consistency = string(cons)
		switch v.OnQuiesceFailure {
		case "":
			v.OnQuiesceFailure = "crash"
		case "crash", "fail":
		default:
			return c.fail(f+".on_quiesce_failure", "%q: use crash (fall back to a crash-consistent point) or fail (fail the cycle)", v.OnQuiesceFailure)
		}
		if (len(v.PreFreeze) > 0 || len(v.PostThaw) > 0) && cons != lifeboat.Application {
			return c.fail(f+".pre_freeze", "hooks run only with `consistency: application`")
		}
		if (len(v.PreFreeze) > 0 || len(v.PostThaw) > 0) && v.Libvirt != nil {
			return c.fail(f+".pre_freeze", "hooks run through the agent's guest-exec, which libvirt offers only through its pass-through (it taints the domain): put them in the guest's fsfreeze-hook directory (/etc/qemu/fsfreeze-hook.d), which libvirt's freeze runs")
		}
		if v.FreezeLimit < 0 {
			return c.fail(f+".freeze_limit", "must not be negative")
		}
		if v.HookTimeout < 0 {
			return c.fail(f+".hook_timeout", "must not be negative")
		}
		switch {
		case len(v.Start) > 0 && v.Libvirt != nil:
			return c.fail(f+".start", "a libvirt domain is started through libvirtd: drop start:")
		case len(v.Start) > 0 && v.Start[0] == "":
			return c.fail(f+".start", "the command's first word is empty: give the program and its arguments, e.g. `start: [systemctl, start, qemu@%s]`", v.Name)
		}
		if v.Definition != nil {
			if field, msg := v.Definition.check(v.Disks); field != "" {
				return c.fail(f+".definition."+field, "%s", msg)
			}
		}
		for j := range i {
			if why := sameDisks(&c.VMs[j], v); why != "" {
				return c.fail(f, "vm %q and vm %q (vms[%d]) are %s, replicated to the same site %q: each would take the other's change tracking for its own and resync every cycle; protect it once (list its disks under one entry), or send the other to another peer", v.Name, c.VMs[j].Name, j, why, v.Peer)
			}
		}
	}
	inGroup := map[string]string{}
	for i := range c.Groups {
		g := &c.Groups[i]
		f := fmt.Sprintf("groups[%d]", i)
		if !nameRE.MatchString(g.Name) || vms[g.Name] {
			return c.fail(f+".name", "%q is not a usable group name (letters, digits, '.', '_' or '-', and not a VM's name)", g.Name)
		}
		if len(g.VMs) < 2 {
			return c.fail(f+".vms", "a group needs at least two VMs, e.g. `vms: [web1, db1]`")
		}
		peer := ""
		for _, name := range g.VMs {
			v, ok := c.vm(name)
			if !ok {
				return c.fail(f+".vms", "%q is not one of `vms:`", name)
			}
			if other, ok := inGroup[name]; ok {
				return c.fail(f+".vms", "vm %q is already in group %q: a VM belongs to one group at most", name, other)
			}
			inGroup[name] = g.Name
			if v.Interval != 0 {
				return c.fail(f+".vms", "vm %q has its own interval: a group's VMs are synced together, set `interval:` on the group instead", name)
			}
			if peer != "" && v.Peer != peer {
				return c.fail(f+".vms", "vm %q replicates to %q, others to %q: a group's VMs share one recovery site", name, v.Peer, peer)
			}
			peer = v.Peer
		}
		if g.Interval < 0 {
			return c.fail(f+".interval", "must not be negative")
		}
		// Members have no interval of their own: their RPO target comes from
		// the group's, so that status and metrics say when the group is behind.
		for j := range c.VMs {
			if v := &c.VMs[j]; inGroup[v.Name] == g.Name && v.RPOTarget == 0 {
				v.RPOTarget = 3 * g.Interval
			}
		}
	}
	return nil
}

func (c *Config) vm(name string) (VMConfig, bool) {
	for _, v := range c.VMs {
		if v.Name == name {
			return v, true
		}
	}
	return VMConfig{}, false
}

// Peer returns the named peer's config.
func (c *Config) Peer(name string) (PeerConfig, bool) {
	for _, p := range c.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return PeerConfig{}, false
}

// sameDisks says how two VM entries of the config protect the same disks to
// the same recovery site, or "" when they do not: the same libvirt domain,
// or the same QMP socket with a disk in common (no `disks:` is every disk).
func sameDisks(a, b *VMConfig) string {
	if a.Peer != b.Peer {
		return ""
	}
	if a.Libvirt != nil || b.Libvirt != nil {
		if a.Libvirt != nil && b.Libvirt != nil && a.Libvirt.URI == b.Libvirt.URI && a.Libvirt.Domain == b.Libvirt.Domain {
			return fmt.Sprintf("the same libvirt domain %q", a.Libvirt.Domain)
		}
		return ""
	}
	if a.QMP != b.QMP {
		return ""
	}
	if len(a.Disks) == 0 || len(b.Disks) == 0 {
		return fmt.Sprintf("the same VM (QMP %s, and one of them takes every disk)", a.QMP)
	}
	for _, d := range a.Disks {
		if slices.Contains(b.Disks, d) {
			return fmt.Sprintf("the same disk %q (QMP %s)", d, a.QMP)
		}
	}
	return ""
}

// maxUnixPath is the longest path a unix socket can be bound to on Linux
// (sun_path holds 108 bytes with the terminating NUL).
const maxUnixPath = 107

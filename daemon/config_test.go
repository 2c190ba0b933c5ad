package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/pki"
)

const goodConfig = `site: prod
state_dir: /var/lib/lifeboat
tls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}
peers:
  - {name: dr, address: "dr.example.net:7420"}
vms:
  - {name: web1, qmp: /run/web1.qmp, interval: 30s}
`

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "site.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfig(t *testing.T) {
	p := writeConfig(t, goodConfig)
	c, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.VMs[0].Peer != "dr" || c.Keep != 24 || c.Peers[0].Compression != "zstd" {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if want := filepath.Join(filepath.Dir(p), "pki/ca.crt"); c.TLS.CA != want {
		t.Fatalf("tls.ca = %q, want it relative to the config: %q", c.TLS.CA, want)
	}
	if c.API != "/var/lib/lifeboat/api.sock" {
		t.Fatalf("api socket %q", c.API)
	}
}

// A recovery plan as the config writes it and the manager runs it.
func TestPlanConfig(t *testing.T) {
	body := strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + `plans:
  - name: web-tier
    steps:
      - {vms: [db1], timeout: 2m}
      - {vms: [app1, app2], wait: 30s}
      - {vms: [lb1], wait: none}
    hooks: [/usr/local/bin/reip]
`
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	pc, ok := c.Plan("web-tier")
	if !ok {
		t.Fatal("plan web-tier not found")
	}
	p := pc.plan()
	if len(p.Steps) != 3 || !p.Steps[0].WaitAgent || p.Steps[0].Timeout != 2*time.Minute ||
		p.Steps[1].WaitAgent || p.Steps[1].Delay != 30*time.Second || len(p.Steps[1].VMs) != 2 ||
		p.Steps[2].WaitAgent || p.Steps[2].Delay != 0 || len(p.Hooks) != 1 {
		t.Errorf("plan %+v", p)
	}
}

// A VM's definition: what the config says of how to start the VM elsewhere.
func TestDefinitionConfig(t *testing.T) {
	body := goodConfig + `  - name: db1
    qmp: /run/db1-storage.qmp
    definition:
      machine: pc-q35-7.2
      cpus: 4
      memory_mib: 8192
      kernel: /boot/vmlinuz
      disks: [{name: vda, device: virtio-blk-pci, serial: DB-OS, boot_index: 1}]
      nics: [{model: virtio-net-pci, mac: "52:54:00:12:34:56", network: prod-lan}]
`
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	d := c.VMs[1].definition()
	if d.Source != "config" || d.Machine != "pc-q35-7.2" || d.CPUs != 4 || d.MemoryMiB != 8192 || d.Kernel != "/boot/vmlinuz" ||
		len(d.Disks) != 1 || d.Disks[0] != (lifeboat.DefinitionDisk{Name: "vda", Device: "virtio-blk-pci", Serial: "DB-OS", BootIndex: 1}) ||
		len(d.NICs) != 1 || d.NICs[0] != (lifeboat.DefinitionNIC{Model: "virtio-net-pci", MAC: "52:54:00:12:34:56", Network: "prod-lan"}) {
		t.Errorf("definition %+v", d)
	}
	if d := c.VMs[0].definition(); !d.Empty() {
		t.Errorf("web1 has no definition: %+v", d)
	}
}

// A libvirt domain needs no socket: its domain name defaults to the VM's,
// and a quiesced point needs no agent socket (libvirt owns the agent).
// Two entries may share a VM when their disks or their recovery sites differ.
func TestSharedVMConfig(t *testing.T) {
	body := strings.Replace(goodConfig, `  - {name: dr, address: "dr.example.net:7420"}`, `  - {name: dr, address: "dr.example.net:7420"}
  - {name: dr2, address: "dr2.example.net:7420"}`, 1) +
		"  - {name: web1-far, qmp: /run/web1.qmp, peer: dr2}\n" +
		"  - {name: a, qmp: /q, disks: [vda], peer: dr}\n  - {name: b, qmp: /q, disks: [vdb], peer: dr}\n" +
		"  - {name: d1, libvirt: {domain: d}, peer: dr}\n  - {name: d2, libvirt: {domain: d}, peer: dr2}\n"
	body = strings.Replace(body, "interval: 30s}", "interval: 30s, peer: dr}", 1)
	if _, err := LoadConfig(writeConfig(t, body)); err != nil {
		t.Fatal(err)
	}
}

func TestLibvirtConfig(t *testing.T) {
	body := goodConfig + "  - {name: db1, libvirt: {}, consistency: filesystem}\n  - {name: web2, libvirt: {uri: 'qemu+ssh://h/system', domain: w2}}\n"
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if l := c.VMs[1].Libvirt; l == nil || l.URI != "qemu:///system" || l.Domain != "db1" {
		t.Errorf("db1's libvirt: %+v, want qemu:///system and domain db1", l)
	}
	if l := c.VMs[2].Libvirt; l.URI != "qemu+ssh://h/system" || l.Domain != "w2" {
		t.Errorf("web2's libvirt: %+v", l)
	}
}

// Config errors name the file, the field and the fix.
func TestGroupConfig(t *testing.T) {
	body := strings.Replace(goodConfig, ", interval: 30s", "", 1) + "  - {name: db1, qmp: /db.qmp}\ngroups:\n  - {name: shop, vms: [web1, db1], interval: 1m}\n"
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Groups) != 1 || len(c.Groups[0].VMs) != 2 {
		t.Fatalf("groups: %+v", c.Groups)
	}
	// libvirt domains may be members, alone or beside QMP VMs (refused
	// before: "not built yet").
	body = strings.Replace(goodConfig, ", interval: 30s", "", 1) + "  - {name: db1, libvirt: {}}\n  - {name: app1, libvirt: {domain: app}}\n" +
		"groups:\n  - {name: shop, vms: [web1, db1]}\n  - {name: back, vms: [app1, db2]}\n"
	body = strings.Replace(body, "groups:", "  - {name: db2, libvirt: {}}\ngroups:", 1)
	if c, err = LoadConfig(writeConfig(t, body)); err != nil {
		t.Fatalf("groups of libvirt domains: %v", err)
	}
	if len(c.Groups) != 2 || c.Groups[1].VMs[0] != "app1" {
		t.Fatalf("groups: %+v", c.Groups)
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct {
		name, body string
		want       []string
	}{
		{"missing site", strings.Replace(goodConfig, "site: prod", "site: ''", 1), []string{"site:", "e.g."}},
		{"no state dir", strings.Replace(goodConfig, "state_dir: /var/lib/lifeboat", "", 1), []string{"state_dir", "missing"}},
		{"no tls", strings.Replace(goodConfig, "tls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}", "", 1), []string{"tls", "lifeboat cert"}},
		{"unknown field", goodConfig + "colour: blue\n", []string{"colour"}},
		{"plans at a protected site", goodConfig + "plans: [{name: p1, steps: [{vms: [web1]}]}]\n", []string{"plans", "listen:"}},
		{"plan with a VM twice", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "plans: [{name: p1, steps: [{vms: [db1]}, {vms: [db1, web1]}]}]\n", []string{"plans[0].steps[1].vms", "already in step 1"}},
		{"plan with a bad wait", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "plans: [{name: p1, steps: [{vms: [db1], wait: forever}]}]\n", []string{"plans[0].steps[0].wait", "30s"}},
		{"networks at a protected site", goodConfig + "networks: {prod-lan: br0}\n", []string{"networks", "listen:"}},
		{"overrides at a protected site", goodConfig + "overrides: {web1: {cpus: 4}}\n", []string{"overrides", "listen:", "definition:"}},
		{"override of nothing", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "overrides: {web1: {}}\n", []string{"overrides.web1", "cpus:"}},
		{"negative override", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "overrides: {web1: {memory_mib: -1}}\n", []string{"overrides.web1.memory_mib"}},
		{"commit_after at a protected site", goodConfig + "commit_after: 60m\n", []string{"commit_after", "listen:"}},
		{"libvirt at a protected site", goodConfig + "libvirt: qemu:///system\n", []string{"libvirt", "listen:", "domain:"}},
		{"libvirt not a URI", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "libvirt: system\n", []string{"libvirt", "URI"}},
		{"libvirt network without libvirt", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "networks: {lan: 'network:default'}\n", []string{"networks.lan", "libvirt: qemu:///system"}},
		{"network on no bridge", strings.Replace(goodConfig, "site: prod", "site: prod\nlisten: 127.0.0.1:7420", 1) + "networks: {prod-lan: 'br 0'}\n", []string{"networks.prod-lan", "bridge"}},
		{"definition of another disk", goodConfig + "  - {name: db1, qmp: /q, disks: [vda], definition: {disks: [{name: vdz}]}}\n", []string{"vms[1] (db1).definition.disks[0].name", "vdz", "vda"}},
		{"definition with a bad MAC", goodConfig + "  - {name: db1, qmp: /q, definition: {nics: [{mac: 52-54}]}}\n", []string{"definition.nics[0].mac", "52:54:00:12:34:56"}},
		{"definition with negative memory", goodConfig + "  - {name: db1, qmp: /q, definition: {memory_mib: -1}}\n", []string{"definition.memory_mib", "negative"}},
		{"bad interval", strings.Replace(goodConfig, "interval: 30s", "interval: often", 1), []string{"often", "30s"}},
		{"vm without qmp", strings.Replace(goodConfig, "qmp: /run/web1.qmp, ", "", 1), []string{"vms[0] (web1).qmp", "missing"}},
		{"unknown peer", strings.Replace(goodConfig, "interval: 30s", "interval: 30s, peer: nowhere", 1), []string{"vms[0] (web1).peer", "nowhere"}},
		{"bad compression", strings.Replace(goodConfig, `address: "dr.example.net:7420"`, `address: "dr.example.net:7420", compression: lz4`, 1), []string{"peers[0].compression", "lz4", "zstd"}},
		{"bad consistency", strings.Replace(goodConfig, "interval: 30s", "interval: 30s, consistency: perfect", 1), []string{"consistency", "perfect", "filesystem"}},
		{"quiesce without agent", strings.Replace(goodConfig, "interval: 30s", "interval: 30s, consistency: filesystem", 1), []string{"agent", "guest agent"}},
		{"duplicate vm", goodConfig + "  - {name: web1, qmp: /x}\n", []string{"appears twice"}},
		{"one libvirt domain twice", goodConfig + "  - {name: db1, libvirt: {}}\n  - {name: db2, libvirt: {domain: db1}}\n", []string{"vms[2] (db2)", "same libvirt domain \"db1\"", "site \"dr\""}},
		{"one VM's disks twice", goodConfig + "  - {name: db1, qmp: /run/web1.qmp, disks: [vdb]}\n", []string{"vms[1] (db1)", "vm \"web1\"", "every disk"}},
		{"one disk twice", goodConfig + "  - {name: db1, qmp: /q, disks: [vda, vdb]}\n  - {name: db2, qmp: /q, disks: [vdb]}\n", []string{"vms[2] (db2)", "same disk \"vdb\""}},
		{"libvirt with qmp", goodConfig + "  - {name: db1, qmp: /x, libvirt: {domain: db1}}\n", []string{"vms[1] (db1).libvirt", "drop qmp:"}},
		{"libvirt with hooks", goodConfig + "  - {name: db1, libvirt: {}, consistency: application, pre_freeze: [x]}\n", []string{"pre_freeze", "fsfreeze-hook"}},
		{"libvirt with start", goodConfig + "  - {name: db1, libvirt: {}, start: [virsh, start, db1]}\n", []string{"vms[1] (db1).start", "libvirtd"}},
		{"start without a program", goodConfig + "  - {name: db1, qmp: /db.qmp, start: [\"\", x]}\n", []string{"vms[1] (db1).start", "first word is empty"}},
		{"bad vm name", strings.Replace(goodConfig, "name: web1", "name: ../web1", 1), []string{"not a VM name"}},
		{"nbd socket path too long", strings.Replace(goodConfig, "state_dir: /var/lib/lifeboat", "state_dir: /var/lib/"+strings.Repeat("l", 80), 1), []string{"vms[0] (web1).nbd_socket", "lifeboat-nbd.sock", "at most 107", "nbd_socket:"}},
		{"nbd_socket too long", strings.Replace(goodConfig, "qmp: /run/web1.qmp, ", "qmp: /run/web1.qmp, nbd_socket: /run/"+strings.Repeat("n", 110)+", ", 1), []string{"vms[0] (web1).nbd_socket", "at most 107"}},
		{"group of one", goodConfig + "groups:\n  - {name: g, vms: [web1]}\n", []string{"groups[0].vms", "at least two"}},
		{"group with unknown vm", goodConfig + "  - {name: db1, qmp: /db.qmp}\ngroups:\n  - {name: g, vms: [db1, nope]}\n", []string{"groups[0].vms", "nope"}},
		{"group member with interval", goodConfig + "  - {name: db1, qmp: /db.qmp}\ngroups:\n  - {name: g, vms: [web1, db1]}\n", []string{"own interval", "on the group"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.body)
			_, err := LoadConfig(p)
			if err == nil {
				t.Fatal("bad config accepted")
			}
			msg := err.Error()
			for _, w := range append(tc.want, p) {
				if !strings.Contains(msg, w) {
					t.Fatalf("error %q does not mention %q", msg, w)
				}
			}
		})
	}
	if _, err := LoadConfig("/nonexistent/site.yaml"); err == nil || !strings.Contains(err.Error(), "site.example.yaml") {
		t.Fatalf("missing file: %v", err)
	}
}

// The commented example in the repository is a valid config.
func TestExampleConfigLoads(t *testing.T) {
	c, err := LoadConfig("../site.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.VMs[0].RPOTarget != Duration(90*time.Second) {
		t.Fatalf("rpo_target default: %v", time.Duration(c.VMs[0].RPOTarget))
	}
}

// A consistency group's members have no interval of their own (the config
// refuses one), so the rpo_target default, 3 × interval, gave them none: a
// group whose cycles failed for hours never showed as behind, in status or
// metrics, while a lone VM with the same interval did. Members now take the
// group's interval for their target and show it.
func TestGroupMembersFallBehind(t *testing.T) {
	body := strings.Replace(goodConfig, ", interval: 30s", "", 1) +
		"  - {name: db1, qmp: /db.qmp}\n  - {name: solo, qmp: /solo.qmp, interval: 1m}\n" +
		"groups:\n  - {name: shop, vms: [web1, db1], interval: 1m}\n"
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	d := New(c, nil)
	hourOld := &lifeboat.Point{ID: 7, Instant: time.Now().Add(-time.Hour)}
	for _, name := range []string{"solo", "web1", "db1"} {
		v, _ := d.vmOf(name)
		v.last = hourOld
		s := v.status(time.Now())
		if !s.Behind || s.RPOTarget != 180 || s.Interval != "1m0s" {
			t.Errorf("vm %s (group %q): last point an hour old under an interval of 1m: behind %v, rpo_target_seconds %v, interval %q; want behind, 180, 1m0s",
				name, s.Group, s.Behind, s.RPOTarget, s.Interval)
		}
	}
}

// A negative hook_timeout is reported under its own name.
func TestNegativeHookTimeoutNamesItsField(t *testing.T) {
	body := strings.Replace(goodConfig, "interval: 30s", "interval: 30s, consistency: application, agent: /a.sock, hook_timeout: -5s", 1)
	if _, err := LoadConfig(writeConfig(t, body)); err == nil || !strings.Contains(err.Error(), ".hook_timeout") {
		t.Fatalf("a negative hook_timeout: %v, want an error naming hook_timeout", err)
	}
}

// configWithCA is goodConfig loaded, and a test CA in dir to issue its
// site certificates from.
func configWithCA(t *testing.T) (dir string, c *Config) {
	t.Helper()
	dir = t.TempDir()
	if err := pki.CreateCA(dir, "test CA", 1000*24*time.Hour); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	return dir, c
}

// siteWithCA is configWithCA with the site's certificate (and those of
// others) issued into the CA's directory, the config's tls: pointing at it
// and a state_dir of its own.
func siteWithCA(t *testing.T, others ...string) (dir string, c *Config, f pki.Files) {
	t.Helper()
	dir, c = configWithCA(t)
	for _, s := range append([]string{c.Site}, others...) {
		if err := pki.IssueSite(dir, dir, s, []string{"127.0.0.1"}, 365*24*time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	f = pki.SiteFiles(dir, c.Site)
	c.TLS = TLSConfig{CA: f.CA, Cert: f.Cert, Key: f.Key}
	c.StateDir = t.TempDir()
	return dir, c, f
}

// When the site certificate ends, every peer refuses the site and replication
// stops; status says so 30 days ahead, with what to do, and not before.
func TestStatusWarnsOfTheCertificatesEnd(t *testing.T) {
	dir, c := configWithCA(t)
	for _, tc := range []struct {
		days int
		warn bool
	}{{365, false}, {10, true}} {
		out := filepath.Join(dir, fmt.Sprint(tc.days))
		if err := pki.IssueSite(dir, out, c.Site, []string{"127.0.0.1"}, time.Duration(tc.days)*24*time.Hour); err != nil {
			t.Fatal(err)
		}
		c.TLS.Cert = pki.SiteFiles(out, c.Site).Cert
		s := New(c, nil).certificateStatus(time.Now())
		if s == nil || (s.Warning != "") != tc.warn || s.DaysLeft < float64(tc.days)-1 || s.DaysLeft > float64(tc.days)+1 {
			t.Errorf("a certificate valid %d days: %+v; want days_left ~%d, warning %v", tc.days, s, tc.days, tc.warn)
		}
		if tc.warn && !strings.Contains(s.Warning, "lifeboat cert site "+c.Site) {
			t.Errorf("the warning %q does not say what to do", s.Warning)
		}
	}
}

// A site whose certificate names another site is refused at start, naming
// both: before, only its peers noticed, each in its own words.
func TestSiteWithAnotherSitesCertificateDoesNotStart(t *testing.T) {
	dir, c := configWithCA(t)
	if err := pki.IssueSite(dir, dir, "elsewhere", []string{"127.0.0.1"}, 365*24*time.Hour); err != nil {
		t.Fatal(err)
	}
	c.TLS.Cert = pki.SiteFiles(dir, "elsewhere").Cert
	c.StateDir = t.TempDir()
	err := New(c, nil).Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), `is site "elsewhere"'s`) || !strings.Contains(err.Error(), fmt.Sprintf("%q", c.Site)) {
		t.Fatalf("a site started with another site's certificate: %v", err)
	}
}

// A revocation list that does not read stops the site's start, naming the
// file and what to do: served anyway, a revoked peer would be served. So
// does a `crl:` named but missing; ca.crl absent beside ca.crt is no list yet.
func TestUnreadableRevocationListStopsTheStart(t *testing.T) {
	dir, c, f := siteWithCA(t)
	d := New(c, nil)
	if _, err := d.revocations(); err != nil {
		t.Fatalf("no ca.crl beside ca.crt yet: %v, want no list and no error", err)
	}
	if err := os.WriteFile(f.CRL, []byte("-----BEGIN X509 CRL-----\nnot one\n-----END X509 CRL-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := d.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), f.CRL) || !strings.Contains(err.Error(), "copy ca.crl again") || !strings.Contains(err.Error(), "does not start") {
		t.Errorf("a site started with a malformed revocation list: %v, want an error naming %s and what to do", err, f.CRL)
	}
	c.TLS.CRL = filepath.Join(dir, "elsewhere.crl")
	if err := New(c, nil).Run(context.Background()); err == nil || !strings.Contains(err.Error(), "crl") || !strings.Contains(err.Error(), c.TLS.CRL) {
		t.Errorf("a site whose `crl:` names a missing file: %v, want an error naming it", err)
	}
}

// A site remembers in its state_dir the highest revocation list number it
// accepted: a site started again (a new Daemon on the same state_dir) with
// an older list, validly signed, in place of the newest (which would
// un-revoke what was revoked since), or with the list gone, does not start,
// naming the file and what to do. The newest list put back starts it.
func TestOlderRevocationListStopsTheStart(t *testing.T) {
	dir, c, f := siteWithCA(t, "peer", "retired")
	if _, _, err := pki.Revoke(dir, pki.SiteFiles(dir, "retired").Cert); err != nil {
		t.Fatal(err)
	}
	older, err := os.ReadFile(f.CRL)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := pki.Revoke(dir, pki.SiteFiles(dir, "peer").Cert); err != nil {
		t.Fatal(err)
	}
	newest, _ := os.ReadFile(f.CRL)
	peer, err := pki.LoadCert(pki.SiteFiles(dir, "peer").Cert)
	if err != nil {
		t.Fatal(err)
	}
	rev, err := New(c, nil).revocations()
	if err != nil {
		t.Fatal(err)
	}
	if err := rev.Check(peer); !errors.Is(err, pki.ErrRevoked) {
		t.Fatalf("newest list: %v, want peer revoked", err)
	}

	os.WriteFile(f.CRL, older, 0o644)
	_, err = New(c, nil).revocations()
	t.Logf("older list: %v", err)
	if err == nil || !strings.Contains(err.Error(), f.CRL) || !strings.Contains(err.Error(), "older") {
		t.Errorf("a site started again with an older revocation list: %v, want the start refused, naming %s", err, f.CRL)
	}
	os.Remove(f.CRL)
	_, err = New(c, nil).revocations()
	t.Logf("no list: %v", err)
	if err == nil || !strings.Contains(err.Error(), f.CRL) || !strings.Contains(err.Error(), "accepted number 2") {
		t.Errorf("a site started again without the revocation list it had accepted: %v, want the start refused, naming %s", err, f.CRL)
	}
	os.WriteFile(f.CRL, newest, 0o644)
	rev, err = New(c, nil).revocations()
	if err != nil {
		t.Fatalf("newest list back: %v", err)
	}
	if err := rev.Check(peer); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("newest list back: %v, want peer revoked", err)
	}
}

// A revocation list's next update: status says so 30 days ahead, and once
// it has passed, with what to do (`lifeboat cert crl`), and that the list is
// still enforced; not before. A list that is refused says so too.
func TestStatusWarnsOfTheRevocationListsNextUpdate(t *testing.T) {
	dir, c, f := siteWithCA(t)
	rev, err := New(c, nil).revocations()
	if err != nil {
		t.Fatal(err)
	}
	if s := revocationListStatus(rev, time.Now()); s != nil {
		t.Errorf("no list yet: %+v, want none", s)
	}
	now := time.Now()
	for _, tc := range []struct {
		name string
		days int           // the list's validity
		at   time.Duration // when status is asked, from now
		warn []string
	}{
		{name: "a year ahead", days: 365},
		{name: "10 days ahead", days: 10, warn: []string{"due on", "in 10 days", "lifeboat cert crl"}},
		{name: "past", days: 10, at: 11 * 24 * time.Hour, warn: []string{"was due on", "lifeboat cert crl", "goes on enforcing it"}},
	} {
		rl, err := pki.RenewCRL(dir, time.Duration(tc.days)*24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		s := revocationListStatus(rev, now.Add(tc.at))
		t.Logf("%s: %+v", tc.name, s)
		if s == nil || s.File != f.CRL || s.Number != rl.Number.String() || !s.NextUpdate.Equal(rl.NextUpdate.UTC()) || (s.Warning != "") != (len(tc.warn) > 0) {
			t.Errorf("%s: status %+v; want list %s number %s, next update %s, a warning: %v", tc.name, s, f.CRL, rl.Number, rl.NextUpdate, len(tc.warn) > 0)
			continue
		}
		for _, w := range tc.warn {
			if !strings.Contains(s.Warning, w) {
				t.Errorf("%s: warning %q does not say %q", tc.name, s.Warning, w)
			}
		}
	}
	os.WriteFile(f.CRL, []byte("half a cop"), 0o644)
	if s := revocationListStatus(rev, now); s == nil || !strings.Contains(s.Warning, "every peer is refused") {
		t.Errorf("a list that does not read: status %+v, want a warning that every peer is refused", s)
	}
}

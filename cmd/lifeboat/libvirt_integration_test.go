package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
)

// A libvirt domain protected as the README says: three config lines, no
// socket, `lifeboat serve` as root with QEMU as libvirt-qemu; file-system-
// consistent points, status, export of its one disk and verify.
func TestLibvirtDomainFromConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a libvirt domain under TCG: covered by the full (non -short) run")
	}
	dom := testlibvirt.Boot(t, testlibvirt.Options{Workload: testguest.FsyncWriter})
	dir := shortDir(t)
	// Like /var/lib: the parent of state_dir lets everyone pass.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	makePKI(t, dir)
	addr := freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n", dir, addr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	os.WriteFile(prodCfg, []byte(fmt.Sprintf(`site: prod
state_dir: %s/prod
tls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}
peers:
  - {name: dr, address: "%s"}
vms:
  - name: web1
    libvirt: {domain: %s}
    consistency: filesystem
`, dir, addr, dom.Name)), 0o600)
	startSite(t, "dr", drCfg)
	prod := startSite(t, "prod", prodCfg)

	dom.WaitWriterFiles(time.Minute) // else the points may hold no file to check
	run(t, "sync", "web1", "-c", prodCfg)
	run(t, "sync", "web1", "-c", prodCfg)
	var pts []lifeboat.Point
	if err := json.Unmarshal([]byte(run(t, "points", "web1", "--json", "-c", drCfg)), &pts); err != nil {
		t.Fatal(err)
	}
	if len(pts) != 2 {
		t.Fatalf("%d points, want 2", len(pts))
	}
	for _, p := range pts {
		if p.Consistency != lifeboat.Filesystem || len(p.Disks) != 1 || p.Disks[0].Name != "vda" {
			t.Errorf("point %d: %s, disks %+v; want filesystem, one disk vda", p.ID, p.Consistency, p.Disks)
		}
	}
	if pts[1].Disks[0].Resync {
		t.Errorf("the second point was sent whole")
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "web1") {
		t.Errorf("status does not show web1:\n%s", st)
	}
	out := filepath.Join(dir, "web1.raw")
	run(t, "export", "web1", "-o", out, "-c", drCfg)
	if c := testguest.CheckFS(t, out); c.NeedsRecovery || !c.FsckClean || c.Bad > 0 || c.Files == 0 {
		t.Errorf("exported latest point: %+v, want a clean file system with whole files", c)
	}
	run(t, "verify", "web1", "-c", drCfg)
	if b, _ := os.ReadFile(prod.log); strings.Contains(string(b), "level=ERROR") {
		t.Errorf("the protected site logged errors:\n%s", b)
	}
}

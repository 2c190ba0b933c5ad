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
// consistent points, status, export of its one disk and verify. It shares
// a consistency group with a second domain: `lifeboat sync GROUP` takes
// both points at one instant.
func TestLibvirtDomainFromConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a libvirt domain under TCG: covered by the full (non -short) run")
	}
	dom := testlibvirt.Boot(t, testlibvirt.Options{Workload: testguest.FsyncWriter})
	db := testlibvirt.Boot(t, testlibvirt.Options{Workload: testguest.FsyncWriter})
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
  - name: db1
    libvirt: {domain: %s}
    consistency: filesystem
groups:
  - {name: shop, vms: [web1, db1], interval: 1h}
`, dir, addr, dom.Name, db.Name)), 0o600)
	startSite(t, "dr", drCfg)
	prod := startSite(t, "prod", prodCfg)

	dom.WaitWriterFiles(time.Minute) // else the points may hold no file to check
	db.WaitWriterFiles(time.Minute)
	run(t, "sync", "shop", "-c", prodCfg)
	run(t, "sync", "shop", "-c", prodCfg)
	var pts, dbPts []lifeboat.Point
	if err := json.Unmarshal([]byte(run(t, "points", "web1", "--json", "-c", drCfg)), &pts); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(run(t, "points", "db1", "--json", "-c", drCfg)), &dbPts); err != nil {
		t.Fatal(err)
	}
	// The group's schedule takes a point as the site starts, then the syncs.
	if len(pts) < 2 || len(pts) != len(dbPts) {
		t.Fatalf("web1 has %d points, db1 %d, want as many, at least 2", len(pts), len(dbPts))
	}
	pts, dbPts = pts[len(pts)-2:], dbPts[len(dbPts)-2:]
	for i, p := range append(pts, dbPts...) {
		if p.Consistency != lifeboat.Filesystem || len(p.Disks) != 1 || p.Disks[0].Name != "vda" {
			t.Errorf("point %d: %s, disks %+v; want filesystem, one disk vda", p.ID, p.Consistency, p.Disks)
		}
		if p.Group == "" || p.Group != dbPts[i%2].Group || !strings.HasPrefix(p.Group, "shop@") {
			t.Errorf("%s point %d: group %q, db1's of that cycle %q; want one shop@instant", p.VM, p.ID, p.Group, dbPts[i%2].Group)
		}
	}
	if pts[1].Disks[0].Resync || dbPts[1].Disks[0].Resync {
		t.Errorf("the second group point was sent whole")
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "web1") || !strings.Contains(st, "shop") {
		t.Errorf("status does not show web1 in group shop:\n%s", st)
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

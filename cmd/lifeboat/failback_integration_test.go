package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// `lifeboat failback` as a user runs it, against real sites and a real
// guest: production replicates, is lost (kill -9) after writing a little
// more, the VM fails over and runs at the recovery site; production, back
// and serving, takes the failback. Its disk then reads exactly as the
// recovered VM's (paused, so that nothing moves under the comparison), and
// a second failback sends nothing. Production's change tracking died with
// its QEMU here, so its own writes are found by comparing hashes; the
// failback package's tests cover its record surviving.
func TestFailbackCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Name: "fb", Workload: testguest.Counter})
	dir := shortDir(t)
	makePKI(t, dir)
	drAddr, prodAddr := freeAddr(t), freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n"+
		"peers:\n  - {name: prod, address: %q}\n", dir, drAddr, prodAddr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	// The VM lifeboat protects is the guest's storage daemon, whose disk is
	// the qcow2 image itself: production records it as the failback's target.
	// A storage daemon cannot tell how to start the guest: the config does.
	kernel, initrd := testguest.Build(t)
	os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
		"peers:\n  - {name: dr, address: %q}\nvms:\n  - name: vm1\n    qmp: %s\n    nbd_socket: %s\n"+
		"    definition: {machine: q35, cpus: 1, memory_mib: 512, kernel: %s, initrd: %s, append: \"console=ttyS0 panic=-1 lb.workload=none\", disks: [{name: vda, device: virtio-blk-pci}]}\n",
		dir, prodAddr, drAddr, g.StorageQMPSocket(), g.StorageNBDSocket(), kernel, initrd)), 0o600)
	startSite(t, "dr", drCfg)
	// Production's lifeboat ends with kill -9: the daemon over its disks that
	// it started for the failback outlives it, as after a crash, and is
	// killed after it (a restarted production site kills it first itself).
	t.Cleanup(func() { qemu.KillLeftover(context.Background(), filepath.Join(dir, "prod", "failback", "run", "vm1")) })
	prod := startSite(t, "prod", prodCfg)
	for i := 1; i <= 2; i++ {
		if err := g.SendCounter(fmt.Sprintf("line-%d", i)); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := g.WaitCounter(ctx, fmt.Sprintf("line-%d", i))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		run(t, "sync", "vm1", "-c", prodCfg)
	}

	// Production is lost: its guest and its lifeboat, kill -9; its host
	// wrote a little more into the image before it died.
	g.Kill()
	prod.kill()
	qemuIO(t, g.DiskImage(), "write -P 0x5a 3M 192k")
	out := run(t, "failover", "vm1", "--force", "-c", drCfg)
	t.Logf("lifeboat failover vm1 --force:\n%s", out)
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	rec := runs[0]
	t.Cleanup(func() { runErr(t, "failover", "vm1", "--undo", "-c", drCfg) })

	// Before production serves again, a failback is refused and says why.
	if out, err := runErr(t, "failback", "vm1", "-c", drCfg); err == nil || !strings.Contains(out, "prod") {
		t.Fatalf("a failback with production down: %v\n%s", err, out)
	}
	startSite(t, "prod", prodCfg)

	// The recovered VM is paused, so that its disk stands still for the comparison.
	pause(t, rec.QMP)
	out = run(t, "failback", "vm1", "-c", drCfg)
	t.Logf("lifeboat failback vm1:\n%s", out)
	for _, want := range []string{"production's disks hold failback point 3", "disk vda: incremental from point 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("failback's output lacks %q", want)
		}
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "failing back from dr: its disks here hold point 3") || !strings.Contains(st, "are overwritten") {
		t.Errorf("status at production during the failback:\n%s", st)
	}
	overlay := rec.Overlays["vda"]
	if cmp, err := exec.Command("qemu-img", "compare", "-U", g.DiskImage(), overlay).CombinedOutput(); err != nil {
		t.Fatalf("the production disk after the failback differs from the recovered VM's: %v\n%s", err, cmp)
	}

	out = run(t, "failback", "vm1", "--json", "-c", drCfg)
	var pt struct {
		ID    uint64 `json:"id"`
		Stats struct {
			BytesChanged int64 `json:"bytes_changed"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(out), &pt); err != nil {
		t.Fatalf("failback --json: %v\n%s", err, out)
	}
	if pt.ID != 4 || pt.Stats.BytesChanged != 0 {
		t.Errorf("a second failback of the paused VM: point %d, %d bytes changed; want point 4 and nothing\n%s", pt.ID, pt.Stats.BytesChanged, out)
	}
}

// qemuIO runs one qemu-io command on an image.
func qemuIO(t *testing.T, image, command string) {
	t.Helper()
	if out, err := exec.Command("qemu-io", "-c", command, image).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %q %s: %v\n%s", command, image, err, out)
	}
}

// pause stops a VM's CPUs through its QMP socket.
func pause(t *testing.T, socket string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := qemu.Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
}

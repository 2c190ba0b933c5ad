// Package testvm stands in for a running VM in tests: a qemu-storage-daemon
// holding the VM's disk images, with QMP, an NBD server and a writable export
// per disk, or a qemu-system as libvirt starts one (System); and another
// tool's backups beside them (Backup).
package testvm

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// DiskSpec is one disk of the test VM.
type DiskSpec struct {
	Name   string // the disk's name: its format node's name, and its NBD export's id and name
	Format string // qcow2 | raw
	Size   int64
	Compat string // qcow2 only: "" (v3) or "0.10" (v2, no persistent bitmaps)
}

// VM is a running stand-in VM.
type VM struct {
	Dir    string // images and sockets live here (short path)
	Daemon *qemu.Daemon
	Disks  []DiskSpec
}

// startTimeout bounds starting and stopping the daemon.
const startTimeout = 20 * time.Second

// Start creates the images, starts a qemu-storage-daemon with a QMP socket, an
// NBD server and a writable export per disk named after it (the "guest"
// writes through it), and stops the daemon when the test ends.
func Start(t testing.TB, disks ...DiskSpec) *VM {
	t.Helper()
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon")
	// t.TempDir() paths can outgrow the 107 bytes of a unix socket path.
	dir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	v := &VM{Dir: dir, Disks: disks}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for _, d := range disks {
		var opts []string
		if d.Compat != "" {
			opts = append(opts, "compat="+d.Compat)
		}
		if err := qemu.CreateImage(ctx, v.ImagePath(d.Name), d.Format, d.Size, "", "", opts...); err != nil {
			t.Fatalf("testvm: %v", err)
		}
	}
	v.start(t)
	t.Cleanup(func() {
		if v.Daemon == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		defer cancel()
		if err := v.Daemon.Stop(ctx); err != nil {
			t.Logf("testvm: %v", err)
		}
	})
	return v
}

func (v *VM) start(t testing.TB) {
	t.Helper()
	var args []string
	for _, d := range v.Disks {
		args = append(args, qemu.DiskArgs(d.Name, v.ImagePath(d.Name), d.Format)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: v.Dir, Args: args, NBD: true})
	if err != nil {
		t.Fatalf("testvm: %v", err)
	}
	v.Daemon = d
}

// Monitor is the daemon's QMP connection.
func (v *VM) Monitor() *qemu.Monitor { return v.Daemon.Monitor() }

// QMPSocket is the VM's QMP socket for lifeboat: a monitor of its own, since
// QMP serves one client per socket and the test holds the daemon's first one.
func (v *VM) QMPSocket() string { return v.Daemon.ClientQMPSocket() }

// NBDSocket is the daemon's NBD server socket.
func (v *VM) NBDSocket() string { return v.Daemon.NBDSocket() }

// ImagePath is the image file of a disk.
func (v *VM) ImagePath(disk string) string {
	for _, d := range v.Disks {
		if d.Name == disk {
			return filepath.Join(v.Dir, d.Name+"."+d.Format)
		}
	}
	return filepath.Join(v.Dir, disk)
}

// NBDURI is the NBD URI of a disk's writable export (or of any export on the
// daemon's server), e.g. for qemu-io -f raw or nbdinfo.
func (v *VM) NBDURI(export string) string {
	return "nbd+unix:///" + export + "?socket=" + v.NBDSocket()
}

// Restart quits the daemon cleanly (persistent bitmaps are saved) and starts
// it again on the same images.
func (v *VM) Restart(t testing.TB) {
	t.Helper()
	v.PowerOff(t)
	v.PowerOn(t)
}

// PowerOff quits the daemon cleanly (persistent bitmaps are saved); PowerOn
// starts it again on the images, which a test may have changed meanwhile.
func (v *VM) PowerOff(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := v.Daemon.Stop(ctx); err != nil {
		t.Fatalf("testvm: power off: %v", err)
	}
	v.Daemon = nil
}

// PowerOn starts a VM that PowerOff stopped.
func (v *VM) PowerOn(t testing.TB) {
	t.Helper()
	v.start(t)
}

// Kill kills the daemon with SIGKILL and leaves the VM stopped, as a host
// crash does: persistent bitmaps in use stay marked so in the images, and
// whatever opens them next finds them inconsistent.
func (v *VM) Kill(t testing.TB) {
	t.Helper()
	if err := v.Daemon.Kill(); err != nil {
		t.Fatalf("testvm: kill: %v", err)
	}
	v.Daemon = nil
}

// Crash kills the daemon with SIGKILL and starts it again: persistent bitmaps
// that were in use come back inconsistent.
func (v *VM) Crash(t testing.TB) {
	t.Helper()
	if err := v.Daemon.Kill(); err != nil {
		t.Fatalf("testvm: crash: %v", err)
	}
	v.Daemon = nil
	v.start(t)
}

package failover

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/lifeboat-dr/lifeboat"
)

// qemuIDRE is what QEMU takes as a device id.
var qemuIDRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]*$`)

// nicModel is the QEMU device for a NIC model as QEMU or libvirt names it.
func nicModel(m string) string {
	switch m {
	case "", "virtio":
		return "virtio-net-pci"
	case "e1000e", "e1000", "rtl8139", "vmxnet3":
		return m
	}
	return m
}

// optEscape doubles the commas of a value inside a -device or -chardev
// option string, as QEMU's option parser wants.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// qemuArgs is the qemu-system command line that starts a VM from def, its
// disks on overlays (by disk name), paused (-S: the caller adds the dirty
// bitmaps, then continues it), daemonized, with its QMP, agent and console
// in the run's directory. A NIC whose production network the recovery
// site's config maps to a bridge is put on it; any other NIC, and every NIC
// of a test, is on a user-mode network with no route out (restrict=on).
func qemuArgs(vm string, def *lifeboat.Definition, r *Run, networks map[string]string) ([]string, error) {
	machine := def.Machine
	if machine == "" {
		machine = "q35"
	}
	cpus := max(def.CPUs, 1)
	mem := def.MemoryMiB
	if mem <= 0 {
		mem = 1024
	}
	args := []string{
		"-name", vm + ",debug-threads=on",
		"-machine", machine,
	}
	args = append(args, accelArgs()...)
	args = append(args,
		"-cpu", "max",
		"-smp", strconv.Itoa(cpus), "-m", strconv.FormatInt(mem, 10),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-S", "-daemonize", "-pidfile", r.pidFile(),
		"-qmp", "unix:"+optEscape(r.QMP)+",server=on,wait=off",
		"-chardev", "file,id=console0,path="+optEscape(r.Console), "-serial", "chardev:console0",
		"-device", "virtio-serial-pci,id=lbserial0",
		"-chardev", "socket,id=qga0,server=on,wait=off,path="+optEscape(r.Agent),
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
	)
	if fw := biosOf(def); fw != "" {
		args = append(args, "-bios", fw)
	}
	if def.Kernel != "" {
		args = append(args, "-kernel", def.Kernel)
		if def.Initrd != "" {
			args = append(args, "-initrd", def.Initrd)
		}
		if def.Append != "" {
			args = append(args, "-append", def.Append)
		}
	}
	scsi := false
	for i, d := range r.disks {
		node := "lb-d" + strconv.Itoa(i)
		spec, err := json.Marshal(map[string]any{
			"driver": "qcow2", "node-name": node, "discard": "unmap",
			"file": map[string]any{"driver": "file", "filename": r.Overlays[d.Name]},
		})
		if err != nil {
			return nil, err
		}
		args = append(args, "-blockdev", string(spec))
		dev := d.Device
		if dev == "" {
			dev = "virtio-blk-pci"
		}
		opt := dev + ",drive=" + node
		if strings.HasPrefix(dev, "scsi-") {
			if !scsi {
				args = append(args, "-device", "virtio-scsi-pci,id=lbscsi0")
				scsi = true
			}
			opt += ",bus=lbscsi0.0"
		}
		if qemuIDRE.MatchString(d.Name) {
			opt += ",id=" + d.Name
		}
		if d.Serial != "" {
			opt += ",serial=" + optEscape(d.Serial)
		}
		if d.BootIndex > 0 {
			opt += ",bootindex=" + strconv.Itoa(d.BootIndex)
		}
		args = append(args, "-device", opt)
	}
	for i, n := range def.NICs {
		id := "lbnet" + strconv.Itoa(i)
		br := networks[n.Network]
		if r.Test || br == "" {
			args = append(args, "-netdev", "user,id="+id+",restrict=on")
		} else {
			args = append(args, "-netdev", "bridge,id="+id+",br="+optEscape(br))
		}
		opt := nicModel(n.Model) + ",netdev=" + id
		if n.MAC != "" {
			opt += ",mac=" + n.MAC
		}
		args = append(args, "-device", opt)
	}
	return args, nil
}

// networkOf says where a NIC of a run is: for status and the summary.
func networkOf(n lifeboat.DefinitionNIC, test bool, networks map[string]string) string {
	br := networks[n.Network]
	switch {
	case test:
		return "isolated (a test)"
	case br == "":
		return fmt.Sprintf("isolated (production network %q is not mapped under networks:)", n.Network)
	}
	if n, ok := strings.CutPrefix(br, "network:"); ok {
		return "libvirt network " + n
	}
	return "bridge " + br
}

// biosOf is the firmware QEMU loads with -bios: what the VM's QEMU loaded
// (its -bios, a file or a name in QEMU's data directory such as OVMF.fd), or
// the config's. A libvirt loader is a pflash image with its NVRAM, which
// -bios cannot take: such a VM gets QEMU's default, and the run's log says so.
func biosOf(def *lifeboat.Definition) string {
	if def.Firmware == "" || def.DomainXML != "" {
		return ""
	}
	return def.Firmware
}

// accelArgs choose the accelerator: KVM where this host's KVM can run an
// ordinary guest, falling back to TCG if QEMU cannot open it; TCG alone where
// it cannot. A host whose only KVM is PVM (the kvm_pvm module, without
// kvm_intel or kvm_amd: nested hosts of some clouds) opens /dev/kvm and
// creates the VM, but runs only guests built for PVM: any other guest starts
// and never executes its first instruction, with no error from QEMU.
var accelArgs = sync.OnceValue(func() []string {
	return accelFor(kvmModules("/sys/module"))
})

// pvmOnly reports whether this host's only KVM is PVM (see accelArgs).
var pvmOnly = sync.OnceValue(func() bool { return isPVMOnly(kvmModules("/sys/module")) })

func isPVMOnly(m map[string]bool) bool { return m["kvm_pvm"] && !m["kvm_intel"] && !m["kvm_amd"] }

func accelFor(m map[string]bool) []string {
	if isPVMOnly(m) {
		slog.Warn("this host's KVM is PVM only (kvm_pvm loaded, no kvm_intel or kvm_amd), which does not run ordinary guests: recovered VMs run under TCG, slowly")
		return []string{"-accel", "tcg"}
	}
	return []string{"-accel", "kvm", "-accel", "tcg"} // the first that works
}

// kvmModules are the KVM modules loaded, by name, from the sysfs dir.
func kvmModules(dir string) map[string]bool {
	out := map[string]bool{}
	for _, name := range []string{"kvm_pvm", "kvm_intel", "kvm_amd"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			out[name] = true
		}
	}
	return out
}

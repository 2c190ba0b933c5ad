package failover

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
)

// The firmware a VM's QEMU loaded (-bios) is what the recovered VM loads; a
// libvirt loader (pflash with its NVRAM) is not given to -bios.
func TestQEMUArgsFirmware(t *testing.T) {
	r := &Run{Dir: "/srv/run", QMP: "/srv/run/qmp.sock", Agent: "/srv/run/qga.sock", Console: "/srv/run/console.log"}
	for _, c := range []struct {
		def  lifeboat.Definition
		want string
	}{
		{lifeboat.Definition{Firmware: "/usr/share/ovmf/OVMF.fd"}, "/usr/share/ovmf/OVMF.fd"},
		{lifeboat.Definition{Firmware: "bios-256k.bin"}, "bios-256k.bin"},
		{lifeboat.Definition{}, ""},
		{lifeboat.Definition{Firmware: "/usr/share/OVMF/OVMF_CODE.fd", DomainXML: "<domain/>"}, ""},
	} {
		args, err := qemuArgs("web1", &c.def, r, nil)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.Index(args, "-bios")
		got := ""
		if i >= 0 {
			got = args[i+1]
		}
		if got != c.want {
			t.Errorf("firmware %q (libvirt %v): -bios %q, want %q (%s)", c.def.Firmware, c.def.DomainXML != "", got, c.want, strings.Join(args, " "))
		}
	}
}

// KVM where the host's KVM runs ordinary guests; TCG alone where its only KVM
// is PVM, which starts an ordinary guest that never runs (seen on this
// project's CI machines: /dev/kvm is there, the guest prints nothing).
func TestAccel(t *testing.T) {
	for _, c := range []struct {
		modules []string
		want    string
	}{
		{nil, "-accel kvm -accel tcg"},
		{[]string{"kvm_intel"}, "-accel kvm -accel tcg"},
		{[]string{"kvm_amd"}, "-accel kvm -accel tcg"},
		{[]string{"kvm_pvm", "kvm_intel"}, "-accel kvm -accel tcg"},
		{[]string{"kvm_pvm"}, "-accel tcg"},
	} {
		dir := t.TempDir()
		for _, m := range c.modules {
			if err := os.Mkdir(filepath.Join(dir, m), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if got := strings.Join(accelFor(kvmModules(dir)), " "); got != c.want {
			t.Errorf("modules %v: %s, want %s", c.modules, got, c.want)
		}
	}
}

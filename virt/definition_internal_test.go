package virt

import (
	"reflect"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
)

// The fields of a definition come from the domain XML as libvirt writes it:
// memory in its unit, disks by target with their bus's QEMU device, serial
// and boot order, NICs with the network or bridge they are on.
func TestDefinitionOfDomainXML(t *testing.T) {
	const doc = `<domain type='kvm'>
  <name>web1</name>
  <memory unit='GiB'>4</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader></os>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/><serial>OS-1</serial><boot order='1'/></disk>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/web1-data.qcow2'/><target dev='sdb' bus='scsi'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:dd:ee:ff'/><source bridge='br-prod'/><model type='e1000e'/></interface>
  </devices>
</domain>`
	got, err := definitionOf("web1", doc, "", []string{"vda", "sdb", "vdz"})
	if err != nil {
		t.Fatal(err)
	}
	want := lifeboat.Definition{
		Source: "libvirt", Machine: "pc-q35-7.2", CPUs: 2, MemoryMiB: 4096, Firmware: "/usr/share/OVMF/OVMF_CODE.fd",
		Disks: []lifeboat.DefinitionDisk{
			{Name: "vda", Device: "virtio-blk-pci", Serial: "OS-1", BootIndex: 1},
			{Name: "sdb", Device: "scsi-hd"},
			{Name: "vdz"},
		},
		NICs: []lifeboat.DefinitionNIC{
			{Model: "virtio", MAC: "52:54:00:aa:bb:cc", Network: "default"},
			{Model: "e1000e", MAC: "52:54:00:dd:ee:ff", Network: "br-prod"},
		},
		DomainXML: doc,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("definition\n%+v\nwant\n%+v", got, want)
	}
	if _, err := definitionOf("web1", "<domain", "", nil); err == nil {
		t.Error("a broken domain XML gave a definition")
	}
}

// A disk attached to the running domain only (`virsh attach-disk` without
// --config) is in the point but not in the inactive XML: the definition
// takes it from the live XML, without its runtime alias and address, so
// that a failover defines the domain with it; it says so in its note.
func TestDefinitionTakesALiveOnlyDisk(t *testing.T) {
	const inactive = `<domain type='qemu'><name>web1</name><memory unit='MiB'>512</memory><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>`
	const live = `<domain type='qemu' id='7'><name>web1</name><memory unit='MiB'>512</memory><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/vda.qcow2' index='1'/><backingStore/><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/vdc.qcow2' index='2'/><backingStore/><target dev='vdc' bus='virtio'/><serial>DATA-2</serial><alias name='virtio-disk2'/><address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/></disk>
</devices></domain>`
	got, err := definitionOf("web1", inactive, live, []string{"vda", "vdc"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []lifeboat.DefinitionDisk{{Name: "vda", Device: "virtio-blk-pci"}, {Name: "vdc", Device: "virtio-blk-pci", Serial: "DATA-2"}}; !reflect.DeepEqual(got.Disks, want) {
		t.Errorf("disks %+v, want %+v", got.Disks, want)
	}
	out, dropped, err := RecoveredXML(got.DomainXML, Recovered{Name: "web1", Overlays: map[string]string{"vda": "/r/vda.ov", "vdc": "/r/vdc.ov"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(dropped) != 0 || !strings.Contains(out, "/r/vdc.ov") || !strings.Contains(out, "DATA-2") {
		t.Errorf("the recovered domain (left out %q) lacks vdc:\n%s", dropped, out)
	}
	if strings.Contains(got.DomainXML, "alias") || strings.Contains(got.DomainXML, "0x07") || strings.Contains(got.DomainXML, "index=") {
		t.Errorf("the definition keeps the live disk's runtime alias, address or index:\n%s", got.DomainXML)
	}
	if !strings.Contains(got.Note, "vdc") || !strings.Contains(got.Note, "--config") {
		t.Errorf("note %q, want it to name vdc, attached without --config", got.Note)
	}
	if same, err := definitionOf("web1", inactive, live, []string{"vda"}); err != nil || same.DomainXML != inactive || same.Note != "" {
		t.Errorf("with no live-only disk protected the definition changed: %q %v", same.Note, err)
	}
}

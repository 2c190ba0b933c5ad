package virt

import (
	"reflect"
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
	got, err := definitionOf("web1", doc, []string{"vda", "sdb", "vdz"})
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
	if _, err := definitionOf("web1", "<domain", nil); err == nil {
		t.Error("a broken domain XML gave a definition")
	}
}

package virt

import (
	"slices"
	"testing"
)

// A disk's chain is read from the live XML, its active layer first: what
// tells its own images from another disk's put under its target.
func TestDiskChainOfLiveXML(t *testing.T) {
	const doc = `<domain type='qemu'><name>web1</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/vda.snap' index='3'/>
    <backingStore type='file' index='2'><format type='qcow2'/><source file='/i/vda.qcow2'/>
      <backingStore type='block' index='1'><format type='raw'/><source dev='/dev/vg/tpl'/><backingStore/></backingStore>
    </backingStore><target dev='vda' bus='virtio'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'/><target dev='vdb' bus='virtio'/></disk>
</devices></domain>`
	desc, err := parseDescription("web1", doc)
	if err != nil {
		t.Fatal(err)
	}
	if len(desc.Disks) != 2 {
		t.Fatalf("disks %+v, want vda and vdb", desc.Disks)
	}
	if got, want := desc.Disks[0].Chain, []string{"/i/vda.snap", "/i/vda.qcow2", "/dev/vg/tpl"}; !slices.Equal(got, want) {
		t.Errorf("vda's chain %q, want %q", got, want)
	}
	if got, want := desc.Disks[1].Chain, []string{"rbd:pool/img"}; !slices.Equal(got, want) {
		t.Errorf("vdb's chain %q, want %q", got, want)
	}
}

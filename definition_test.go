package lifeboat

import (
	"strings"
	"testing"
)

// What the VM tells wins; the config fills only what it left empty, disk by
// disk, and the source says both took part.
func TestDefinitionFill(t *testing.T) {
	d := Definition{Source: "qmp", Machine: "pc-q35-7.2", CPUs: 2, Disks: []DefinitionDisk{{Name: "vda", Device: "virtio-blk-pci"}}}
	d.Fill(Definition{Source: "config", Machine: "pc-i440fx-2.0", CPUs: 8, MemoryMiB: 1024,
		Disks: []DefinitionDisk{{Name: "vda", Device: "scsi-hd", Serial: "S1"}, {Name: "vdb", Device: "ide-hd"}}})
	if d.Source != "qmp+config" || d.Machine != "pc-q35-7.2" || d.CPUs != 2 || d.MemoryMiB != 1024 {
		t.Errorf("filled %+v", d)
	}
	if len(d.Disks) != 2 || d.Disks[0] != (DefinitionDisk{Name: "vda", Device: "virtio-blk-pci", Serial: "S1"}) || d.Disks[1].Name != "vdb" {
		t.Errorf("disks %+v", d.Disks)
	}
	e := Definition{Source: "qmp", CPUs: 1}
	e.Fill(Definition{Source: "config", CPUs: 4})
	if e.Source != "qmp" {
		t.Errorf("a config that added nothing is named a source: %q", e.Source)
	}
}

func TestDefinitionEncodingBounded(t *testing.T) {
	d := &Definition{Source: "libvirt", DomainXML: "<domain>" + strings.Repeat("x", MaxDefinition) + "</domain>"}
	if _, err := EncodeDefinition(d); err == nil || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("an oversized definition encoded: %v", err)
	}
	if _, err := DecodeDefinition(make([]byte, MaxDefinition+1)); err == nil {
		t.Fatal("an oversized definition decoded")
	}
	if _, err := DecodeDefinition([]byte("{not json")); err == nil || !strings.Contains(err.Error(), "vm definition") {
		t.Fatalf("garbage decoded: %v", err)
	}
	b, err := EncodeDefinition(&Definition{Source: "qmp", CPUs: 3})
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeDefinition(b)
	if err != nil || got.CPUs != 3 || got.Source != "qmp" {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	if got, err := DecodeDefinition(nil); got != nil || err != nil {
		t.Fatalf("no definition decoded as %+v %v", got, err)
	}
}

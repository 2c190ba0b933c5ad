package lifeboat

import (
	"encoding/json"
	"fmt"
)

// Definition is what it takes to start a VM somewhere else: read from the
// running VM at each cycle and stored with the point, so that a failover
// starts the VM as it was at that point (its machine type, memory, disks in
// their order with their serials, NICs with their MACs). What the VM cannot
// tell (a storage daemon's QMP socket knows no machine) comes from the VM's
// config. A libvirt domain's definition is its domain XML as well.
type Definition struct {
	// Source says where the fields came from: "qmp", "libvirt", "config",
	// or a "+"-joined mix ("qmp+config").
	Source string `json:"source"`
	// Machine is QEMU's machine type, e.g. "pc-q35-7.2".
	Machine   string `json:"machine,omitempty"`
	CPUs      int    `json:"cpus,omitempty"`
	MemoryMiB int64  `json:"memory_mib,omitempty"`
	// Firmware is the BIOS or UEFI image QEMU loaded, as QEMU names it.
	Firmware string `json:"firmware,omitempty"`
	// Kernel, Initrd and Append are a direct kernel boot's, paths as on the
	// protected host.
	Kernel string           `json:"kernel,omitempty"`
	Initrd string           `json:"initrd,omitempty"`
	Append string           `json:"append,omitempty"`
	Disks  []DefinitionDisk `json:"disks,omitempty"`
	NICs   []DefinitionNIC  `json:"nics,omitempty"`
	// DomainXML is a libvirt domain's inactive XML, as libvirt gave it.
	DomainXML string `json:"domain_xml,omitempty"`
	// Note says what could not be read, if anything.
	Note string `json:"note,omitempty"`
}

// DefinitionDisk is how one protected disk is attached to the guest.
type DefinitionDisk struct {
	// Name is the disk's name in the point.
	Name string `json:"name"`
	// Device is the QEMU device model ("virtio-blk-pci", "scsi-hd", ...).
	Device    string `json:"device,omitempty"`
	Serial    string `json:"serial,omitempty"`
	BootIndex int    `json:"boot_index,omitempty"`
}

// DefinitionNIC is one network interface of the guest.
type DefinitionNIC struct {
	ID    string `json:"id,omitempty"`
	Model string `json:"model,omitempty"`
	MAC   string `json:"mac,omitempty"`
	// Network is the production network the NIC is on (its netdev's id, or
	// libvirt's network or bridge): the recovery site's config maps it.
	Network string `json:"network,omitempty"`
}

// MaxDefinition bounds a definition's encoded size (a libvirt domain's XML
// is a few KiB; this leaves room without letting a peer make the catalog
// hold megabytes per point).
const MaxDefinition = 256 << 10

// Fill takes from o each field d does not have, and records o's source.
func (d *Definition) Fill(o Definition) {
	took := false
	fill := func(dst *string, v string) {
		if *dst == "" && v != "" {
			*dst, took = v, true
		}
	}
	fill(&d.Machine, o.Machine)
	fill(&d.Firmware, o.Firmware)
	fill(&d.Kernel, o.Kernel)
	fill(&d.Initrd, o.Initrd)
	fill(&d.Append, o.Append)
	fill(&d.DomainXML, o.DomainXML)
	if d.CPUs == 0 && o.CPUs != 0 {
		d.CPUs, took = o.CPUs, true
	}
	if d.MemoryMiB == 0 && o.MemoryMiB != 0 {
		d.MemoryMiB, took = o.MemoryMiB, true
	}
	for _, od := range o.Disks {
		i := d.disk(od.Name)
		if i < 0 {
			d.Disks, took = append(d.Disks, od), true
			continue
		}
		dd := &d.Disks[i]
		fill(&dd.Device, od.Device)
		fill(&dd.Serial, od.Serial)
		if dd.BootIndex == 0 && od.BootIndex != 0 {
			dd.BootIndex, took = od.BootIndex, true
		}
	}
	if len(d.NICs) == 0 && len(o.NICs) > 0 {
		d.NICs, took = append([]DefinitionNIC(nil), o.NICs...), true
	}
	if took && o.Source != "" {
		if d.Source == "" {
			d.Source = o.Source
		} else {
			d.Source += "+" + o.Source
		}
	}
}

func (d *Definition) disk(name string) int {
	for i, x := range d.Disks {
		if x.Name == name {
			return i
		}
	}
	return -1
}

// Empty reports whether d says nothing.
func (d Definition) Empty() bool {
	return d.Machine == "" && d.CPUs == 0 && d.MemoryMiB == 0 && d.Kernel == "" && len(d.Disks) == 0 &&
		len(d.NICs) == 0 && d.DomainXML == ""
}

// EncodeDefinition is d as it crosses the wire and sits in the catalog.
func EncodeDefinition(d *Definition) ([]byte, error) {
	if d == nil {
		return nil, nil
	}
	b, err := json.Marshal(d)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxDefinition {
		return nil, fmt.Errorf("vm definition is %d bytes, over the %d-byte limit", len(b), MaxDefinition)
	}
	return b, nil
}

// DecodeDefinition reads what EncodeDefinition wrote; nil for no definition.
func DecodeDefinition(b []byte) (*Definition, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if len(b) > MaxDefinition {
		return nil, fmt.Errorf("vm definition is %d bytes, over the %d-byte limit", len(b), MaxDefinition)
	}
	var d Definition
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("vm definition: %w", err)
	}
	return &d, nil
}

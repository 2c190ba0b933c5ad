package virt

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/lifeboat-dr/lifeboat"
)

// Definition is what it takes to define and start the domain elsewhere:
// its inactive XML (what `virsh dumpxml --inactive` prints: no runtime
// aliases, labels or ports) and the fields read from it, disks by target.
// A disk of disks that the inactive XML lacks, attached to the running
// domain only (`virsh attach-disk` without --config), is taken into it from
// the live XML (live; "" for none) without its runtime alias and address:
// a failover defines the domain from this XML, and would start it without
// a disk its point holds.
func (d *Domain) Definition(ctx context.Context, disks []string, live string) (lifeboat.Definition, error) {
	var doc string
	err := d.c.call(ctx, "inactive XML of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		doc, err = l.DomainGetXMLDesc(d.d, libvirt.DomainXMLInactive)
		return err
	})
	if err != nil {
		return lifeboat.Definition{}, err
	}
	return definitionOf(d.Name, doc, live, disks)
}

func definitionOf(name, doc, live string, disks []string) (lifeboat.Definition, error) {
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		return lifeboat.Definition{}, fmt.Errorf("libvirt domain %q: its XML does not parse: %w", name, err)
	}
	def := lifeboat.Definition{Source: "libvirt", DomainXML: doc}
	if added, err := addLiveDisks(&x, live, disks); err != nil {
		return lifeboat.Definition{}, fmt.Errorf("libvirt domain %q: %w", name, err)
	} else if len(added) > 0 {
		if def.DomainXML, err = x.Marshal(); err != nil {
			return lifeboat.Definition{}, fmt.Errorf("libvirt domain %q: its XML with disks %s: %w", name, strings.Join(added, ", "), err)
		}
		def.Note = fmt.Sprintf("disks %s are attached to the running domain only, not to its persistent definition (virsh attach-disk without --config): taken from its live XML", strings.Join(added, ", "))
	}
	if x.VCPU != nil {
		def.CPUs = int(x.VCPU.Value)
	}
	if x.Memory != nil {
		def.MemoryMiB = int64(memoryBytes(x.Memory.Value, x.Memory.Unit) >> 20)
	}
	if os := x.OS; os != nil {
		if os.Type != nil {
			def.Machine = os.Type.Machine
		}
		def.Kernel, def.Initrd, def.Append = os.Kernel, os.Initrd, os.Cmdline
		if os.Loader != nil {
			def.Firmware = os.Loader.Path
		}
	}
	if x.Devices != nil {
		byTarget := map[string]libvirtxml.DomainDisk{}
		for _, dk := range x.Devices.Disks {
			if dk.Target != nil {
				byTarget[dk.Target.Dev] = dk
			}
		}
		for _, t := range disks {
			dd := lifeboat.DefinitionDisk{Name: t}
			if dk, ok := byTarget[t]; ok {
				dd.Device = diskDevice(dk.Target.Bus)
				dd.Serial = dk.Serial
				if dk.Boot != nil {
					dd.BootIndex = int(dk.Boot.Order)
				}
			}
			def.Disks = append(def.Disks, dd)
		}
		for _, ni := range x.Devices.Interfaces {
			n := lifeboat.DefinitionNIC{}
			if ni.MAC != nil {
				n.MAC = ni.MAC.Address
			}
			if ni.Model != nil {
				n.Model = ni.Model.Type
			}
			if s := ni.Source; s != nil {
				switch {
				case s.Network != nil:
					n.Network = s.Network.Network
				case s.Bridge != nil:
					n.Network = s.Bridge.Bridge
				}
			}
			def.NICs = append(def.NICs, n)
		}
	}
	return def, nil
}

// addLiveDisks adds to domain x each disk of disks that it lacks and the
// live XML has, without what only the running domain has (its alias, its
// address, the chain libvirt found below its image), and says which.
func addLiveDisks(x *libvirtxml.Domain, live string, disks []string) ([]string, error) {
	if live == "" {
		return nil, nil
	}
	var lx libvirtxml.Domain
	if err := lx.Unmarshal(live); err != nil {
		return nil, fmt.Errorf("its live XML does not parse: %w", err)
	}
	if lx.Devices == nil {
		return nil, nil
	}
	if x.Devices == nil {
		x.Devices = &libvirtxml.DomainDeviceList{}
	}
	has := func(ds []libvirtxml.DomainDisk, t string) int {
		return slices.IndexFunc(ds, func(d libvirtxml.DomainDisk) bool { return d.Target != nil && d.Target.Dev == t })
	}
	var added []string
	for _, t := range disks {
		i := has(lx.Devices.Disks, t)
		if i < 0 || has(x.Devices.Disks, t) >= 0 {
			continue
		}
		d := lx.Devices.Disks[i]
		d.Alias, d.Address, d.BackingStore = nil, nil, nil
		if d.Source != nil && d.Source.Index != 0 {
			src := *d.Source
			src.Index = 0
			d.Source = &src
		}
		x.Devices.Disks = append(x.Devices.Disks, d)
		added = append(added, t)
	}
	return added, nil
}

// diskDevice is the QEMU device libvirt puts a disk of bus on.
func diskDevice(bus string) string {
	switch bus {
	case "virtio":
		return "virtio-blk-pci"
	case "scsi":
		return "scsi-hd"
	case "sata", "ide":
		return "ide-hd"
	case "usb":
		return "usb-storage"
	}
	return bus
}

// memoryBytes converts libvirt's memory value and unit (default KiB).
func memoryBytes(v uint, unit string) uint64 {
	m := map[string]uint64{"": 1 << 10, "b": 1, "bytes": 1, "KB": 1000, "k": 1 << 10, "KiB": 1 << 10,
		"MB": 1000 * 1000, "M": 1 << 20, "MiB": 1 << 20, "GB": 1000 * 1000 * 1000, "G": 1 << 30, "GiB": 1 << 30,
		"TB": 1000 * 1000 * 1000 * 1000, "T": 1 << 40, "TiB": 1 << 40}[unit]
	if m == 0 {
		m = 1 << 10
	}
	return uint64(v) * m
}

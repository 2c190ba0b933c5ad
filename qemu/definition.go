package qemu

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/lifeboat-dr/lifeboat"
)

// Definition reads what it takes to start this VM elsewhere from its QEMU:
// the machine type, vCPUs, memory, firmware, a direct kernel boot, how each
// of disks (by disk name: the guest device's id) is attached, and every NIC
// with its MAC. A process without a machine (a qemu-storage-daemon) tells
// nothing: the definition is empty, with no error. A property QEMU does not
// have is left out; a failed round trip is an error.
func (m *Monitor) Definition(ctx context.Context, disks []string) (lifeboat.Definition, error) {
	var d lifeboat.Definition
	typ, err := m.qomString(ctx, "/machine", "type")
	if err != nil {
		var qe *QMPError
		if errors.As(err, &qe) {
			return d, nil // no /machine here: a storage daemon
		}
		return d, err
	}
	d.Source = "qmp"
	d.Machine = strings.TrimSuffix(typ, "-machine")
	for _, p := range []struct {
		name string
		dst  *string
	}{{"firmware", &d.Firmware}, {"kernel", &d.Kernel}, {"initrd", &d.Initrd}, {"append", &d.Append}} {
		v, err := m.qomOptional(ctx, "/machine", p.name)
		if err != nil {
			return d, err
		}
		*p.dst = v
	}
	var cpus []struct {
		Index int `json:"cpu-index"`
	}
	if err := m.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return d, fmt.Errorf("vm definition: %w", err)
	}
	d.CPUs = len(cpus)
	var mem struct {
		Base int64 `json:"base-memory"`
	}
	if err := m.Execute(ctx, "query-memory-size-summary", nil, &mem); err != nil {
		return d, fmt.Errorf("vm definition: %w", err)
	}
	d.MemoryMiB = mem.Base >> 20
	for _, name := range disks {
		dd := lifeboat.DefinitionDisk{Name: name}
		path := "/machine/peripheral/" + name
		if dd.Device, err = m.qomOptional(ctx, path, "type"); err != nil {
			return d, err
		}
		if dd.Device != "" {
			if dd.Serial, err = m.qomOptional(ctx, path, "serial"); err != nil {
				return d, err
			}
			var bi int
			if err := m.Execute(ctx, "qom-get", qomArgs{path, "bootindex"}, &bi); err == nil && bi >= 0 {
				dd.BootIndex = bi
			}
		}
		d.Disks = append(d.Disks, dd)
	}
	nics, err := m.nics(ctx)
	if err != nil {
		return d, err
	}
	d.NICs = nics
	return d, nil
}

type qomArgs struct {
	Path     string `json:"path"`
	Property string `json:"property"`
}

func (m *Monitor) qomString(ctx context.Context, path, prop string) (string, error) {
	var s string
	if err := m.Execute(ctx, "qom-get", qomArgs{path, prop}, &s); err != nil {
		return "", err
	}
	return s, nil
}

// qomOptional is a string property, "" where the object or the property
// does not exist.
func (m *Monitor) qomOptional(ctx context.Context, path, prop string) (string, error) {
	s, err := m.qomString(ctx, path, prop)
	var qe *QMPError
	if errors.As(err, &qe) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("vm definition: %s %s: %w", path, prop, err)
	}
	return s, nil
}

// nics lists the guest's network devices (named ones and anonymous ones),
// each with its model, MAC and the id of the netdev it is on.
func (m *Monitor) nics(ctx context.Context) ([]lifeboat.DefinitionNIC, error) {
	var out []lifeboat.DefinitionNIC
	for _, dir := range []string{"/machine/peripheral", "/machine/peripheral-anon"} {
		var children []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		}
		if err := m.Execute(ctx, "qom-list", struct {
			Path string `json:"path"`
		}{dir}, &children); err != nil {
			var qe *QMPError
			if errors.As(err, &qe) {
				continue
			}
			return nil, fmt.Errorf("vm definition: %w", err)
		}
		for _, c := range children {
			model, ok := strings.CutPrefix(c.Type, "child<")
			model = strings.TrimSuffix(model, ">")
			if !ok || !isNIC(model) {
				continue
			}
			path := dir + "/" + c.Name
			mac, err := m.qomOptional(ctx, path, "mac")
			if err != nil {
				return nil, err
			}
			netdev, err := m.qomOptional(ctx, path, "netdev")
			if err != nil {
				return nil, err
			}
			id := c.Name
			if dir != "/machine/peripheral" {
				id = ""
			}
			out = append(out, lifeboat.DefinitionNIC{ID: id, Model: model, MAC: mac, Network: netdev})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].MAC < out[j].MAC })
	return out, nil
}

// isNIC tells QEMU's network device models by name.
func isNIC(model string) bool {
	for _, p := range []string{"virtio-net", "e1000", "rtl8139", "vmxnet3", "ne2k", "pcnet", "i82", "igb", "tulip", "usb-net"} {
		if strings.HasPrefix(model, p) {
			return true
		}
	}
	return false
}

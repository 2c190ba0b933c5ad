package virt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Recovered says how a domain's replicated XML becomes a domain at the
// recovery site (RecoveredXML).
type Recovered struct {
	Name string // the domain's name here
	// KeepUUID keeps the domain's UUID (what the guest reads as its SMBIOS
	// UUID): a real failover does; a test, running beside the real domain's
	// identity, gets a new one.
	KeepUUID bool
	// Overlays are the images to run on, by disk target. A disk not in it
	// (not replicated: a CD-ROM, an excluded disk) is left out.
	Overlays map[string]string
	// Network is where a NIC on production network net goes here: a bridge
	// ("br0"), a libvirt network ("network:default"), or "" for none: the
	// NIC stays in the guest with its link down, so nothing leaves it.
	Network func(net string) string
	// Dir takes the files the domain's serial ports and consoles write.
	Dir string
	// CPUs and MemoryMiB, when set, replace the domain's (the recovery
	// site's config may give a VM more or less here).
	CPUs      int
	MemoryMiB int64
	// NoKVM: this host's KVM cannot run the guest (a PVM-only host), so a
	// domain of type kvm runs as type qemu (TCG) here.
	NoKVM bool
}

// RecoveredXML is the domain XML (doc, as a point carries it) rewritten to
// run at the recovery site on r's overlays, and what it left out.
func RecoveredXML(doc string, r Recovered) (out string, dropped []string, err error) {
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		return "", nil, fmt.Errorf("the point's libvirt domain XML does not parse: %w", err)
	}
	x.Name = r.Name
	if r.NoKVM && x.Type == "kvm" {
		x.Type = "qemu"
	}
	if !r.KeepUUID {
		x.UUID = ""
	}
	x.ID = nil
	if r.CPUs > 0 {
		x.VCPU = &libvirtxml.DomainVCPU{Value: uint(r.CPUs)}
		x.VCPUs = nil
		if x.CPU != nil {
			x.CPU.Topology = nil // it would contradict the new count
		}
	}
	if r.MemoryMiB > 0 {
		x.Memory = &libvirtxml.DomainMemory{Value: uint(r.MemoryMiB), Unit: "MiB"}
		x.CurrentMemory = &libvirtxml.DomainCurrentMemory{Value: uint(r.MemoryMiB), Unit: "MiB"}
	}
	if x.Devices == nil {
		x.Devices = &libvirtxml.DomainDeviceList{}
	}
	dev := x.Devices
	if dev.Emulator != "" {
		if _, err := os.Stat(dev.Emulator); err != nil {
			dev.Emulator = "" // libvirt picks this host's
		}
	}
	var disks []libvirtxml.DomainDisk
	for _, d := range dev.Disks {
		if d.Target == nil || r.Overlays[d.Target.Dev] == "" {
			what := "a disk without target"
			if d.Target != nil {
				what = d.Target.Dev
			}
			dropped = append(dropped, fmt.Sprintf("disk %s (not replicated)", what))
			continue
		}
		d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: r.Overlays[d.Target.Dev]}}
		d.BackingStore = nil
		d.Auth = nil
		if d.Driver == nil {
			d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		}
		d.Driver.Type = "qcow2"
		disks = append(disks, d)
	}
	dev.Disks = disks
	for i := range dev.Interfaces {
		ni := &dev.Interfaces[i]
		prod := ""
		if s := ni.Source; s != nil {
			switch {
			case s.Network != nil:
				prod = s.Network.Network
			case s.Bridge != nil:
				prod = s.Bridge.Bridge
			}
		}
		to := ""
		if r.Network != nil {
			to = r.Network(prod)
		}
		ni.Target, ni.VirtualPort, ni.Address = nil, nil, nil
		switch {
		case to == "":
			ni.Source = &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}}
			ni.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
			ni.Backend = nil
		case strings.HasPrefix(to, "network:"):
			ni.Source = &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: strings.TrimPrefix(to, "network:")}}
		default:
			ni.Source = &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: to}}
		}
	}
	// Files the production host's ports wrote go to the run's directory;
	// unix sockets get paths libvirt chooses.
	n := 0
	chardev := func(s *libvirtxml.DomainChardevSource) {
		switch {
		case s == nil:
		case s.File != nil:
			s.File.Path = filepath.Join(r.Dir, "console-"+strconv.Itoa(n)+".log")
			n++
		case s.UNIX != nil:
			s.UNIX.Path = ""
		}
	}
	for i := range dev.Serials {
		chardev(dev.Serials[i].Source)
	}
	for i := range dev.Consoles {
		chardev(dev.Consoles[i].Source)
	}
	agent := false
	for i := range dev.Channels {
		c := &dev.Channels[i]
		chardev(c.Source)
		if c.Target != nil && c.Target.VirtIO != nil && c.Target.VirtIO.Name == AgentChannel {
			agent = true
		}
	}
	if !agent { // the failover waits for the guest agent, if the guest runs one
		dev.Channels = append(dev.Channels, libvirtxml.DomainChannel{
			Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}},
			Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: AgentChannel}},
		})
	}
	out, err = x.Marshal()
	return out, dropped, err
}

// AgentChannel is the virtio-serial port of the QEMU guest agent.
const AgentChannel = "org.qemu.guest_agent.0"

// Started is a domain started from a recovered XML.
type Started struct {
	*Domain
	PID   int    // its QEMU's
	Agent string // its guest agent's socket (for hooks)
}

// StartRecovered starts a domain from doc, paused: defined (persistent, so
// libvirt and its tools keep it across a libvirtd restart) or transient (a
// test, gone when destroyed). The caller resumes it.
func (c *Conn) StartRecovered(ctx context.Context, doc string, persistent bool) (*Started, error) {
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		return nil, err
	}
	var d libvirt.Domain
	err := c.call(ctx, "start of recovered domain "+x.Name, func(l *libvirt.Libvirt) (err error) {
		if !persistent {
			d, err = l.DomainCreateXML(doc, libvirt.DomainStartPaused)
			return err
		}
		if d, err = l.DomainDefineXMLFlags(doc, 0); err != nil {
			return err
		}
		if _, err = l.DomainCreateWithFlags(d, uint32(libvirt.DomainStartPaused)); err != nil {
			l.DomainUndefineFlags(d, libvirt.DomainUndefineCheckpointsMetadata|libvirt.DomainUndefineKeepNvram)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	s := &Started{Domain: &Domain{c: c, d: d, Name: x.Name}}
	if b, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", x.Name+".pid")); err == nil {
		s.PID, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	var live string
	if err := c.call(ctx, "XML of domain "+x.Name, func(l *libvirt.Libvirt) (err error) {
		live, err = l.DomainGetXMLDesc(d, 0)
		return err
	}); err == nil {
		var lx libvirtxml.Domain
		if lx.Unmarshal(live) == nil && lx.Devices != nil {
			for _, ch := range lx.Devices.Channels {
				if ch.Target != nil && ch.Target.VirtIO != nil && ch.Target.VirtIO.Name == AgentChannel && ch.Source != nil && ch.Source.UNIX != nil {
					s.Agent = ch.Source.UNIX.Path
				}
			}
		}
	}
	return s, nil
}

// CreateCheckpoint makes a checkpoint named name of the given disks: each
// gets a persistent dirty bitmap of that name from this instant.
func (d *Domain) CreateCheckpoint(ctx context.Context, name string, disks []string) error {
	doc, err := CheckpointDoc(name, "", time.Time{}, disks)
	if err != nil {
		return err
	}
	return d.CreateCheckpointXML(ctx, doc)
}

// CreateCheckpointXML makes the checkpoint doc describes (CheckpointDoc):
// its bitmaps start now.
func (d *Domain) CreateCheckpointXML(ctx context.Context, doc string) error {
	return d.c.call(ctx, "checkpoint of domain "+d.Name, func(l *libvirt.Libvirt) error {
		_, err := l.DomainCheckpointCreateXML(d.d, doc, 0)
		return err
	})
}

// CheckpointDoc is the XML of a checkpoint named name of disks (targets),
// each tracked by a bitmap of that name: what CreateCheckpoint makes, and,
// with a creation time, what RedefineCheckpoint takes for bitmaps started
// outside libvirt.
func CheckpointDoc(name, description string, created time.Time, disks []string) (string, error) {
	cp := libvirtxml.DomainCheckpoint{Name: name, Description: description, Disks: &libvirtxml.DomainCheckpointDisks{}}
	if !created.IsZero() {
		cp.CreationTime = strconv.FormatInt(created.Unix(), 10)
	}
	for _, t := range disks {
		cp.Disks.Disks = append(cp.Disks.Disks, libvirtxml.DomainCheckpointDisk{Name: t, Checkpoint: "bitmap", Bitmap: name})
	}
	return cp.Marshal()
}

// Start starts the defined domain (virsh start); a running one is no error.
func (d *Domain) Start(ctx context.Context) error {
	if on, err := d.Active(ctx); err == nil && on {
		return nil
	}
	return d.c.call(ctx, "start of domain "+d.Name, func(l *libvirt.Libvirt) error { return l.DomainCreate(d.d) })
}

// Resume runs the domain's CPUs.
func (d *Domain) Resume(ctx context.Context) error {
	return d.c.call(ctx, "resume of domain "+d.Name, func(l *libvirt.Libvirt) error { return l.DomainResume(d.d) })
}

// Remove destroys the domain (powers it off at once) if it runs and
// undefines it if it is defined, with libvirt's records of its checkpoints
// (the bitmaps stay in the images, which the caller deletes or keeps).
func (c *Conn) Remove(ctx context.Context, name string) error {
	return c.call(ctx, "removal of domain "+name, func(l *libvirt.Libvirt) error {
		d, err := l.DomainLookupByName(name)
		if code(err) == libvirt.ErrNoDomain {
			return nil
		}
		if err != nil {
			return err
		}
		if active, _ := l.DomainIsActive(d); active == 1 {
			if err := l.DomainDestroyFlags(d, libvirt.DomainDestroyDefault); err != nil && code(err) != libvirt.ErrOperationInvalid {
				return err
			}
		}
		if persistent, _ := l.DomainIsPersistent(d); persistent == 1 {
			if err := l.DomainUndefineFlags(d, libvirt.DomainUndefineCheckpointsMetadata|libvirt.DomainUndefineKeepNvram); err != nil && code(err) != libvirt.ErrNoDomain {
				return err
			}
		}
		return nil
	})
}

// Exists reports whether a domain of that name is defined or runs.
func (c *Conn) Exists(ctx context.Context, name string) (bool, error) {
	var found bool
	err := c.call(ctx, "lookup of domain "+name, func(l *libvirt.Libvirt) error {
		_, err := l.DomainLookupByName(name)
		if code(err) == libvirt.ErrNoDomain {
			return nil
		}
		found = err == nil
		return err
	})
	return found, err
}

// AgentAnswers asks the guest agent for the guest's time through libvirt
// (virsh domtime: no agent pass-through, so no taint).
func (d *Domain) AgentAnswers(ctx context.Context) error {
	return d.c.call(ctx, "guest agent of domain "+d.Name, func(l *libvirt.Libvirt) error {
		_, _, err := l.DomainGetTime(d.d, 0)
		return err
	})
}

// DomainName is the name a domain XML gives.
func DomainName(doc string) (string, error) {
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		return "", fmt.Errorf("the point's libvirt domain XML does not parse: %w", err)
	}
	return x.Name, nil
}

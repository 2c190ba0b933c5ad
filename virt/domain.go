package virt

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Domain is one libvirt domain.
type Domain struct {
	c    *Conn
	d    libvirt.Domain
	Name string
}

// Domain looks up a domain by name.
func (c *Conn) Domain(ctx context.Context, name string) (*Domain, error) {
	var d libvirt.Domain
	err := c.call(ctx, "lookup of domain "+name, func(l *libvirt.Libvirt) (err error) {
		d, err = l.DomainLookupByName(name)
		return err
	})
	if err != nil {
		if code(err) == libvirt.ErrNoDomain {
			return nil, fmt.Errorf("libvirt at %s has no domain %q (see `virsh -c %s list --all`; check `libvirt: domain:` in the config): %w", c.uri, name, c.uri, err)
		}
		return nil, err
	}
	return &Domain{c: c, d: d, Name: name}, nil
}

// Disk is a disk of a domain, as its live XML describes it.
type Disk struct {
	// Target is the disk's name in the domain (vda, sdb): stable across
	// restarts, external snapshots, block commits and libvirt's renumbered
	// node names, and what lifeboat names the disk by.
	Target string
	File   string // the active layer's file ("" for a non-file source)
	Format string // qcow2, raw
	Bus    string
	Serial string
	// Chain is the images the disk reads, its active layer first and each
	// backing image after it, as the live XML shows them: a file's or a
	// block device's path, a network disk's protocol:name ("" for a
	// source of another kind). It tells a disk's own image from another
	// put under its target: a checkpoint's bitmaps carry one name on
	// every disk it tracks.
	Chain []string
}

// Description is what lifeboat reads of a running domain.
type Description struct {
	Disks []Disk
	// UID and GID are the user and group QEMU runs as (libvirt's DAC label):
	// files and sockets QEMU must open are made so that it can. -1 when
	// the domain has no DAC label (QEMU runs as the caller).
	UID, GID int
	XML      string // the live domain XML
}

// Describe reads the domain's live XML. It fails when the domain is not running.
func (d *Domain) Describe(ctx context.Context) (*Description, error) {
	active, err := d.Active(ctx)
	if err != nil {
		return nil, err
	}
	if !active {
		if d.migratedAway(ctx) {
			// Starting it here would run the guest twice on shared storage.
			return nil, fmt.Errorf("libvirt domain %q is shut off here because it was migrated to another host: protect it where it runs now (point `libvirt.uri` of this VM there); do not start it here", d.Name)
		}
		return nil, fmt.Errorf("libvirt domain %q is not running (start it with `virsh start %s`)", d.Name, d.Name)
	}
	var doc string
	err = d.c.call(ctx, "XML of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		doc, err = l.DomainGetXMLDesc(d.d, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	return parseDescription(d.Name, doc)
}

func parseDescription(name, doc string) (*Description, error) {
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("libvirt domain %q: its XML does not parse: %w", name, err)
	}
	desc := &Description{UID: -1, GID: -1, XML: doc}
	for _, sl := range x.SecLabel {
		if sl.Model == "dac" && sl.Label != "" {
			uid, gid, ok := parseDAC(sl.Label)
			if ok {
				desc.UID, desc.GID = uid, gid
			}
		}
	}
	if x.Devices == nil {
		return desc, nil
	}
	for _, xd := range x.Devices.Disks {
		if xd.Device != "" && xd.Device != "disk" {
			continue // cdrom, floppy, lun
		}
		if xd.ReadOnly != nil || xd.Shareable != nil || xd.Transient != nil || xd.Target == nil {
			continue // nothing a guest writes alone
		}
		dk := Disk{Target: xd.Target.Dev, Bus: xd.Target.Bus, Serial: xd.Serial}
		if xd.Driver != nil {
			dk.Format = xd.Driver.Type
		}
		if xd.Source != nil && xd.Source.File != nil {
			dk.File = xd.Source.File.File
		}
		dk.Chain = append(dk.Chain, sourceName(xd.Source))
		// The chain ends in an empty <backingStore/>.
		for bs := xd.BackingStore; bs != nil && sourceName(bs.Source) != ""; bs = bs.BackingStore {
			dk.Chain = append(dk.Chain, sourceName(bs.Source))
		}
		desc.Disks = append(desc.Disks, dk)
	}
	return desc, nil
}

// sourceName names an image of a disk's chain (see Disk.Chain).
func sourceName(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s == nil:
		return ""
	case s.File != nil:
		return s.File.File
	case s.Block != nil:
		return s.Block.Dev
	case s.Network != nil:
		return s.Network.Protocol + ":" + s.Network.Name
	case s.Volume != nil:
		return "volume:" + s.Volume.Pool + "/" + s.Volume.Volume
	}
	return ""
}

// parseDAC reads libvirt's DAC label "+64055:+64055" (or "user:group" names,
// which are left unresolved: ok is false).
func parseDAC(label string) (uid, gid int, ok bool) {
	u, g, found := strings.Cut(label, ":")
	if !found {
		return 0, 0, false
	}
	uid, err1 := strconv.Atoi(strings.TrimPrefix(u, "+"))
	gid, err2 := strconv.Atoi(strings.TrimPrefix(g, "+"))
	return uid, gid, err1 == nil && err2 == nil
}

// WithDomain calls f with domain name of the libvirtd of uri, on a
// connection of its own that ends with the call.
func WithDomain(ctx context.Context, uri, name string, f func(*Domain) error) error {
	c, err := Dial(ctx, uri)
	if err != nil {
		return err
	}
	defer c.Close()
	d, err := c.Domain(ctx, name)
	if err != nil {
		return err
	}
	return f(d)
}

// Active reports whether the domain runs.
func (d *Domain) Active(ctx context.Context) (bool, error) {
	var n int32
	err := d.c.call(ctx, "state of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		n, err = l.DomainIsActive(d.d)
		return err
	})
	return n == 1, err
}

// migratedAway reports whether the domain is shut off because it migrated
// to another host (false when libvirt cannot say).
func (d *Domain) migratedAway(ctx context.Context) bool {
	var state, reason int32
	err := d.c.call(ctx, "state of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		state, reason, err = l.DomainGetState(d.d, 0)
		return err
	})
	return err == nil && libvirt.DomainState(state) == libvirt.DomainShutoff && libvirt.DomainShutoffReason(reason) == libvirt.DomainShutoffMigrated
}

// Running reports whether the domain's CPUs run (not paused, not off).
func (d *Domain) Running(ctx context.Context) (bool, error) {
	state, err := d.state(ctx)
	return state == libvirt.DomainRunning, err
}

// Paused reports whether the domain is stopped with its guest's state kept
// (paused by an admin or by QEMU on an I/O error, suspended to RAM): it
// goes on where it stopped when it resumes. libvirt refuses guest-agent
// calls meanwhile ("domain is not running").
func (d *Domain) Paused(ctx context.Context) (bool, error) {
	state, err := d.state(ctx)
	return state == libvirt.DomainPaused || state == libvirt.DomainPmsuspended, err
}

func (d *Domain) state(ctx context.Context) (libvirt.DomainState, error) {
	var state int32
	err := d.c.call(ctx, "state of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		state, _, err = l.DomainGetState(d.d, 0)
		return err
	})
	return libvirt.DomainState(state), err
}

// Persistent reports whether the domain is defined (its checkpoints outlive
// a shutdown) rather than transient.
func (d *Domain) Persistent(ctx context.Context) (bool, error) {
	var n int32
	err := d.c.call(ctx, "persistence of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		n, err = l.DomainIsPersistent(d.d)
		return err
	})
	return n == 1, err
}

// Job is the domain's running job, as libvirt reports it ("" when none).
func (d *Domain) Job(ctx context.Context) (string, error) {
	var typ int32
	var params []libvirt.TypedParam
	err := d.c.call(ctx, "job of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		typ, params, err = l.DomainGetJobStats(d.d, 0)
		return err
	})
	if err != nil || libvirt.DomainJobType(typ) == libvirt.DomainJobNone {
		return "", err
	}
	for _, p := range params {
		if p.Field == "operation" {
			if v, ok := p.Value.I.(int32); ok {
				return jobOperation(v), nil
			}
		}
	}
	return "job", nil
}

// jobOperation names libvirt's virDomainJobOperation.
func jobOperation(v int32) string {
	names := []string{"unknown", "start", "save", "restore", "incoming migration", "outgoing migration",
		"snapshot", "snapshot revert", "dump", "backup", "snapshot delete"}
	if v >= 0 && int(v) < len(names) {
		return names[v]
	}
	return "job " + strconv.Itoa(int(v))
}

// FSFreeze freezes the guest's file systems through libvirt's guest agent,
// returning how many it froze.
func (d *Domain) FSFreeze(ctx context.Context) (int, error) {
	var n int32
	err := d.c.call(ctx, "fsfreeze of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		n, err = l.DomainFsfreeze(d.d, nil, 0)
		return err
	})
	return int(n), err
}

// FSThaw thaws them.
func (d *Domain) FSThaw(ctx context.Context) (int, error) {
	var n int32
	err := d.c.call(ctx, "fsthaw of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		n, err = l.DomainFsthaw(d.d, nil, 0)
		return err
	})
	return int(n), err
}

// Capacity is the size the guest sees of disk target.
func (d *Domain) Capacity(ctx context.Context, target string) (int64, error) {
	var capacity uint64
	err := d.c.call(ctx, "block info of "+target, func(l *libvirt.Libvirt) (err error) {
		_, capacity, _, err = l.DomainGetBlockInfo(d.d, target, 0)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("libvirt domain %q: size of disk %s: %w", d.Name, target, err)
	}
	return int64(capacity), nil
}

// Suspend pauses the domain's CPUs (virsh suspend).
func (d *Domain) Suspend(ctx context.Context) error {
	return d.c.call(ctx, "suspend of domain "+d.Name, func(l *libvirt.Libvirt) error { return l.DomainSuspend(d.d) })
}

// PowerOff stops the domain at once (virsh destroy: QEMU is told to quit,
// and flushes its images); it stays defined.
func (d *Domain) PowerOff(ctx context.Context) error {
	return d.c.call(ctx, "power-off of domain "+d.Name, func(l *libvirt.Libvirt) error {
		return l.DomainDestroyFlags(d.d, libvirt.DomainDestroyDefault)
	})
}

// SetAutostart sets whether libvirtd starts the domain when it starts.
func (d *Domain) SetAutostart(ctx context.Context, on bool) error {
	v := int32(0)
	if on {
		v = 1
	}
	return d.c.call(ctx, "autostart of domain "+d.Name, func(l *libvirt.Libvirt) error { return l.DomainSetAutostart(d.d, v) })
}

package virt

import (
	"context"
	"fmt"
	"strings"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Checkpoint is a libvirt checkpoint of a domain: a point from which
// libvirt can tell every block written since, per disk (a dirty bitmap in
// the qcow2 image, which libvirt keeps across restarts, external snapshots
// and block commits).
type Checkpoint struct {
	Name        string
	Description string
	Parent      string
	Created     string   // seconds since the epoch, as libvirt reports it
	Disks       []string // the disks it tracks (checkpoint='bitmap')
}

// Checkpoints lists the domain's checkpoints, every tool's.
func (d *Domain) Checkpoints(ctx context.Context) ([]Checkpoint, error) {
	var cps []libvirt.DomainCheckpoint
	err := d.c.call(ctx, "checkpoints of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		cps, _, err = l.DomainListAllCheckpoints(d.d, 1, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	var out []Checkpoint
	for _, cp := range cps {
		var doc string
		err := d.c.call(ctx, "checkpoint "+cp.Name+" of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
			doc, err = l.DomainCheckpointGetXMLDesc(cp, 0)
			return err
		})
		if code(err) == libvirt.ErrNoDomainCheckpoint {
			continue // deleted since the list (another tool's)
		}
		if err != nil {
			return nil, err
		}
		c, err := ParseCheckpoint(doc)
		if err != nil {
			return nil, fmt.Errorf("libvirt domain %q: checkpoint %q: %w", d.Name, cp.Name, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// CheckpointXML is a checkpoint's XML without the domain's definition: what
// RedefineCheckpoint takes back.
func (d *Domain) CheckpointXML(ctx context.Context, name string) (string, error) {
	var doc string
	err := d.c.call(ctx, "XML of checkpoint "+name, func(l *libvirt.Libvirt) error {
		cp, err := l.DomainCheckpointLookupByName(d.d, name, 0)
		if err != nil {
			return err
		}
		doc, err = l.DomainCheckpointGetXMLDesc(cp, uint32(libvirt.DomainCheckpointXMLNoDomain))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("libvirt domain %q: checkpoint %q: %w", d.Name, name, err)
	}
	return doc, nil
}

// RedefineCheckpoint gives libvirt back the metadata of a checkpoint whose
// bitmaps live on in the images (see HideCheckpoint). libvirt checks that
// every bitmap is there and consistent: a disk restored from an older copy,
// or a QEMU killed before saving its bitmaps, is refused.
func (d *Domain) RedefineCheckpoint(ctx context.Context, xml string) error {
	err := d.c.call(ctx, "redefine of a checkpoint", func(l *libvirt.Libvirt) error {
		_, err := l.DomainCheckpointCreateXML(d.d, xml,
			uint32(libvirt.DomainCheckpointCreateRedefine|libvirt.DomainCheckpointCreateRedefineValidate))
		return err
	})
	if err != nil {
		return fmt.Errorf("libvirt domain %q: redefine checkpoint: %w", d.Name, err)
	}
	return nil
}

// HideCheckpoint deletes a checkpoint's libvirt metadata and leaves its
// bitmaps recording in the images. Tools that refuse to run beside another
// tool's checkpoints (virtnbdbackup) then see none. Gone already is no error.
func (d *Domain) HideCheckpoint(ctx context.Context, name string) error {
	return d.deleteCheckpoint(ctx, name, libvirt.DomainCheckpointDeleteMetadataOnly)
}

// ParseCheckpoint reads a checkpoint's XML.
func ParseCheckpoint(doc string) (Checkpoint, error) {
	var x libvirtxml.DomainCheckpoint
	if err := x.Unmarshal(doc); err != nil {
		return Checkpoint{}, fmt.Errorf("its XML does not parse: %w", err)
	}
	c := Checkpoint{Name: x.Name, Description: x.Description, Created: x.CreationTime}
	if x.Parent != nil {
		c.Parent = x.Parent.Name
	}
	if x.Disks != nil {
		for _, dk := range x.Disks.Disks {
			if dk.Checkpoint == "" || dk.Checkpoint == "bitmap" {
				c.Disks = append(c.Disks, dk.Name)
			}
		}
	}
	return c, nil
}

// Orphan is a checkpoint's XML without its parent: what RedefineCheckpoint
// takes when the parent may be gone (hidden, or deleted by its tool).
func Orphan(doc string) (string, error) {
	var x libvirtxml.DomainCheckpoint
	if err := x.Unmarshal(doc); err != nil {
		return "", fmt.Errorf("checkpoint XML does not parse: %w", err)
	}
	x.Parent, x.Domain = nil, nil
	return x.Marshal()
}

// DeleteCheckpoint deletes a checkpoint and its bitmaps. A checkpoint that
// is gone already is no error; one whose bitmap is gone (QEMU was killed
// before saving it) loses its metadata only.
func (d *Domain) DeleteCheckpoint(ctx context.Context, name string) error {
	return d.deleteCheckpoint(ctx, name, 0)
}

func (d *Domain) deleteCheckpoint(ctx context.Context, name string, flags libvirt.DomainCheckpointDeleteFlags) error {
	del := func(flags libvirt.DomainCheckpointDeleteFlags) error {
		return d.c.call(ctx, "delete of checkpoint "+name, func(l *libvirt.Libvirt) error {
			cp, err := l.DomainCheckpointLookupByName(d.d, name, 0)
			if err != nil {
				return err
			}
			return l.DomainCheckpointDelete(cp, flags)
		})
	}
	err := del(flags)
	if err != nil && code(err) != libvirt.ErrNoDomainCheckpoint && containsAny(err.Error(), "not found", "broken", "inconsistent") {
		err = del(libvirt.DomainCheckpointDeleteMetadataOnly)
	}
	if code(err) == libvirt.ErrNoDomainCheckpoint {
		return nil
	}
	if err != nil {
		return fmt.Errorf("libvirt domain %q: delete checkpoint %q: %w", d.Name, name, err)
	}
	return nil
}

// BackupDisk is one disk of a pull backup.
type BackupDisk struct {
	Target string
	// Incremental is the checkpoint to export the changes since ("" = the
	// disk is exported whole, with no dirty bitmap).
	Incremental string
	// Scratch is where QEMU keeps the blocks the guest overwrites while the
	// backup runs (copy-before-write); libvirt creates it and removes it.
	Scratch string
	// Track puts the disk in the new checkpoint (a qcow2 image only: libvirt
	// keeps no checkpoint of a raw one).
	Track bool
}

// Backup is a pull-mode backup: the instant of every disk, exported over NBD
// on Socket until AbortBackup; and, with Checkpoint, a new checkpoint made at
// the same instant, in the same transaction.
type Backup struct {
	Socket      string
	Disks       []BackupDisk
	Checkpoint  string // name of the checkpoint to create ("" = none)
	Description string // the checkpoint's description
	// Others are the domain's other disks, left out of the backup and of
	// the checkpoint (libvirt includes every disk unless told).
	Others []string
	// ReuseScratch: the scratch files exist (made, reserved and owned by
	// the caller, who removes them); libvirt neither creates nor removes them.
	ReuseScratch bool
}

// ExportBitmap is the NBD meta context of the changes of disk target in a
// running incremental backup.
func ExportBitmap(target string) string { return "qemu:dirty-bitmap:backup-" + target }

// BeginBackup starts a pull backup.
func (d *Domain) BeginBackup(ctx context.Context, b Backup) error {
	bx := libvirtxml.DomainBackup{Pull: &libvirtxml.DomainBackupPull{
		Server: &libvirtxml.DomainBackupPullServer{UNIX: &libvirtxml.DomainBackupPullServerUNIX{Socket: b.Socket}},
		Disks:  &libvirtxml.DomainBackupPullDisks{},
	}}
	cx := libvirtxml.DomainCheckpoint{Name: b.Checkpoint, Description: b.Description, Disks: &libvirtxml.DomainCheckpointDisks{}}
	for _, dk := range b.Disks {
		pd := libvirtxml.DomainBackupPullDisk{
			Name: dk.Target, Backup: "yes", BackupMode: "full",
			Driver:  &libvirtxml.DomainBackupDiskDriver{Type: "qcow2"},
			Scratch: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: dk.Scratch}},
		}
		if dk.Incremental != "" {
			pd.BackupMode, pd.Incremental = "incremental", dk.Incremental
		}
		bx.Pull.Disks.Disks = append(bx.Pull.Disks.Disks, pd)
		mode := "no"
		if dk.Track {
			mode = "bitmap"
		}
		cx.Disks.Disks = append(cx.Disks.Disks, libvirtxml.DomainCheckpointDisk{Name: dk.Target, Checkpoint: mode})
	}
	for _, o := range b.Others {
		bx.Pull.Disks.Disks = append(bx.Pull.Disks.Disks, libvirtxml.DomainBackupPullDisk{Name: o, Backup: "no"})
		cx.Disks.Disks = append(cx.Disks.Disks, libvirtxml.DomainCheckpointDisk{Name: o, Checkpoint: "no"})
	}
	bdoc, err := bx.Marshal()
	if err != nil {
		return fmt.Errorf("libvirt domain %q: backup XML: %w", d.Name, err)
	}
	var cdoc libvirt.OptString
	if b.Checkpoint != "" {
		s, err := cx.Marshal()
		if err != nil {
			return fmt.Errorf("libvirt domain %q: checkpoint XML: %w", d.Name, err)
		}
		cdoc = libvirt.OptString{s}
	}
	err = d.c.call(ctx, "backup-begin of domain "+d.Name, func(l *libvirt.Libvirt) error {
		var flags libvirt.DomainBackupBeginFlags
		if b.ReuseScratch {
			flags |= libvirt.DomainBackupBeginReuseExternal
		}
		return l.DomainBackupBegin(d.d, bdoc, cdoc, flags)
	})
	if err != nil {
		return fmt.Errorf("libvirt domain %q: begin backup: %w", d.Name, err)
	}
	return nil
}

// BackupRunning reports whether the domain runs a backup job, and its
// socket (so lifeboat can tell its own from another tool's).
func (d *Domain) BackupRunning(ctx context.Context) (running bool, socket string, err error) {
	var doc string
	err = d.c.call(ctx, "backup of domain "+d.Name, func(l *libvirt.Libvirt) (err error) {
		doc, err = l.DomainBackupGetXMLDesc(d.d, 0)
		return err
	})
	if code(err) == libvirt.ErrNoDomainBackup {
		return false, "", nil
	}
	if err != nil {
		return false, "", err
	}
	var x libvirtxml.DomainBackup
	if err := x.Unmarshal(doc); err != nil {
		return true, "", nil
	}
	if x.Pull != nil && x.Pull.Server != nil && x.Pull.Server.UNIX != nil {
		socket = x.Pull.Server.UNIX.Socket
	}
	return true, socket, nil
}

// AbortBackup ends the domain's backup job: libvirt stops its NBD server and
// removes its scratch files. No backup running is no error.
func (d *Domain) AbortBackup(ctx context.Context) error {
	err := d.c.call(ctx, "abort of the backup of domain "+d.Name, func(l *libvirt.Libvirt) error {
		return l.DomainAbortJob(d.d)
	})
	if err != nil && (code(err) == libvirt.ErrOperationInvalid && strings.Contains(err.Error(), "no job")) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("libvirt domain %q: end backup: %w", d.Name, err)
	}
	return nil
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// Package failback is the production site's side of a failback: with the
// production VM stopped, it opens the VM's disk images in a
// qemu-storage-daemon of its own, says which blocks each disk wrote on its own
// after the last point it replicated (its change-tracking generations, when
// they survived), and takes the failback cycles' points into the disks
// (disksink over the daemon's writable exports).
package failback

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Disk is a production disk image (see protect.ReadImages: what the
// production site recorded of its VM's disks at its last cycle).
type Disk = protect.DiskImage

// ErrNoRecord marks a disk whose own record of its writes cannot be trusted
// or is gone: which blocks it changed must be found by comparing hashes.
var ErrNoRecord = lifeboat.ErrNoChangeRecord

// Production is the production VM's disks, open for a failback.
type Production struct {
	VM     string
	log    *slog.Logger
	daemon *qemu.Daemon
	disks  map[string]*disk
}

type disk struct {
	Disk
	node   string
	size   int64
	client *nbd.Client // the writable export, for the failback's points
}

// Open opens the disks of vm, whose VM must not be running, in a daemon whose
// runtime files go in dir (one of the VM's own: a daemon a killed lifeboat
// left there is killed first).
func Open(ctx context.Context, dir, vm string, disks []Disk, log *slog.Logger) (*Production, error) {
	if log == nil {
		log = slog.Default()
	}
	if len(disks) == 0 {
		return nil, fmt.Errorf("vm %q: no disks to fail back into", vm)
	}
	// A lifeboat killed during a failback left its daemon holding the images.
	if err := qemu.KillLeftover(ctx, dir); err != nil {
		return nil, fmt.Errorf("vm %q: %w", vm, err)
	}
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, NBD: true})
	if err != nil {
		return nil, fmt.Errorf("vm %q: %w", vm, err)
	}
	p := &Production{VM: vm, log: log.With("vm", vm), daemon: d, disks: map[string]*disk{}}
	for i, dk := range disks {
		if err := p.open(ctx, i, dk); err != nil {
			p.daemon.Kill()
			p.closeClients()
			return nil, fmt.Errorf("vm %q disk %q (%s): %w", vm, dk.Name, dk.File, err)
		}
	}
	return p, nil
}

func (p *Production) open(ctx context.Context, i int, dk Disk) error {
	if _, dup := p.disks[dk.Name]; dup {
		return errors.New("named twice")
	}
	if dk.Format != "qcow2" && dk.Format != "raw" {
		return fmt.Errorf("format %q: lifeboat fails back into qcow2 or raw images", dk.Format)
	}
	fi, err := os.Stat(dk.File)
	if err != nil {
		return err
	}
	proto := "file"
	if fi.Mode()&os.ModeDevice != 0 {
		proto = "host_device" // a logical volume, say
	}
	node := "prod" + strconv.Itoa(i)
	m := p.daemon.Monitor()
	if err := m.BlockdevAdd(ctx, map[string]any{
		"driver": dk.Format, "node-name": node, "discard": "unmap",
		"file": map[string]any{"driver": proto, "filename": dk.File},
	}); err != nil {
		return fmt.Errorf("open (is the production VM still running? stop it first): %w", err)
	}
	if err := m.ExportAdd(ctx, qemu.Export{ID: "e-" + node, Node: node, Name: dk.Name, Writable: true}); err != nil {
		return err
	}
	c, err := nbd.Dial(ctx, "unix:"+p.daemon.NBDSocket(), dk.Name, nbd.Options{Connections: 4, MaxInFlight: 16, MetaContexts: []string{"base:allocation"}})
	if err != nil {
		return err
	}
	p.disks[dk.Name] = &disk{Disk: dk, node: node, size: c.Size(), client: c}
	return nil
}

// Clients are the writable exports of the disks, by name: a failback
// point's target (disksink.Open).
func (p *Production) Clients() map[string]*nbd.Client {
	out := make(map[string]*nbd.Client, len(p.disks))
	for name, d := range p.disks {
		out[name] = d.client
	}
	return out
}

// Shared is what the recovery site says of a production disk at the latest
// point production replicated to it.
type Shared = wire.Shared

// scanBitmap is the bitmap Changes merges a disk's generations into.
const scanBitmap = "lifeboat-failback-scan"

// Changes calls fn for each byte range that the disk wrote after the instant
// of the shared point: the union of the generation that point started and
// the newer ones of its lineage. Without those (a raw disk's bitmaps died
// with its QEMU, a crash left them inconsistent, the disk was replaced or
// restored) it returns an error wrapping ErrNoRecord that says why; nothing
// is reported then. The disk's generations are left as they were.
func (p *Production) Changes(ctx context.Context, name string, sh Shared, fn func(off, length int64) error) error {
	d, n, err := p.node(ctx, name)
	if err != nil {
		return err
	}
	names, why := protect.ChangeRecord(n.Bitmaps, sh.Peer, sh.Lineage, sh.Point, sh.Generation)
	if names == nil {
		return fmt.Errorf("vm %q disk %q: %w: %s", p.VM, name, ErrNoRecord, why)
	}
	if err := p.scan(ctx, d, names, fn); err != nil {
		return err
	}
	p.log.Info("production's own writes since the shared point, from its generations", "disk", name, "point", sh.Point, "generations", names)
	return nil
}

// WrittenSince calls fn for each byte range written into the disk since
// generation gen started (Store: at the commit of the failback point the
// disk holds): what a VM started here meanwhile wrote. Without gen, or
// with gen inconsistent or disabled, it returns an error wrapping
// ErrNoRecord that says why; nothing is reported then.
func (p *Production) WrittenSince(ctx context.Context, name, gen string, fn func(off, length int64) error) error {
	d, n, err := p.node(ctx, name)
	if err != nil {
		return err
	}
	if why := sinceWhy(n, gen); why != "" {
		return fmt.Errorf("vm %q disk %q: %w: %s", p.VM, name, ErrNoRecord, why)
	}
	return p.scan(ctx, d, []string{gen}, fn)
}

// untouchedWhy says why the disk may hold more than the failback point at
// whose commit generation gen started (written since, or nothing proves it
// was not), or "" when gen proves nothing was written since.
func (p *Production) untouchedWhy(ctx context.Context, name, gen string) string {
	_, n, err := p.node(ctx, name)
	if err != nil {
		return err.Error()
	}
	if why := sinceWhy(n, gen); why != "" {
		return "nothing proves it was not written since: " + why
	}
	if b, _ := n.Bitmap(gen); b.Count > 0 {
		return fmt.Sprintf("%d bytes were written into it since, by a VM started here while lifeboat let go of its disks", b.Count)
	}
	return ""
}

// keepsBitmaps reports whether the disk keeps its bitmaps once the daemon
// stops: a qcow2 v3 image does, a raw one or a qcow2 v2 does not.
func (p *Production) keepsBitmaps(ctx context.Context, name string) (bool, error) {
	_, n, err := p.node(ctx, name)
	return n.PersistentBitmaps(), err
}

// sinceWhy says why the node's bitmap gen does not prove which blocks the
// disk wrote since it started, or "" when it does.
func sinceWhy(n qemu.BlockNode, gen string) string {
	b, ok := n.Bitmap(gen)
	switch {
	case gen == "":
		return "no generation was started at the failback point the disk holds (a record of an older lifeboat)"
	case !ok:
		return fmt.Sprintf("generation %q is not on the disk (a raw disk, whose bitmaps die with its QEMU; or the disk was restored, replaced, or its bitmaps removed)", gen)
	case b.Inconsistent:
		return fmt.Sprintf("generation %q is inconsistent after an unclean QEMU exit", gen)
	case !b.Recording:
		return fmt.Sprintf("generation %q is disabled: it cannot prove it saw every write", gen)
	}
	return ""
}

// node is a disk and its node as the daemon has it now (its bitmaps).
func (p *Production) node(ctx context.Context, name string) (*disk, qemu.BlockNode, error) {
	d, ok := p.disks[name]
	if !ok {
		return nil, qemu.BlockNode{}, fmt.Errorf("vm %q: no disk %q at production", p.VM, name)
	}
	n, err := p.daemon.Monitor().Node(ctx, d.node)
	if err != nil {
		return nil, qemu.BlockNode{}, fmt.Errorf("vm %q disk %q: %w", p.VM, name, err)
	}
	return d, n, nil
}

// scan calls fn for each byte range dirty in the union of the disk's bitmaps
// names (merged into a scratch bitmap, read over NBD). The bitmaps are left
// as they were.
func (p *Production) scan(ctx context.Context, d *disk, names []string, fn func(off, length int64) error) error {
	m := p.daemon.Monitor()
	if err := m.AddBitmap(ctx, d.node, scanBitmap, false, true); err != nil {
		return err
	}
	defer func() {
		if err := m.RemoveBitmap(context.WithoutCancel(ctx), d.node, scanBitmap); err != nil {
			p.log.Warn("removing the failback's scan bitmap failed", "disk", d.Name, "err", err)
		}
	}()
	if err := m.MergeBitmaps(ctx, d.node, scanBitmap, names...); err != nil {
		return err
	}
	export := "scan-" + d.Name
	if err := m.ExportAdd(ctx, qemu.Export{ID: export, Node: d.node, Name: export, Bitmaps: []string{scanBitmap}}); err != nil {
		return err
	}
	defer func() {
		if err := m.ExportDel(context.WithoutCancel(ctx), export); err != nil {
			p.log.Warn("removing the failback's scan export failed", "disk", d.Name, "err", err)
		}
	}()
	meta := "qemu:dirty-bitmap:" + scanBitmap
	c, err := nbd.Dial(ctx, "unix:"+p.daemon.NBDSocket(), export, nbd.Options{MetaContexts: []string{meta}})
	if err != nil {
		return err
	}
	defer c.Close()
	err = c.BlockStatus(ctx, meta, 0, d.size, func(e nbd.Extent) error {
		if e.Flags&nbd.StateDirty == 0 {
			return nil
		}
		return fn(e.Offset, e.Length)
	})
	if err != nil {
		return fmt.Errorf("vm %q disk %q: reading generations %v: %w", p.VM, d.Name, names, err)
	}
	return nil
}

// startSince starts, on each disk of pt, a generation that records every
// write from now on (WrittenSince), and returns their names by disk. A raw
// disk's is in the daemon's memory only: it dies with the daemon, and a
// disk reopened without it is compared by hashes. The names start as the
// legacy generations' did: the VM's next ordinary cycle here removes any
// that is left.
func (p *Production) startSince(ctx context.Context, pt lifeboat.Point) (map[string]string, error) {
	gens := map[string]string{}
	m := p.daemon.Monitor()
	for _, pd := range pt.Disks {
		d, ok := p.disks[pd.Name]
		if !ok {
			return gens, fmt.Errorf("vm %q: point %d has disk %q, which production does not", p.VM, pt.ID, pd.Name)
		}
		gen := sincePrefix + strings.TrimPrefix(lifeboat.NewGeneration(pt.Site, pd.Lineage, pt.ID), lifeboat.GenerationPrefix)
		if err := m.AddBitmap(ctx, d.node, gen, d.Format == "qcow2", false); err != nil {
			return gens, fmt.Errorf("vm %q disk %q: starting generation %q: %w", p.VM, pd.Name, gen, err)
		}
		gens[pd.Name] = gen
	}
	return gens, nil
}

// sincePrefix starts the name of the generations started at each failback
// point's commit.
const sincePrefix = "lifeboat-failback."

// removeBitmaps removes the bitmaps gens (by disk), those that are there.
func (p *Production) removeBitmaps(ctx context.Context, gens map[string]string) {
	for name, gen := range gens {
		d, n, err := p.node(ctx, name)
		if err != nil {
			p.log.Warn("a failback generation is left on the disk", "disk", name, "generation", gen, "err", err)
			continue
		}
		if _, ok := n.Bitmap(gen); !ok {
			continue
		}
		if err := p.daemon.Monitor().RemoveBitmap(ctx, d.node, gen); err != nil {
			p.log.Warn("a failback generation is left on the disk", "disk", name, "generation", gen, "err", err)
		}
	}
}

func (p *Production) closeClients() {
	for _, d := range p.disks {
		d.client.Close()
	}
}

// Close flushes the disks and stops the daemon cleanly (bitmaps are saved).
func (p *Production) Close(ctx context.Context) error {
	var errs []error
	for name, d := range p.disks {
		if err := d.client.Flush(ctx); err != nil {
			errs = append(errs, fmt.Errorf("vm %q disk %q: flush: %w", p.VM, name, err))
		}
	}
	p.closeClients()
	if err := p.daemon.Stop(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Hashes calls fn with the hash of every block of the disk that does not read
// as zeros, in order: what the disk holds, for a comparison by hashes when
// it has no record of its own writes. Only allocated extents are read.
func (p *Production) Hashes(ctx context.Context, name string, fn func(block int64, h lifeboat.Hash) error) error {
	d, ok := p.disks[name]
	if !ok {
		return fmt.Errorf("vm %q: no disk %q at production", p.VM, name)
	}
	if err := recovery.HashData(ctx, d.client, fn); err != nil {
		return fmt.Errorf("vm %q disk %q: %w", p.VM, name, err)
	}
	return nil
}

// Differing calls fn for each block, as a byte range, whose content differs
// between two block maps (block -> hash of a block that does not read as
// zeros; a block absent reads as zeros): the shared point's, from the
// recovery site's catalog, and the production disk's (Hashes). It is what
// production changed on its own when Changes has no record. A block either
// map holds as lifeboat.UnknownHash differs, whatever the other holds.
func Differing(point, production map[int64]lifeboat.Hash, fn func(off, length int64) error) error {
	for _, b := range slices.Sorted(maps.Keys(production)) {
		if h, ok := point[b]; !ok || h != production[b] || h == lifeboat.UnknownHash {
			if err := fn(b*lifeboat.BlockSize, lifeboat.BlockSize); err != nil {
				return err
			}
		}
	}
	for _, b := range slices.Sorted(maps.Keys(point)) {
		if _, ok := production[b]; !ok && !point[b].IsZero() {
			if err := fn(b*lifeboat.BlockSize, lifeboat.BlockSize); err != nil {
				return err
			}
		}
	}
	return nil
}

// Package protect runs replication cycles at the protected site: one consistent
// instant of every disk of a VM, then only what changed since the last point.
package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// VM is what the protected site knows of one VM: anything with a QMP socket and
// qcow2/raw disks (a qemu-system process, or a qemu-storage-daemon), or a
// libvirt domain.
type VM struct {
	Name      string
	QMPSocket string
	// Libvirt, when set, is the libvirt domain the VM is, reached through
	// libvirtd (QMPSocket and NBDSocket are then unused).
	Libvirt *LibvirtDomain
	// NBDSocket is the VM's running NBD server, if it has one (lifeboat adds
	// its exports there and never stops it); otherwise each cycle starts one
	// at WorkDir/lifeboat-nbd.sock and stops it at its end.
	NBDSocket string
	// Disks names the disks to protect (by disk name, see qemu.Disks, or by
	// node name); empty means every writable disk.
	Disks []string
	// WorkDir holds the fleece overlays while a cycle runs.
	WorkDir string
	// StateDir is the directory of lifeboat's own that holds WorkDir: for a
	// libvirt domain, lifeboat lets QEMU's user search the directories from
	// it down to WorkDir, which it owns; above it, it only checks.
	StateDir string
	// Definition is what the VM's config says of how to start it elsewhere:
	// each point carries what the VM itself tells, and this for the rest.
	Definition lifeboat.Definition
}

// LibvirtDomain names a libvirt domain.
type LibvirtDomain struct {
	URI    string // "" = qemu:///system
	Domain string
}

// Target is the recovery site as a cycle needs it; *wire.Client meets it.
type Target interface {
	// Peer names the recovery site, as its certificate does: the namespace of
	// the bitmap generations kept for it.
	Peer() string
	Latest(ctx context.Context, vm string) (lifeboat.Point, bool, error)
	BlockMap(ctx context.Context, vm, disk string) (map[int64]lifeboat.Hash, error)
	// Begin opens point p where it is kept.
	Begin(ctx context.Context, p lifeboat.Point) (lifeboat.PointSink, error)
	// Failover asks the recovery site to start the VM from point and take
	// it over: a planned migration's last step.
	Failover(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error)
}

// ChangedTarget is a Target whose copy of a disk may have changed on its own
// since the latest point it holds: failback's production disk, which the
// production VM wrote after the point the failover started from (invariant
// 5). An incremental cycle to it sends those blocks too, as this site holds
// them, so that none of the target's own writes survive the cycle.
type ChangedTarget interface {
	Target
	// TargetChanged calls fn for each byte range of the disk that the target
	// changed since its latest point. An error fails the cycle: a target that
	// cannot say what it changed is resynchronised by hashes instead.
	TargetChanged(ctx context.Context, vm, disk string, fn func(off, length int64) error) error
}

// Progress is what a long cycle reports as it goes.
type Progress struct {
	VM    string `json:"vm"`
	Point uint64 `json:"point"`
	Phase string `json:"phase"` // "snapshot", "send", "commit"
	// Done and Total are the bytes of changed blocks handled so far and in all.
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
	Sent  int64 `json:"sent"`
}

// Hooks let tests act at a cycle's steps (inject writes or faults).
type Hooks struct {
	// BeforeFleece runs once the disks are resolved and their generations
	// reconciled, before the fleece is made (the VM's topology may change
	// there).
	BeforeFleece func(ctx context.Context) error
	AfterInstant func(ctx context.Context) error
	AfterPlan    func(ctx context.Context) error
	BeforeCommit func(ctx context.Context) error
}

// Defaults of a Protector's pipeline, used where its fields are zero.
const (
	DefaultReaders     = 8
	DefaultChunkSize   = 1 << 20
	DefaultConnections = 4
)

// nbdPoll is how often a cycle waiting for another's NBD server tries again.
const nbdPoll = time.Second

// Protector runs cycles for one VM. Cycles of one Protector never overlap.
type Protector struct {
	VM       VM
	Target   Target
	Quiescer Quiescer
	Log      *slog.Logger
	// Readers is how many chunks are read, hashed and compressed at once (DefaultReaders).
	Readers int
	// ChunkSize is the largest run of blocks read and sent as one message.
	ChunkSize int
	// Connections is how many NBD connections read the fleece when the export allows it.
	Connections int
	Progress    func(Progress)
	Hooks       Hooks
	Safety      Safety
	// BusyWait bounds a cycle's wait for another tool's job to end: a
	// libvirt domain's job, or an NBD server lifeboat did not start in the
	// VM's QEMU (a libvirt pull backup's) when the VM has no nbd_socket
	// (DefaultBusyWait).
	BusyWait time.Duration
	// Whole makes the cycles send every disk whole, whatever the recovery
	// site holds: every allocated block read and sent, every other range
	// sent as zeros, so that the point holds the whole disk and shadows
	// whatever the replica's older images hold (the repair of a replica a
	// failing disk damaged: `lifeboat sync --whole`). It is cleared once
	// such a point is committed.
	Whole bool
	// StallLimit is how long a cycle waits for the VM's QEMU to answer,
	// its QMP greeting or one QMP command, or anything of the reads of its
	// fleece (NBD), before it takes it for hung and fails
	// (DefaultStallLimit). It bounds no total: a long initial sync whose
	// reads are answered goes on.
	StallLimit time.Duration

	mu sync.Mutex
	// hung, while set, says why mu is held by a failed cycle's cleanup
	// that waits for the VM's QEMU to answer (see detach).
	hung   atomic.Pointer[hangNote]
	warned map[string]bool
	nodes  map[string]string // disk name -> its node at the last cycle
}

func (p *Protector) log() *slog.Logger {
	if p.Log == nil {
		return slog.Default().With("vm", p.VM.Name)
	}
	return p.Log.With("vm", p.VM.Name)
}

// Cycle takes one restore point: the first is the initial sync of all allocated
// data, later ones send only what changed. It returns only when the recovery site
// has committed the point; on any error the source's change tracking is whole and
// the next cycle loses nothing.
func (p *Protector) Cycle(ctx context.Context) (lifeboat.Point, error) {
	if !p.mu.TryLock() {
		return lifeboat.Point{}, p.busy()
	}
	start := time.Now()
	c := &cycle{p: p, log: p.log()}
	defer func() {
		if !c.detached {
			p.mu.Unlock()
		}
	}()
	pt, err := c.run(ctx)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: %w", p.VM.Name, err)
	}
	c.committed()
	end := time.Now()
	attrs := []any{"consistency", pt.Consistency,
		"changed", pt.Stats.BytesChanged, "zero", pt.Stats.BytesZero, "sent", pt.Stats.BytesSent,
		"took", end.Sub(start).Round(time.Millisecond)}
	if !c.sendAt.IsZero() && !c.commitAt.IsZero() {
		ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
		attrs = append(attrs, "prepare", ms(c.sendAt.Sub(start)), "send", ms(c.commitAt.Sub(c.sendAt)), "commit", ms(end.Sub(c.commitAt)))
	}
	c.log.Info("point committed", attrs...)
	return pt, nil
}

// committed records at this site what a committed point settles: the whole
// send it was asked for is done, and the disks' images are where a failback
// writes (a group member's as well as a VM's own).
func (c *cycle) committed() {
	c.p.Whole = false
	if err := saveImages(c.p.VM.WorkDir, c.images); err != nil {
		c.log.Warn("recording the disks' images for a failback failed", "err", err)
	}
}

// diskState is one disk within one cycle.
type diskState struct {
	name       string // the disk's stable name: in points, logs, the wire
	node       string // its node now: for QMP
	file       string // the node's image
	size       int64
	persistent bool
	old        string // generation read for dirty blocks; "" = resync
	why        string // why a resync
	whole      bool   // sent whole (Protector.Whole): no block skipped by its hash
	new        string // generation this point's instant starts
	lineage    string // the disk's identity at the recovery site
	base       uint64 // the point the delta is computed from (0: none)
	export     string
	// dirty is the NBD meta context of the blocks changed since old ("":
	// QEMU's name for old's bitmap).
	dirty string
}

func (d *diskState) dirtyContext() string {
	if d.dirty != "" {
		return d.dirty
	}
	return "qemu:dirty-bitmap:" + d.old
}

func (p *Protector) warnOnce(key, msg string, args ...any) {
	if p.warned == nil {
		p.warned = map[string]bool{}
	}
	if !p.warned[key] {
		p.warned[key] = true
		p.log().Warn(msg, args...)
	}
}

// disks resolves the VM's protected disks, by their stable names (see
// qemu.Disks), to the nodes that hold them now, and says what lifeboat will do
// about disks whose change tracking cannot survive a VM restart.
func (p *Protector) disks(ctx context.Context, m *qemu.Monitor) ([]qemu.BlockNode, error) {
	all, err := m.Disks(ctx)
	if err != nil {
		return nil, fmt.Errorf("list disks: %w", err)
	}
	var nodes []qemu.BlockNode
	if len(p.VM.Disks) == 0 {
		if len(all) == 0 {
			return nil, fmt.Errorf("QMP %s shows no writable disk (no block device, or in a qemu-storage-daemon no block export): name the disks under `disks:` of vm %q in the config", p.VM.QMPSocket, p.VM.Name)
		}
		nodes = all
	} else {
		for _, name := range p.VM.Disks {
			n, byNode, err := qemu.FindDisk(all, name)
			switch {
			case err == nil && byNode:
				p.warnOnce("bynode-"+name, "`disks:` names a disk by its node name, which QEMU or libvirt may change at a restart: name it by its disk name instead",
					"node", name, "disk", n.Name)
			case err != nil:
				// A node no device or export uses, named in the config: it
				// is its own disk, named after the node.
				var nerr error
				if n, nerr = m.Node(ctx, name); nerr != nil {
					return nil, fmt.Errorf("disk %q: %w (check `disks:` of vm %q in the config)", name, err, p.VM.Name)
				}
				if n.ReadOnly {
					return nil, fmt.Errorf("disk %q: node %q is read-only, so no disk of a VM (check `disks:` of vm %q in the config)", name, n.NodeName, p.VM.Name)
				}
				n.Name = n.NodeName
			}
			nodes = append(nodes, n)
		}
		// A disk added to the VM is not protected until `disks:` names it:
		// say so, rather than leave it without a copy unnoticed.
		for _, n := range all {
			if !slices.ContainsFunc(nodes, func(s qemu.BlockNode) bool { return s.NodeName == n.NodeName }) {
				p.warnOnce("unnamed-"+n.Name, "the VM has a disk that `disks:` does not name: it is not replicated (add it under `disks:` of the VM in the config to protect it)",
					"disk", n.Name, "node", n.NodeName)
			}
		}
	}
	if p.nodes == nil {
		p.nodes = map[string]string{}
	}
	for _, n := range nodes {
		switch {
		case n.Driver == "qcow2" && n.Compat == "0.10":
			p.warnOnce(n.Name, "disk is a qcow2 v2 image, which cannot hold persistent bitmaps: change tracking lives in memory, and after a VM restart lifeboat resyncs the disk by comparing hashes (upgrade with `qemu-img amend -o compat=1.1`)", "disk", n.Name, "node", n.NodeName)
		case n.Driver != "qcow2":
			p.warnOnce(n.Name, "disk is not qcow2: its change tracking (bitmap) lives in memory only; after a VM restart lifeboat resyncs the disk by comparing hashes", "disk", n.Name, "node", n.NodeName, "driver", n.Driver)
		}
		if was, ok := p.nodes[n.Name]; ok && was != n.NodeName {
			p.log().Info("disk is held by another node now", "disk", n.Name, "node", n.NodeName, "was", was)
		}
		p.nodes[n.Name] = n.NodeName
		if !hasGeneration(n) && n.BackingFile != "" {
			if err := p.checkSnapshot(ctx, m, n); err != nil {
				return nil, err
			}
		}
	}
	return nodes, nil
}

// checkSnapshot says why a disk whose node carries no generation while its
// backing node does will be resynchronised: an external snapshot put a new node
// on top, and lifeboat's bitmaps stayed on the old one, where they miss every
// write since. They are not trusted; the hash resync is what is right.
func (p *Protector) checkSnapshot(ctx context.Context, m *qemu.Monitor, n qemu.BlockNode) error {
	all, err := m.Nodes(ctx)
	if err != nil {
		return fmt.Errorf("disk %q: %w", n.Name, err)
	}
	for _, b := range all {
		if b.Filename == n.BackingFile && b.NodeName != n.NodeName && hasGeneration(b) {
			p.log().Warn("disk has a new top node (an external snapshot?) and lifeboat's change tracking stayed on the old one, which misses the writes since: a hash resync will run",
				"disk", n.Name, "node", n.NodeName, "old_node", b.NodeName)
			return nil
		}
	}
	return nil
}

// hasGeneration reports whether the node carries one of lifeboat's bitmap generations.
func hasGeneration(n qemu.BlockNode) bool {
	for _, b := range n.Bitmaps {
		if strings.HasPrefix(b.Name, genPrefix) || strings.HasPrefix(b.Name, legacyPrefix) {
			return true
		}
	}
	return false
}

func persistentBitmaps(n qemu.BlockNode) bool { return n.Driver == "qcow2" && n.Compat != "0.10" }

// nbdServer returns the unix socket of the NBD server the cycle's fleece
// exports go on, and whether lifeboat started that server for this cycle
// (then the cycle stops it when its exports are gone: a server left running
// keeps anyone else, such as a libvirt pull backup, from starting theirs).
//
// QEMU runs one NBD server per process. With `nbd_socket:` the VM's own
// server is used and left alone. Otherwise lifeboat starts one in its work
// dir; if a server already runs, examineServer says whose: a dead lifeboat
// cycle's (killed, its state_dir since moved or its VM renamed) is stopped at
// once. Any other, another lifeboat's cycle under way or another tool's, the
// cycle waits for, polling, for at most BusyWait, then fails saying why (the
// next cycle tries again). It does not use that server: its owner stops it
// when done (libvirt at a backup's end), which closes every export on it,
// lifeboat's included, in the middle of a cycle.
func (p *Protector) nbdServer(ctx context.Context, m *qemu.Monitor) (sock string, started bool, err error) {
	if p.VM.NBDSocket != "" {
		return p.VM.NBDSocket, false, nil
	}
	sock = p.ownNBDSocket()
	wait := cmp0(p.BusyWait, DefaultBusyWait)
	deadline := time.Now().Add(wait)
	for waited := false; ; waited = true {
		err := m.NBDServerStart(ctx, sock)
		if err == nil {
			if waited {
				p.log().Info("the other NBD server stopped: the cycle goes on")
			}
			return sock, true, nil
		}
		if !errors.Is(err, qemu.ErrNBDServerRunning) {
			return "", false, fmt.Errorf("start NBD server in the VM's QEMU: %w", err)
		}
		srv := p.examineServer(m)
		if srv.over {
			if err := p.stopOver(ctx, m, srv); err != nil {
				return "", false, err
			}
			if err := m.NBDServerStart(ctx, sock); err == nil {
				return sock, true, nil
			}
		}
		if !waited {
			p.log().Warn(srv.waiting(), "wait", wait)
		}
		if time.Now().After(deadline) {
			return "", false, srv.busy(p, p.foreignJobs(ctx, m), wait)
		}
		select {
		case <-time.After(nbdPoll):
		case <-ctx.Done():
			return "", false, fmt.Errorf("waiting for the VM's QEMU to stop an NBD server lifeboat did not start: %w", context.Cause(ctx))
		}
	}
}

// foreignJobs names the block jobs of other tools that may explain a server
// lifeboat waits for.
func (p *Protector) foreignJobs(ctx context.Context, m *qemu.Monitor) string {
	var others []string
	jobs, _ := m.Jobs(ctx)
	for _, j := range jobs {
		if !strings.HasPrefix(j.ID, qemu.OwnPrefix) {
			others = append(others, fmt.Sprintf("%s %q", j.Type, j.ID))
		}
	}
	if len(others) == 0 {
		return "no block job runs"
	}
	return "block jobs of another tool run: " + strings.Join(others, ", ")
}

// ownNBDSocket is where lifeboat starts its NBD server when the config names none.
func (p *Protector) ownNBDSocket() string {
	if p.VM.NBDSocket != "" {
		return ""
	}
	return NBDSocketPath(p.VM.WorkDir)
}

// NBDSocketPath is where a cycle of a VM whose work dir is workDir starts
// its NBD server when the config names no nbd_socket.
func NBDSocketPath(workDir string) string { return filepath.Join(workDir, nbdSocketName) }

// ownNBDSockets are where a lifeboat may have started its NBD server in this
// VM's work dir, this version and the ones before.
func (p *Protector) ownNBDSockets() []string {
	if p.VM.NBDSocket != "" {
		return nil
	}
	return []string{p.ownNBDSocket(), filepath.Join(p.VM.WorkDir, legacyNBDSocketName)}
}

var errCommitUnknown = errors.New("commit outcome unknown")

// Package protect runs replication cycles at the protected site: one consistent
// instant of every disk of a VM, then only what changed since the last point.
package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// VM is what the protected site knows of one VM: anything with a QMP socket and
// qcow2/raw disks (a qemu-system process, or a qemu-storage-daemon).
type VM struct {
	Name      string
	QMPSocket string
	// NBDSocket is the VM's running NBD server, if it has one; otherwise lifeboat
	// starts one at WorkDir/nbd.sock.
	NBDSocket string
	// Disks names the disk nodes to protect; empty means every writable disk.
	Disks []string
	// WorkDir holds the fleece overlays while a cycle runs.
	WorkDir string
}

// Target is the recovery site as a cycle needs it; *wire.Client meets it.
type Target interface {
	Latest(ctx context.Context, vm string) (lifeboat.Point, bool, error)
	BlockMap(ctx context.Context, vm, disk string) (map[int64]lifeboat.Hash, error)
	Begin(ctx context.Context, p lifeboat.Point) (*wire.PointStream, error)
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

	mu     sync.Mutex
	warned map[string]bool
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
		return lifeboat.Point{}, fmt.Errorf("vm %q: a cycle is already running", p.VM.Name)
	}
	defer p.mu.Unlock()
	start := time.Now()
	c := &cycle{p: p, log: p.log()}
	pt, err := c.run(ctx)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q: %w", p.VM.Name, err)
	}
	c.log.Info("point committed", "consistency", pt.Consistency,
		"changed", pt.Stats.BytesChanged, "zero", pt.Stats.BytesZero, "sent", pt.Stats.BytesSent,
		"took", time.Since(start).Round(time.Millisecond))
	return pt, nil
}

// diskState is one disk within one cycle.
type diskState struct {
	node       string
	size       int64
	persistent bool
	old        string // generation read for dirty blocks; "" = resync
	why        string // why a resync
	new        string
	export     string
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

// disks resolves the VM's protected disks and says what lifeboat will do about
// disks whose change tracking cannot survive a VM restart.
func (p *Protector) disks(ctx context.Context, m *qemu.Monitor) ([]qemu.BlockNode, error) {
	var nodes []qemu.BlockNode
	if len(p.VM.Disks) == 0 {
		all, err := m.Disks(ctx)
		if err != nil {
			return nil, fmt.Errorf("list disks: %w", err)
		}
		if len(all) == 0 {
			return nil, fmt.Errorf("QMP %s shows no writable disk: name the disk nodes under `disks:` in the config", p.VM.QMPSocket)
		}
		nodes = all
	} else {
		for _, name := range p.VM.Disks {
			n, err := m.Node(ctx, name)
			if err != nil {
				return nil, fmt.Errorf("disk %q: %w (check `disks:` of vm %q in the config)", name, err, p.VM.Name)
			}
			nodes = append(nodes, n)
		}
	}
	for _, n := range nodes {
		switch {
		case n.Driver == "qcow2" && n.Compat == "0.10":
			p.warnOnce(n.NodeName, "disk is a qcow2 v2 image, which cannot hold persistent bitmaps: change tracking lives in memory, and after a VM restart lifeboat resyncs the disk by comparing hashes (upgrade with `qemu-img amend -o compat=1.1`)", "disk", n.NodeName)
		case n.Driver != "qcow2":
			p.warnOnce(n.NodeName, "disk is not qcow2: its change tracking (bitmap) lives in memory only; after a VM restart lifeboat resyncs the disk by comparing hashes", "disk", n.NodeName, "driver", n.Driver)
		}
	}
	return nodes, nil
}

func persistentBitmaps(n qemu.BlockNode) bool { return n.Driver == "qcow2" && n.Compat != "0.10" }

// nbdSocket makes sure the VM's QEMU runs an NBD server lifeboat can reach.
func (p *Protector) nbdSocket(ctx context.Context, m *qemu.Monitor) (string, error) {
	if p.VM.NBDSocket != "" {
		return p.VM.NBDSocket, nil
	}
	sock := filepath.Join(p.VM.WorkDir, "nbd.sock")
	if err := m.NBDServerStart(ctx, sock); err != nil {
		return "", fmt.Errorf("start NBD server in the VM's QEMU: %w", err)
	}
	if _, err := os.Stat(sock); err != nil {
		return "", fmt.Errorf("the VM's QEMU already runs an NBD server elsewhere: set `nbd_socket:` of vm %q in the config to its unix socket", p.VM.Name)
	}
	return sock, nil
}

var errCommitUnknown = errors.New("commit outcome unknown")

package protect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// Release takes out of the VM what protecting it for recovery site peer
// keeps there between cycles: the generations kept for peer (QMP dirty
// bitmaps, in the disks' images when persistent) or, under libvirt,
// lifeboat's checkpoints for peer with their bitmaps, hidden or not; and
// what a cycle cut off left behind (a fleece, an NBD server or export, a
// backup job of lifeboat's). Generations and checkpoints kept for another
// recovery site and every other tool's are left as they are. It says what
// it removed, and what of ours it could not remove and why, each named with
// its disk or domain.
//
// The VM must be running (its QEMU is where the bitmaps are changed);
// Release must not run beside a cycle of the VM (the daemon holds the VM's
// cycle lock). The recovery site's points are not touched: after Release
// the next cycle, if any, is a hash resync.
func (p *Protector) Release(ctx context.Context, peer string) (Released, error) {
	if peer == "" {
		return Released{}, fmt.Errorf("vm %q: release: no recovery site named", p.VM.Name)
	}
	if !p.mu.TryLock() {
		if p.hung.Load() != nil {
			return Released{}, fmt.Errorf("%w; release it after that", p.busy())
		}
		return Released{}, fmt.Errorf("vm %q: a cycle is running: release it after the cycle", p.VM.Name)
	}
	defer p.mu.Unlock()
	var r Released
	var err error
	if p.VM.Libvirt != nil {
		err = p.releaseLibvirt(ctx, peer, &r)
	} else {
		err = p.releaseQMP(ctx, peer, &r)
	}
	if err != nil {
		return r, fmt.Errorf("vm %q: %w", p.VM.Name, err)
	}
	return r, nil
}

// Released is what Release took out of a VM, and what it left there.
type Released struct {
	Removed []string `json:"removed,omitempty"`
	// Left is what of lifeboat's stays, each with why and what to do.
	Left []string `json:"left,omitempty"`
}

func (p *Protector) releaseQMP(ctx context.Context, peer string, r *Released) error {
	m, err := qemu.Dial(ctx, p.VM.QMPSocket)
	if err != nil {
		return fmt.Errorf("connect to QMP %s: %w (the VM must be running: its QEMU holds the change tracking; a shut-down VM's qcow2 images can be cleaned with `qemu-img info` and `qemu-img bitmap --remove IMAGE NAME` for each bitmap named lifeboat.…@%s)", p.VM.QMPSocket, err, peer)
	}
	defer m.Close()
	if _, err := m.RemoveStale(ctx, p.liveElsewhere, p.ownNBDSockets()...); err != nil {
		return err
	}
	disks, err := p.disks(ctx, m)
	if err != nil {
		return err
	}
	all, err := m.Nodes(ctx)
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	for _, d := range disks {
		// The disk's node and the nodes below it: an external snapshot
		// leaves the generations on the node it put a new one on top of.
		for _, n := range chainOf(d, all) {
			var actions []qemu.Action
			var names []string
			for _, b := range n.Bitmaps {
				if !ourGen(b.Name, peer) && !strings.HasPrefix(b.Name, legacyPrefix) {
					continue
				}
				if n.ReadOnly {
					// QEMU refuses to change a read-only node's bitmaps.
					r.Left = append(r.Left, fmt.Sprintf("disk %s: generation %s on read-only node %s (%s, below an external snapshot): it records nothing; it goes with the image, or with `qemu-img bitmap --remove %s %s` while the VM is shut down",
						d.Name, b.Name, n.NodeName, n.Filename, n.Filename, b.Name))
					continue
				}
				actions = append(actions, qemu.RemoveBitmapAction(n.NodeName, b.Name))
				names = append(names, b.Name)
			}
			if err := m.Transaction(ctx, actions...); err != nil {
				return fmt.Errorf("disk %q: remove generations %v from node %q: %w", d.Name, names, n.NodeName, err)
			}
			for _, name := range names {
				r.Removed = append(r.Removed, fmt.Sprintf("disk %s: generation %s (node %s)", d.Name, name, n.NodeName))
			}
		}
	}
	return nil
}

// chainOf is disk node d and the nodes of its backing chain, by file name.
func chainOf(d qemu.BlockNode, all []qemu.BlockNode) []qemu.BlockNode {
	chain := []qemu.BlockNode{d}
	seen := map[string]bool{d.NodeName: true}
	for cur := d; cur.BackingFile != ""; {
		i := slices.IndexFunc(all, func(n qemu.BlockNode) bool {
			return !seen[n.NodeName] && n.Filename == cur.BackingFile && n.Driver != "file"
		})
		if i < 0 {
			break
		}
		cur = all[i]
		seen[cur.NodeName] = true
		chain = append(chain, cur)
	}
	return chain
}

func (p *Protector) releaseLibvirt(ctx context.Context, peer string, r *Released) error {
	dl := p.VM.Libvirt
	conn, err := virt.Dial(ctx, dl.URI)
	if err != nil {
		return err
	}
	lv := &virtCycle{uri: dl.URI, conn: conn, log: p.log(),
		saved: filepath.Join(p.VM.WorkDir, "checkpoints"),
		sock:  filepath.Join(p.VM.WorkDir, "libvirt", "nbd.sock")}
	defer lv.close()
	if lv.dom, err = conn.Domain(ctx, dl.Domain); err != nil {
		return err
	}
	// A lifeboat that died mid-cycle left its backup running.
	if running, sock, err := lv.dom.BackupRunning(ctx); err != nil {
		return err
	} else if running && sock == lv.sock {
		if err := lv.endBackup(ctx); err != nil {
			return err
		}
		r.Removed = append(r.Removed, fmt.Sprintf("domain %s: lifeboat's backup job, left running by a cycle cut off", dl.Domain))
	}
	// No backup of ours runs now, so QEMU holds nothing in the scratch
	// directory; what a cycle cut off left there (its scratch files, which
	// libvirt leaves to lifeboat, and the socket of a QEMU that died) goes.
	run := filepath.Dir(lv.sock)
	left, _ := os.ReadDir(run)
	if err := os.RemoveAll(run); err != nil {
		return fmt.Errorf("remove lifeboat's backup scratch directory: %w", err)
	}
	for _, e := range left {
		r.Removed = append(r.Removed, fmt.Sprintf("domain %s: %s, left by a cycle cut off", dl.Domain, filepath.Join(run, e.Name())))
	}
	// libvirt deletes a checkpoint's bitmaps only from a running domain's
	// images: one that is off is said so, before anything is changed.
	var desc *virt.Description
	mustRun := func() (err error) {
		if desc != nil {
			return nil
		}
		if desc, err = lv.dom.Describe(ctx); err != nil {
			return fmt.Errorf("%w; libvirt removes lifeboat's checkpoints with their bitmaps only from a running domain (to leave it off instead, remove from each of its qcow2 images every bitmap named lifeboat.….%s: `qemu-img info IMAGE` names them, `qemu-img bitmap --remove IMAGE NAME` removes one)",
				err, cpNameUnsafe.ReplaceAllString(peer, "_"))
		}
		return nil
	}
	cps, err := lv.dom.Checkpoints(ctx)
	if err != nil {
		return err
	}
	for _, cp := range cps {
		if _, ok := ourCheckpoint(cp, peer); !ok {
			continue
		}
		if err := mustRun(); err != nil {
			return err
		}
		if err := lv.do(ctx, func(d *virt.Domain) error { return d.DeleteCheckpoint(ctx, cp.Name) }); err != nil {
			return fmt.Errorf("libvirt domain %q: delete checkpoint %q: %w", dl.Domain, cp.Name, err)
		}
		os.Remove(lv.record(cp.Name)) // a visible one may have a record too
		r.Removed = append(r.Removed, fmt.Sprintf("domain %s: checkpoint %s", dl.Domain, cp.Name))
	}
	records, err := lv.hidden()
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, cp := range records {
		if _, ok := ourCheckpoint(cp, peer); !ok {
			continue // kept for another recovery site
		}
		if err := mustRun(); err != nil {
			return err
		}
		if err := lv.drop(ctx, cp.Name); err != nil {
			return fmt.Errorf("libvirt domain %q: delete hidden checkpoint %q: %w", dl.Domain, cp.Name, err)
		}
		r.Removed = append(r.Removed, fmt.Sprintf("domain %s: checkpoint %s (hidden)", dl.Domain, cp.Name))
		// A disk taken out of the domain since (virsh detach-disk) took
		// the checkpoint's bitmap with it, beyond libvirt's reach.
		for _, disk := range cp.Disks {
			if !slices.ContainsFunc(desc.Disks, func(d virt.Disk) bool { return d.Target == disk }) {
				r.Left = append(r.Left, fmt.Sprintf("domain %s: disk %s is not among its writable disks any more: its image keeps bitmap %s, which libvirt cannot reach; `qemu-img bitmap --remove IMAGE %s` removes it while no VM has the image open",
					dl.Domain, disk, cp.Name, cp.Name))
			}
		}
	}
	return nil
}

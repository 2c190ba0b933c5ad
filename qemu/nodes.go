package qemu

import (
	"cmp"
	"context"
	"fmt"
	"sort"
	"strings"
)

// OwnPrefix starts the name of every node, job and export lifeboat creates, so
// they are never mistaken for the VM's disks and can be found after a crash.
const OwnPrefix = "lifeboat-"

// BlockNode is one node of QEMU's block graph.
type BlockNode struct {
	// Name is the disk's stable name when the node is a disk (see Disks): what
	// lifeboat calls the disk in points and logs. NodeName is what QMP calls
	// the node today, which may change at every restart.
	Name                       string
	NodeName, Driver, Filename string // driver: qcow2, raw, file, ...
	BackingFile                string // the backing image's file name, if any
	ReadOnly                   bool
	Size                       int64 // virtual size
	Bitmaps                    []Bitmap
	Compat                     string // qcow2 "0.10" (v2, no persistent bitmaps) or "1.1"; "" otherwise
}

// Bitmap is a dirty bitmap as QEMU reports it.
type Bitmap struct {
	Name         string
	Granularity  int64
	Count        int64 // dirty bytes
	Recording    bool  // enabled: new writes are being tracked
	Busy         bool  // in use by an export or job: cannot be changed
	Persistent   bool  // saved in the qcow2 at a clean exit
	Inconsistent bool  // QEMU died while it was in use: its content cannot be trusted
}

// Bitmap returns the node's bitmap of that name.
func (n BlockNode) Bitmap(name string) (Bitmap, bool) {
	for _, b := range n.Bitmaps {
		if b.Name == name {
			return b, true
		}
	}
	return Bitmap{}, false
}

// PersistentBitmaps reports whether the node can keep bitmaps across a QEMU
// restart: only qcow2 v3 (compat 1.1) can.
func (n BlockNode) PersistentBitmaps() bool { return n.Driver == "qcow2" && n.Compat != "0.10" }

type blockDeviceInfo struct {
	NodeName string `json:"node-name"`
	Drv      string `json:"drv"`
	File     string `json:"file"`
	Backing  string `json:"backing_file"`
	RO       bool   `json:"ro"`
	Image    struct {
		VirtualSize    int64 `json:"virtual-size"`
		FormatSpecific struct {
			Type string `json:"type"`
			Data struct {
				Compat string `json:"compat"`
			} `json:"data"`
		} `json:"format-specific"`
	} `json:"image"`
	DirtyBitmaps []struct {
		Name         string `json:"name"`
		Granularity  int64  `json:"granularity"`
		Count        int64  `json:"count"`
		Recording    bool   `json:"recording"`
		Busy         bool   `json:"busy"`
		Persistent   bool   `json:"persistent"`
		Inconsistent bool   `json:"inconsistent"`
	} `json:"dirty-bitmaps"`
}

func (i blockDeviceInfo) node() BlockNode {
	n := BlockNode{
		NodeName: i.NodeName, Driver: i.Drv, Filename: i.File, BackingFile: i.Backing, ReadOnly: i.RO,
		Size: i.Image.VirtualSize,
	}
	if i.Image.FormatSpecific.Type == "qcow2" {
		n.Compat = i.Image.FormatSpecific.Data.Compat
	}
	for _, b := range i.DirtyBitmaps {
		n.Bitmaps = append(n.Bitmaps, Bitmap{
			Name: b.Name, Granularity: b.Granularity, Count: b.Count, Recording: b.Recording,
			Busy: b.Busy, Persistent: b.Persistent, Inconsistent: b.Inconsistent,
		})
	}
	return n
}

// Nodes lists every named node of the block graph (query-named-block-nodes, flat).
func (m *Monitor) Nodes(ctx context.Context) ([]BlockNode, error) {
	var infos []blockDeviceInfo
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &infos); err != nil {
		return nil, err
	}
	nodes := make([]BlockNode, 0, len(infos))
	for _, i := range infos {
		nodes = append(nodes, i.node())
	}
	return nodes, nil
}

// Node returns the named node. If it does not exist the error lists the nodes
// that do.
func (m *Monitor) Node(ctx context.Context, name string) (BlockNode, error) {
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return BlockNode{}, err
	}
	return findNode(nodes, name)
}

func findNode(nodes []BlockNode, name string) (BlockNode, error) {
	var names []string
	for _, n := range nodes {
		if n.NodeName == name {
			return n, nil
		}
		if !strings.HasPrefix(n.NodeName, "#") {
			names = append(names, n.NodeName)
		}
	}
	sort.Strings(names)
	return BlockNode{}, fmt.Errorf("block node %q not found; the nodes are: %s", name, strings.Join(names, ", "))
}

// jobFilters are the drivers of the filter nodes block jobs insert above the
// node they work on (another tool's backup, a mirror, a commit): they are not
// the VM's disk but stand in front of it.
var jobFilters = map[string]bool{
	"copy-before-write": true, "backup-top": true, "mirror_top": true, "commit_top": true,
}

// blockInfo is a device's entry in query-block.
type blockInfo struct {
	Device   string `json:"device"` // a -drive's id; "" with -blockdev
	QDev     string `json:"qdev"`   // the device's id, or its QOM path
	Inserted *struct {
		NodeName string `json:"node-name"`
		RO       bool   `json:"ro"`
	} `json:"inserted"`
}

// name is the device's stable name: its qdev id (`-device ...,id=vda`; QEMU
// reports "/machine/peripheral/vda/virtio-backend" for virtio devices), else
// the -drive id, else "" (an anonymous device: only its node name is left).
func (b blockInfo) name() string {
	if b.QDev != "" && !strings.HasPrefix(b.QDev, "/") {
		return b.QDev
	}
	if rest, ok := strings.CutPrefix(b.QDev, "/machine/peripheral/"); ok {
		if id, _, _ := strings.Cut(rest, "/"); id != "" {
			return id
		}
	}
	return b.Device
}

// Disks lists the VM's writable disks, each with its stable Name and the
// format node that holds it now (NodeName), through stable QMP commands only:
//
//   - in a qemu-system, the disks are the nodes behind its guest devices
//     (query-block entries with a qdev; a -drive no device uses is none); a
//     disk's name is the device's qdev id (`-device virtio-blk-pci,id=vda`,
//     libvirt's "virtio-disk0"), else its -drive id, else its node name;
//   - in a qemu-storage-daemon (no devices), the disks are the nodes its block
//     exports serve (query-block-exports, which is how a VM reaches them); a
//     disk's name is the id of the export serving it (the smallest, if
//     several do). QEMU does not report an NBD export's name, so the id it is.
//
// Node names may change freely (libvirt renumbers them at a restart; an
// external snapshot puts a new node on top): the name stays, and the node is
// resolved again at every call. Lifeboat's own nodes and exports
// (OwnPrefix...) are skipped, read-only disks too, and a block job's filter in
// front of a disk (another tool's backup) is looked through to the disk's
// node. Another tool's nodes are no disks: a backup's target or a node no
// device or export uses, and a view of a disk (a pull backup's scratch node
// or a fleece, exported over NBD): a node whose backing is another disk's
// live node reads that disk's writes through it, so it is no disk of its own.
// (An external snapshot's backing is no live disk: QEMU makes it read-only.)
func (m *Monitor) Disks(ctx context.Context) ([]BlockNode, error) {
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var devs []blockInfo
	if err := m.Execute(ctx, "query-block", nil, &devs); err != nil {
		return nil, err
	}
	type root struct{ name, node string }
	var roots []root
	for _, d := range devs {
		if d.QDev == "" || d.Inserted == nil || d.Inserted.RO {
			continue // no guest device (a -drive alone), an empty drive, a cdrom
		}
		roots = append(roots, root{d.name(), d.Inserted.NodeName})
	}
	if len(devs) == 0 {
		// No devices: a qemu-storage-daemon, whose exports are the VM's disks.
		// (The exports of a qemu-system are other tools' views, such as a
		// libvirt pull backup's scratch node, and no disks.)
		exps, err := m.Exports(ctx)
		if err != nil {
			return nil, err
		}
		sort.Slice(exps, func(i, j int) bool { return exps[i].ID < exps[j].ID })
		for _, e := range exps {
			if !strings.HasPrefix(e.ID, OwnPrefix) && !e.ShuttingDown {
				roots = append(roots, root{e.ID, e.Node})
			}
		}
	}
	var found []BlockNode
	seen, files := map[string]bool{}, map[string]bool{}
	for _, r := range roots {
		n, ok := formatNode(nodes, r.node)
		if !ok || n.ReadOnly || strings.HasPrefix(n.NodeName, OwnPrefix) || seen[n.NodeName] {
			continue
		}
		seen[n.NodeName], files[n.Filename] = true, true
		n.Name = cmp.Or(r.name, n.NodeName)
		found = append(found, n)
	}
	var disks []BlockNode
	named := map[string]string{}
	for _, n := range found {
		if n.BackingFile != "" && files[n.BackingFile] {
			continue // a view of another disk (QEMU names a backing by its node's file name)
		}
		if other, dup := named[n.Name]; dup {
			// Only a device without an id, named after its node, can meet another's id.
			return nil, fmt.Errorf("two disks would be named %q (nodes %q and %q): give the device without an id one (`-device ...,id=NAME`)", n.Name, other, n.NodeName)
		}
		named[n.Name] = n.NodeName
		disks = append(disks, n)
	}
	sort.Slice(disks, func(i, j int) bool { return disks[i].Name < disks[j].Name })
	return disks, nil
}

// formatNode returns the node a device or export reads through name, looking
// through the filters block jobs insert. QEMU's stable commands do not list a
// node's children, but a filter reports its child's file name and size: the
// child is the node with both, preferring a format node over the protocol
// node under it (a raw image's file node has the same name and size).
func formatNode(nodes []BlockNode, name string) (BlockNode, bool) {
	// rank orders the candidates: a format node, a protocol node, another filter.
	rank := func(n *BlockNode) int {
		switch {
		case jobFilters[n.Driver]:
			return 0
		case protocolDrivers[n.Driver]:
			return 1
		}
		return 2
	}
	n, err := findNode(nodes, name)
	for depth := 0; err == nil && jobFilters[n.Driver] && depth < 8; depth++ {
		var best *BlockNode
		for i := range nodes {
			c := &nodes[i]
			if c.NodeName == n.NodeName || c.Filename != n.Filename || c.Size != n.Size || strings.HasPrefix(c.NodeName, OwnPrefix) {
				continue
			}
			if best == nil || rank(c) > rank(best) {
				best = c
			}
		}
		if best == nil {
			return BlockNode{}, false
		}
		n = *best
	}
	return n, err == nil && !jobFilters[n.Driver]
}

// protocolDrivers are drivers of nodes that reach storage, under a format node.
var protocolDrivers = map[string]bool{
	"file": true, "host_device": true, "host_cdrom": true, "nbd": true, "iscsi": true, "rbd": true,
	"nfs": true, "ssh": true, "gluster": true, "http": true, "https": true, "nvme": true, "io_uring": true,
}

// FindDisk returns the disk named name among disks: by its stable Name, or
// else by its current node name (as configs written before disks had stable
// names say). byNode tells which matched. If none does, the error lists the
// disks by both.
func FindDisk(disks []BlockNode, name string) (d BlockNode, byNode bool, err error) {
	for _, d := range disks {
		if d.Name == name {
			return d, false, nil
		}
	}
	for _, d := range disks {
		if d.NodeName == name {
			return d, true, nil
		}
	}
	var have []string
	for _, d := range disks {
		have = append(have, fmt.Sprintf("%s (node %s)", d.Name, d.NodeName))
	}
	if len(have) == 0 {
		have = []string{"none"}
	}
	return BlockNode{}, false, fmt.Errorf("no disk is named %q, by its name or its node name; the disks are: %s", name, strings.Join(have, ", "))
}

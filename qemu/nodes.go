package qemu

import (
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
	NodeName, Driver, Filename string // driver: qcow2, raw, file, ...
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
		NodeName: i.NodeName, Driver: i.Drv, Filename: i.File, ReadOnly: i.RO,
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

type blockGraph struct {
	Nodes []struct {
		ID   int64  `json:"id"`
		Type string `json:"type"` // block-backend, block-job, block-driver
		Name string `json:"name"`
	} `json:"nodes"`
	Edges []struct {
		Parent int64 `json:"parent"`
		Child  int64 `json:"child"`
	} `json:"edges"`
}

// jobFilters are the drivers of the filter nodes block jobs insert above the
// node they work on; they are not part of the VM's own graph.
var jobFilters = map[string]bool{
	"copy-before-write": true, "backup-top": true, "mirror_top": true, "commit_top": true,
}

// Disks lists the VM's writable disks: the format nodes at the top of the block
// graph, seen through the filters block jobs insert and ignoring lifeboat's
// own nodes (named OwnPrefix...). It reads x-debug-query-block-graph, which
// both qemu-system and qemu-storage-daemon answer (query-block would miss the
// nodes of a qemu-storage-daemon, which has no devices).
func (m *Monitor) Disks(ctx context.Context) ([]BlockNode, error) {
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var g blockGraph
	if err := m.Execute(ctx, "x-debug-query-block-graph", nil, &g); err != nil {
		return nil, err
	}
	byName := make(map[string]BlockNode, len(nodes))
	for _, n := range nodes {
		byName[n.NodeName] = n
	}
	type gnode struct {
		name    string
		drv     bool // a block-driver node
		parents []int64
	}
	gn := make(map[int64]*gnode, len(g.Nodes))
	for _, n := range g.Nodes {
		gn[n.ID] = &gnode{name: n.Name, drv: n.Type == "block-driver"}
	}
	for _, e := range g.Edges {
		if c := gn[e.Child]; c != nil {
			c.parents = append(c.parents, e.Parent)
		}
	}
	// transparent nodes are not the VM's: looking for a disk's parent, we look
	// through them to their own parents.
	transparent := func(n *gnode) bool {
		return strings.HasPrefix(n.name, OwnPrefix) || jobFilters[byName[n.name].Driver]
	}
	var hasVMParent func(n *gnode, depth int) bool
	hasVMParent = func(n *gnode, depth int) bool {
		if depth > 64 {
			return true // a cycle cannot be; be safe rather than loop
		}
		for _, pid := range n.parents {
			p := gn[pid]
			if p == nil || !p.drv {
				continue // backends, jobs and exports are users, not disks
			}
			if strings.HasPrefix(p.name, OwnPrefix) {
				continue // our fleece has the disk as backing
			}
			if !transparent(p) || hasVMParent(p, depth+1) {
				return true
			}
		}
		return false
	}
	var disks []BlockNode
	for _, n := range g.Nodes {
		c := gn[n.ID]
		if !c.drv || transparent(c) || hasVMParent(c, 0) {
			continue
		}
		bn, ok := byName[c.name]
		if !ok || bn.ReadOnly {
			continue
		}
		disks = append(disks, bn)
	}
	sort.Slice(disks, func(i, j int) bool { return disks[i].NodeName < disks[j].NodeName })
	return disks, nil
}

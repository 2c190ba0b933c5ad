package qemu

import (
	"cmp"
	"context"
	"fmt"

	"github.com/lifeboat-dr/lifeboat"
)

// bitmapGranularity is the granularity of a bitmap made without one: the
// block grid, so that one dirty bit is one lifeboat block.
const bitmapGranularity = lifeboat.BlockSize

// maxBitmapBits bounds the bits of one generation that TrackGranularity
// picks: 8 MiB of the VM's memory (a bitmap lives in its QEMU).
const maxBitmapBits = 64 << 20

// TrackGranularity is the granularity lifeboat tracks a disk of size bytes
// at: the finest power of two from lifeboat.SubBlock up to lifeboat.BlockSize
// whose bitmap stays within maxBitmapBits. A dirty bit finer than a block
// lets a cycle send only the parts of a block that a small write touched:
// 4 KiB up to 256 GiB, 16 KiB for 1 TiB, a whole block from 4 TiB.
func TrackGranularity(size int64) int64 {
	g := int64(lifeboat.SubBlock)
	for g < lifeboat.BlockSize && size/g > maxBitmapBits {
		g *= 2
	}
	return g
}

// AddBitmap adds a dirty bitmap (one generation) to a node, on the block
// grid. A persistent bitmap needs a qcow2 v3 node; a disabled one records
// nothing until enabled.
func (m *Monitor) AddBitmap(ctx context.Context, node, name string, persistent, disabled bool) error {
	return wrapBitmap(m.Execute(ctx, "block-dirty-bitmap-add", addBitmapArgs(node, name, persistent, disabled, 0), nil), node, name)
}

// addBitmapArgs are block-dirty-bitmap-add's; granularity 0 is the block grid's.
func addBitmapArgs(node, name string, persistent, disabled bool, granularity int64) map[string]any {
	return map[string]any{
		"node": node, "name": name, "granularity": cmp.Or(granularity, bitmapGranularity),
		"persistent": persistent, "disabled": disabled,
	}
}

// RemoveBitmap removes a bitmap (from the image too, if persistent).
func (m *Monitor) RemoveBitmap(ctx context.Context, node, name string) error {
	return wrapBitmap(m.Execute(ctx, "block-dirty-bitmap-remove", bitmapArgs(node, name), nil), node, name)
}

// EnableBitmap makes a bitmap record writes again.
func (m *Monitor) EnableBitmap(ctx context.Context, node, name string) error {
	return wrapBitmap(m.Execute(ctx, "block-dirty-bitmap-enable", bitmapArgs(node, name), nil), node, name)
}

// DisableBitmap freezes a bitmap: it keeps its bits and records no more writes.
func (m *Monitor) DisableBitmap(ctx context.Context, node, name string) error {
	return wrapBitmap(m.Execute(ctx, "block-dirty-bitmap-disable", bitmapArgs(node, name), nil), node, name)
}

// MergeBitmaps ORs the sources into target (all on the same node).
func (m *Monitor) MergeBitmaps(ctx context.Context, node, target string, sources ...string) error {
	return wrapBitmap(m.Execute(ctx, "block-dirty-bitmap-merge", mergeArgs(node, target, sources...), nil), node, target)
}

func bitmapArgs(node, name string) map[string]any { return map[string]any{"node": node, "name": name} }

func mergeArgs(node, target string, sources ...string) map[string]any {
	return map[string]any{"node": node, "target": target, "bitmaps": sources}
}

func wrapBitmap(err error, node, name string) error {
	if err != nil {
		return fmt.Errorf("node %q bitmap %q: %w", node, name, err)
	}
	return nil
}

// Action is one action of a QMP transaction, e.g.
// Action{"block-dirty-bitmap-add", map[string]any{"node": "vda", "name": "lb-2"}}.
type Action struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// Transaction runs the actions atomically: all of them happen, or none.
func (m *Monitor) Transaction(ctx context.Context, actions ...Action) error {
	if len(actions) == 0 {
		return nil
	}
	return m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
}

// Helpers that build transaction actions, so callers need not spell QMP.

// AddBitmapAction is block-dirty-bitmap-add as a transaction action.
func AddBitmapAction(node, name string, persistent, disabled bool) Action {
	return Action{"block-dirty-bitmap-add", addBitmapArgs(node, name, persistent, disabled, 0)}
}

// RemoveBitmapAction is block-dirty-bitmap-remove as a transaction action.
func RemoveBitmapAction(node, name string) Action {
	return Action{"block-dirty-bitmap-remove", bitmapArgs(node, name)}
}

// EnableBitmapAction is block-dirty-bitmap-enable as a transaction action.
func EnableBitmapAction(node, name string) Action {
	return Action{"block-dirty-bitmap-enable", bitmapArgs(node, name)}
}

// DisableBitmapAction is block-dirty-bitmap-disable as a transaction action.
func DisableBitmapAction(node, name string) Action {
	return Action{"block-dirty-bitmap-disable", bitmapArgs(node, name)}
}

// MergeBitmapsAction is block-dirty-bitmap-merge as a transaction action.
func MergeBitmapsAction(node, target string, sources ...string) Action {
	return Action{"block-dirty-bitmap-merge", mergeArgs(node, target, sources...)}
}

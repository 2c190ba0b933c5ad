package protect

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A generation is a dirty bitmap named after the point whose instant it starts
// from: "lifeboat-7" holds every write since point 7. The name is all a restart
// needs to know which changes a bitmap carries.
const genPrefix = "lifeboat-"

func genName(point uint64) string { return genPrefix + strconv.FormatUint(point, 10) }

func parseGen(name string) (uint64, bool) {
	s, ok := strings.CutPrefix(name, genPrefix)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// reconcile brings a disk's generations to a known state before a cycle, given the
// recovery site's latest point (0: none). It returns the generation to read dirty
// blocks from, or "" when the disk must be resynchronised, and why.
//
// The base is the newest consistent generation that starts at or before the latest
// point: it holds every write since then (a superset when it is older, as after a
// commit whose acknowledgement was lost). Leftovers of an interrupted cycle (newer
// generations) are merged into it, and it is enabled again, so no write is lost
// whatever moment the interruption hit.
func reconcile(ctx context.Context, m *qemu.Monitor, node string, bitmaps []qemu.Bitmap, latest uint64) (string, string, error) {
	var (
		base    *qemu.Bitmap
		baseGen uint64
	)
	if latest != 0 {
		for i := range bitmaps {
			n, ok := parseGen(bitmaps[i].Name)
			if ok && n <= latest && !bitmaps[i].Inconsistent && (base == nil || n > baseGen) {
				base, baseGen = &bitmaps[i], n
			}
		}
	}
	var newer, discard []string
	for _, b := range bitmaps {
		n, ok := parseGen(b.Name)
		switch {
		case !ok || (base != nil && b.Name == base.Name):
		case base != nil && n > baseGen && !b.Inconsistent:
			newer = append(newer, b.Name)
		default:
			discard = append(discard, b.Name)
		}
	}
	for _, name := range discard {
		if err := m.RemoveBitmap(ctx, node, name); err != nil {
			return "", "", fmt.Errorf("remove stale generation %q: %w", name, err)
		}
	}
	if base == nil {
		if latest == 0 {
			return "", "initial sync: the recovery site has no point of this VM", nil
		}
		return "", fmt.Sprintf("no consistent change-tracking bitmap covers point %d (VM restarted, raw disk, or unclean QEMU exit): a hash resync will run", latest), nil
	}
	// Enable first, then merge: every write lands in base from here on.
	if !base.Recording {
		if err := m.EnableBitmap(ctx, node, base.Name); err != nil {
			return "", "", fmt.Errorf("re-enable generation %q: %w", base.Name, err)
		}
	}
	if len(newer) > 0 {
		if err := m.MergeBitmaps(ctx, node, base.Name, newer...); err != nil {
			return "", "", fmt.Errorf("merge %v into generation %q: %w", newer, base.Name, err)
		}
		for _, name := range newer {
			if err := m.RemoveBitmap(ctx, node, name); err != nil {
				return "", "", fmt.Errorf("remove merged generation %q: %w", name, err)
			}
		}
	}
	return base.Name, "", nil
}

// rollback undoes a failed cycle's generations: old (if any) records again and
// holds everything new held, and new is gone. With no old generation the disk
// is resynchronised next time anyway, so new is simply removed.
func rollback(ctx context.Context, m *qemu.Monitor, node, old, new string) error {
	if old != "" {
		if err := m.EnableBitmap(ctx, node, old); err != nil {
			return fmt.Errorf("re-enable generation %q: %w", old, err)
		}
		if err := m.MergeBitmaps(ctx, node, old, new); err != nil {
			return fmt.Errorf("merge generation %q into %q: %w", new, old, err)
		}
	}
	if err := m.RemoveBitmap(ctx, node, new); err != nil {
		return fmt.Errorf("remove generation %q: %w", new, err)
	}
	return nil
}

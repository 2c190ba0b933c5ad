package protect

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// genPrefix starts every generation's name (see lifeboat.NewGeneration).
const genPrefix = lifeboat.GenerationPrefix

// legacyPrefix named generations before lineages ("lifeboat-7"): they prove
// nothing and are removed.
const legacyPrefix = "lifeboat-"

// ourGen reports whether a bitmap is a generation kept for the recovery site peer.
func ourGen(name, peer string) bool {
	return strings.HasPrefix(name, genPrefix) && strings.HasSuffix(name, "@"+peer)
}

// newGeneration names the generation a cycle of point id starts.
func newGeneration(peer, lineage string, id uint64) string {
	return lifeboat.NewGeneration(peer, lineage, id)
}

// newLineage makes the identity of a disk at its first sync.
func newLineage() string { return randomHex(8) }

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// genPoint returns the point number in a generation name of lineage's kept
// for peer, and whether the name is one.
func genPoint(name, peer, lineage string) (uint64, bool) {
	rest, ok := strings.CutPrefix(name, genPrefix+lineage+".")
	if !ok {
		return 0, false
	}
	if rest, ok = strings.CutSuffix(rest, "@"+peer); !ok {
		return 0, false
	}
	num, _, ok := strings.Cut(rest, ".")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(num, 10, 64)
	return n, err == nil
}

// history is what the recovery site's latest point says of one disk.
type history struct {
	peer    string // the recovery site: the namespace of our generations
	lineage string
	latest  uint64 // the latest point holding the disk (0: none)
	gen     string // the generation that point started ("" if it records none)
	size    int64  // the disk's size at that point (0: none)
}

// resizedWhy says why a disk whose size changed since the latest point is
// resynchronised, or "" when it did not change. A shrink drops the writes in
// what it cut off from every generation, and a grow after it adds clean bits:
// the generations cannot show whether a shrink happened, so any size change
// costs a hash resync (a resize resets VMware's change tracking too). A shrink
// and a grow back to the very same size between two cycles leaves no trace at
// all (docs/ARCHITECTURE.md).
func resizedWhy(h history, now int64) string {
	if h.latest == 0 || h.size == 0 || now == 0 || h.size == now {
		return ""
	}
	return fmt.Sprintf("the disk's size changed from %d to %d bytes since point %d, and change tracking cannot show whether it shrank in between (a shrink forgets the writes it cut off): a hash resync will run", h.size, now, h.latest)
}

// movedWhy says why a disk whose change tracking lives in its node's memory
// (a raw disk, a qcow2 v2) is resynchronised when the node reads another image
// than was, the one it read at the VM's last committed cycle here, or "". A
// generation in memory belongs to the node, not to the image: a node reopened
// onto another file (blockdev-reopen) keeps its name and its generations, which
// then describe the writes to an image it no longer reads. A generation in a
// qcow2 v3 travels inside its image, so a moved or copied image keeps the
// history it carries, and a swapped one carries another's.
func movedWhy(h history, n qemu.BlockNode, was string) string {
	if h.latest == 0 || was == "" || n.Filename == was || persistentBitmaps(n) {
		return ""
	}
	return fmt.Sprintf("the disk's node %q reads image %s, not %s as at the last committed point, and its change tracking lives in the node's memory, not in the image (the node was reopened onto another file?): a hash resync will run", n.NodeName, n.Filename, was)
}

// reconcile brings a disk's generations to a known state before a cycle. It
// returns the generation to read dirty blocks from, or "" when the disk must
// be resynchronised, and why.
//
// The base is the generation the latest point started, and only it: that
// name proves the disk still carries the history the recovery site holds.
// It must be consistent, and recording, or disabled with a newer generation
// of the same lineage beside it (a cycle interrupted after its instant):
// those are merged into it, and it is enabled again, so no write is lost
// whatever moment the interruption hit. Every other generation of ours (other
// lineages, older or unprovable ones, those of an older lifeboat) is removed.
// A disk the caller has a reason to resynchronise (force: resizedWhy, a
// whole send) is resynchronised whatever its generations prove.
func reconcile(ctx context.Context, m *qemu.Monitor, node string, bitmaps []qemu.Bitmap, h history, force string) (string, string, error) {
	base, newer, discard, why := changeRecord(bitmaps, h)
	if why == "" {
		why = force
	}
	if why != "" {
		if base != nil {
			discard = append(discard, base.Name)
		}
		discard = append(discard, newer...)
		base, newer = nil, nil
	}
	for _, name := range discard {
		if err := m.RemoveBitmap(ctx, node, name); err != nil {
			return "", "", fmt.Errorf("remove stale generation %q: %w", name, err)
		}
	}
	if base == nil {
		return "", why, nil
	}
	// One transaction: the newer generations merged into base, base enabled,
	// the newer ones removed, all or nothing. Done step by step, a merge that
	// failed (another tool removed a newer generation meanwhile) left base
	// recording and trusted without the writes the newer one held.
	var actions []qemu.Action
	if len(newer) > 0 {
		actions = append(actions, qemu.MergeBitmapsAction(node, base.Name, newer...))
	}
	if !base.Recording {
		actions = append(actions, qemu.EnableBitmapAction(node, base.Name))
	}
	for _, name := range newer {
		actions = append(actions, qemu.RemoveBitmapAction(node, name))
	}
	if len(actions) > 0 {
		if err := m.Transaction(ctx, actions...); err != nil {
			return "", "", fmt.Errorf("merge %v into generation %q and enable it: %w", newer, base.Name, err)
		}
	}
	return base.Name, "", nil
}

// changeRecord picks, among a disk's bitmaps, the generations that together
// hold every write since the instant of h's latest point: the generation that
// point started and the newer ones of its lineage (a cycle interrupted after
// its instant). why says, when they cannot prove it, what is missing;
// discard is every other generation of ours, and of older lifeboats.
func changeRecord(bitmaps []qemu.Bitmap, h history) (base *qemu.Bitmap, newer, discard []string, why string) {
	for i, b := range bitmaps {
		switch {
		case strings.HasPrefix(b.Name, legacyPrefix):
			discard = append(discard, b.Name)
		case !ourGen(b.Name, h.peer):
			// Not ours: another deployment's or another tool's.
		case h.gen != "" && b.Name == h.gen:
			base = &bitmaps[i]
		default:
			if n, ok := genPoint(b.Name, h.peer, h.lineage); ok && h.latest != 0 && n > h.latest && !b.Inconsistent {
				newer = append(newer, b.Name)
			} else {
				discard = append(discard, b.Name)
			}
		}
	}
	switch {
	case h.latest == 0:
		why = "initial sync: the recovery site has no point of this disk"
	case h.gen == "":
		why = fmt.Sprintf("point %d records no change-tracking generation (it was made by an older lifeboat): a hash resync will run", h.latest)
	case base == nil:
		why = fmt.Sprintf("generation %q that point %d started is not on the disk (the disk was restored from a copy, reverted or replaced, the VM restarted with a raw disk, or another tool removed the bitmap): a hash resync will run", h.gen, h.latest)
	case base.Inconsistent:
		why = fmt.Sprintf("generation %q is inconsistent after an unclean QEMU exit: a hash resync will run", h.gen)
	case !base.Recording && len(newer) == 0:
		why = fmt.Sprintf("generation %q was disabled with no newer generation holding the writes since, so it cannot prove it saw every write: a hash resync will run", h.gen)
	}
	return base, newer, discard, why
}

// ChangeRecord names the bitmaps of a disk whose union holds every write since
// the instant of point latest, kept for the site peer: the generation gen
// that the point started, then the newer ones of lineage. When they cannot
// prove it (gone, inconsistent after a crash, disabled with nothing newer),
// names is nil and why says what is missing. Failback asks it of the
// production disk: what it wrote after the last point it sent.
func ChangeRecord(bitmaps []qemu.Bitmap, peer, lineage string, latest uint64, gen string) (names []string, why string) {
	base, newer, _, why := changeRecord(bitmaps, history{peer: peer, lineage: lineage, latest: latest, gen: gen})
	if why != "" {
		return nil, why
	}
	return append([]string{base.Name}, newer...), ""
}

// rollback undoes a failed cycle's generations: old (if any) records again and
// holds everything new held, and new is gone, in one transaction. Should it
// fail (new is gone: another tool removed it), old stays disabled, and the
// next cycle, finding it disabled with nothing newer, resyncs: step by step,
// old was enabled before the merge failed and trusted without new's writes.
// With no old generation the disk is resynchronised next time anyway, so new
// is simply removed.
func rollback(ctx context.Context, m *qemu.Monitor, node, old, new string) error {
	if old == "" {
		if err := m.RemoveBitmap(ctx, node, new); err != nil {
			return fmt.Errorf("remove generation %q: %w", new, err)
		}
		return nil
	}
	err := m.Transaction(ctx, qemu.MergeBitmapsAction(node, old, new), qemu.EnableBitmapAction(node, old), qemu.RemoveBitmapAction(node, new))
	if err != nil {
		return fmt.Errorf("merge generation %q back into %q and enable it: %w", new, old, err)
	}
	return nil
}

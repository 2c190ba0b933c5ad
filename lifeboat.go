// Package lifeboat holds the domain of a disaster-recovery system for QEMU/KVM
// virtual machines: restore points, their consistency, and the fixed block grid
// on which every disk is hashed, sent and verified.
package lifeboat

import (
	"encoding/hex"
	"fmt"
	"math/bits"
	"strings"
	"time"

	"github.com/zeebo/blake3"
)

// BlockSize is the grid on which disks are tracked, hashed, sent and verified.
// It matches the default dirty-bitmap granularity and qcow2 cluster size, so a
// dirty bit is one block and a block never straddles two clusters.
const BlockSize = 64 << 10

// SubBlock is the unit in which a block's changed parts are tracked and sent:
// a small write dirties the sub-blocks it touches, not its whole block (random
// 4-64 KiB writes dirty 2.7 times their bytes in whole blocks, 1.0 times in
// sub-blocks). A block's hash is still of the whole block.
const SubBlock = 4 << 10

// Dirty is a set of one block's sub-blocks: bit i is bytes [i*SubBlock,
// (i+1)*SubBlock) of the block.
type Dirty uint16

// AllDirty is every sub-block of a block.
const AllDirty Dirty = 1<<(BlockSize/SubBlock) - 1

// DirtyOf is the set of sub-blocks that bytes [lo, hi) of a block touch.
func DirtyOf(lo, hi int64) Dirty {
	if hi <= lo {
		return 0
	}
	a, b := max(lo, 0)/SubBlock, min((hi+SubBlock-1)/SubBlock, BlockSize/SubBlock)
	return Dirty((1<<b - 1) &^ (1<<a - 1))
}

// Ranges are the byte ranges [start, end) of the set, ascending and apart,
// in a block of n bytes (the disk's last block may be short).
func (d Dirty) Ranges(n int) [][2]int {
	var out [][2]int
	for i := 0; i < BlockSize/SubBlock; {
		if d&(1<<i) == 0 {
			i++
			continue
		}
		j := i
		for j < BlockSize/SubBlock && d&(1<<j) != 0 {
			j++
		}
		if lo := i * SubBlock; lo < n {
			out = append(out, [2]int{lo, min(j*SubBlock, n)})
		}
		i = j
	}
	return out
}

// Bytes is how many bytes the set covers in a block of n bytes.
func (d Dirty) Bytes(n int) int {
	if n >= BlockSize {
		return bits.OnesCount16(uint16(d)) * SubBlock
	}
	t := 0
	for _, r := range d.Ranges(n) {
		t += r[1] - r[0]
	}
	return t
}

// Gather appends to dst the set's bytes of block, range after range.
func (d Dirty) Gather(dst, block []byte) []byte {
	for _, r := range d.Ranges(len(block)) {
		dst = append(dst, block[r[0]:r[1]]...)
	}
	return dst
}

// Split checks that data holds the set's bytes of a block of n bytes, range
// after range (a patch), and returns each range's offset in the block with
// its bytes.
func (d Dirty) Split(n int, data []byte) ([]Part, error) {
	var parts []Part
	p := 0
	for _, r := range d.Ranges(n) {
		l := r[1] - r[0]
		if p+l > len(data) {
			break
		}
		parts = append(parts, Part{Off: int64(r[0]), Data: data[p : p+l]})
		p += l
	}
	if want := d.Bytes(n); len(parts) == 0 || p != len(data) || p != want {
		return nil, fmt.Errorf("a patch of %d bytes for %d changed in a block of %d", len(data), want, n)
	}
	return parts, nil
}

// Part is one range of a patch: its offset in the block and its bytes.
type Part struct {
	Off  int64
	Data []byte
}

// Hash is the BLAKE3-256 content hash of one block.
type Hash [32]byte

// ZeroHash marks a block that reads as zeros. It is not the hash of zeros: a
// zero block is sent and stored as a zero range, never as bytes.
var ZeroHash Hash

// UnknownHash marks a block whose content a recovery site cannot vouch for:
// a size change of the disk altered it (the short last block of the smaller
// size) and no later write recorded it. It is no block's hash (BLAKE3 gives
// all ones with odds of 2^-256), so whoever compares a block with it finds
// them different and sends or reads the block.
var UnknownHash = func() (h Hash) {
	for i := range h {
		h[i] = 0xff
	}
	return h
}()

// HashBlock returns the content hash of one block's bytes.
func HashBlock(b []byte) Hash { return Hash(blake3.Sum256(b)) }

// Mismatch returns the offset in data of the first block that does not match
// its hash in hashes (one per block, the last block possibly short), or -1
// when every block does.
func Mismatch(data []byte, hashes []Hash) int64 {
	for i, h := range hashes {
		lo := int64(i) * BlockSize
		if HashBlock(data[lo:min(lo+BlockSize, int64(len(data)))]) != h {
			return lo
		}
	}
	return -1
}

// IsZero reports whether h marks a zero block.
func (h Hash) IsZero() bool { return h == ZeroHash }

func (h Hash) String() string {
	if h.IsZero() {
		return "zero"
	}
	if h == UnknownHash {
		return "unknown"
	}
	return hex.EncodeToString(h[:8])
}

// AllZero reports whether b holds only zero bytes.
func AllZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Consistency is how consistent a restore point's instant is.
type Consistency string

const (
	// Crash is what a power cut leaves: every write acknowledged before the
	// instant is in the point, nothing after it.
	Crash Consistency = "crash"
	// Filesystem means the guest's file systems were frozen at the instant.
	Filesystem Consistency = "filesystem"
	// Application means the guest's and the host's application hooks ran
	// around the freeze too.
	Application Consistency = "application"
)

// ParseConsistency checks a consistency level named in config or on the wire.
func ParseConsistency(s string) (Consistency, error) {
	switch c := Consistency(s); c {
	case Crash, Filesystem, Application:
		return c, nil
	case "":
		return Crash, nil
	}
	return "", fmt.Errorf("unknown consistency %q: use crash, filesystem or application", s)
}

// Point is one restore point of one VM at the recovery site.
type Point struct {
	VM      string    `json:"vm"`
	ID      uint64    `json:"id"`
	Instant time.Time `json:"instant"`
	// LocalInstant is the instant by the clock of the recovery site that
	// holds the point (Instant is by the protected site's, which may be
	// minutes off): Instant brought within what that site saw of the
	// cycle, from its Begin less the cycle's Duration up to its Begin.
	// Zero in a point recorded before it was.
	LocalInstant time.Time   `json:"local_instant,omitzero"`
	Consistency  Consistency `json:"consistency"`
	Group        string      `json:"group,omitempty"`
	// Site is the protected site that sent the point (its certificate's name).
	Site   string        `json:"site,omitempty"`
	Disks  []PointDisk   `json:"disks"`
	Stats  CycleStats    `json:"stats"`
	Freeze time.Duration `json:"freeze_ns,omitempty"`
	// Note says why the point is less consistent than asked, if it is.
	Note string `json:"note,omitempty"`
	// Definition is how to start the VM as it was at this point.
	Definition *Definition `json:"definition,omitempty"`
	// Tested is the last test failover of this point whose guest agent
	// answered: proof that the point boots.
	Tested *TestMark `json:"tested,omitempty"`
	// Damaged says that a verify found a block this point reads damaged
	// (nil: none found, or a verify passed since).
	Damaged *DamageMark `json:"damaged,omitempty"`
}

// Age is how old the point's data is at now, by the clock of the site
// that holds it (LocalInstant, where there is one).
func (p Point) Age(now time.Time) time.Duration {
	if !p.LocalInstant.IsZero() {
		return now.Sub(p.LocalInstant)
	}
	return now.Sub(p.Instant)
}

// GroupName is the consistency group of a point's group tag (NAME@INSTANT,
// Point.Group): the points of one group instant share the whole tag.
func GroupName(tag string) string {
	if i := strings.LastIndexByte(tag, '@'); i >= 0 {
		return tag[:i]
	}
	return tag
}

// DamageMark records that a point does not read as it was written: the
// verify of a point found a block damaged that this point reads from the
// same image, or an image it reads is gone.
type DamageMark struct {
	Disk   string    `json:"disk"`
	Offset int64     `json:"offset"` // the damaged block's
	Point  uint64    `json:"point"`  // the point whose verify found it
	At     time.Time `json:"at"`
	// Missing, when set, is an image of the point's chain that is gone
	// (found by the recovery site's start), not a block: Offset and Point
	// say nothing then.
	Missing string `json:"missing,omitempty"`
}

// TestMark records a test failover of a point.
type TestMark struct {
	At        time.Time     `json:"at"`
	Run       string        `json:"run"`
	ToRunning time.Duration `json:"to_running_ns"` // the command to QEMU running
	ToAgent   time.Duration `json:"to_agent_ns"`   // the command to the guest agent answering
}

// PointDisk is one disk of a point.
type PointDisk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
	// File is the qcow2 image (top of the chain) that holds the point's view of the disk.
	File string `json:"file,omitempty"`
	// Resync is set when the disk was sent whole (initial sync or lost change tracking).
	Resync bool `json:"resync,omitempty"`
	// Lineage is the disk's identity at this recovery site: made at its first
	// sync and carried by every later point and bitmap generation of the disk.
	Lineage string `json:"lineage,omitempty"`
	// Base is the point this disk's delta was computed from (0: none, the disk
	// was sent whole onto an empty image); a recovery site takes a delta only
	// onto its latest point.
	Base uint64 `json:"base,omitempty"`
	// BaseGeneration is the bitmap generation the delta's dirty blocks came
	// from ("" for a resync): the generation the base point started.
	BaseGeneration string `json:"base_generation,omitempty"`
	// Generation is the bitmap generation this point's instant started on the
	// source: the next delta is taken from it, and only from it.
	Generation string `json:"generation,omitempty"`
	// Whole is set, by the recovery site, when this point wrote every block
	// of the disk into its own image (as data or zeros, no patch), so that
	// nothing of it reads through the points below but zeros: `lifeboat sync
	// --whole`. Retention drops the points below it without a merge, which a
	// damaged older image cannot pass.
	Whole bool `json:"whole,omitempty"`
}

// CycleStats counts what a cycle did.
type CycleStats struct {
	// BytesChanged is the size of the blocks the cycle had to consider (dirty, or
	// allocated on a full sync), zero blocks included.
	BytesChanged int64 `json:"bytes_changed"`
	// BytesZero is the part of BytesChanged that was zero and sent as ranges.
	BytesZero int64 `json:"bytes_zero"`
	// BytesSame is the part skipped because the recovery site already held it (hash resync).
	BytesSame int64 `json:"bytes_same,omitempty"`
	// BytesDedup is the part sent as references to identical blocks already
	// sent in the same point (deduplication).
	BytesDedup int64 `json:"bytes_dedup,omitempty"`
	// BytesData is the part sent as block data (before compression).
	BytesData int64 `json:"bytes_data"`
	// BytesSent is what crossed the wire for block data and hashes, after compression.
	BytesSent int64         `json:"bytes_sent"`
	Duration  time.Duration `json:"duration_ns"`
}

// Add accumulates o into s (durations excepted).
func (s *CycleStats) Add(o CycleStats) {
	s.BytesChanged += o.BytesChanged
	s.BytesZero += o.BytesZero
	s.BytesSame += o.BytesSame
	s.BytesDedup += o.BytesDedup
	s.BytesData += o.BytesData
	s.BytesSent += o.BytesSent
}

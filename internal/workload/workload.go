// Package workload is a stand-in guest: it writes to a VM's disks through their
// NBD exports (random data, patterns, zeros, discards) and hashes them whole.
// The demo, the tests and the benchmarks share it.
package workload

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
)

// Disk is one disk the guest writes to: an NBD export of the VM.
type Disk struct {
	Name string // export name
	Size int64
}

// Guest writes to disks. Not safe for concurrent use.
type Guest struct {
	disks   []Disk
	clients map[string]*nbd.Client
	rng     *rand.Rand
	buf     []byte
}

// Open connects to each disk's export on the VM's NBD server (a unix socket).
func Open(ctx context.Context, socket string, seed uint64, disks ...Disk) (*Guest, error) {
	g := &Guest{disks: disks, clients: map[string]*nbd.Client{}, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), buf: make([]byte, 4<<20)}
	for _, d := range disks {
		c, err := nbd.Dial(ctx, "unix:"+socket, d.Name, nbd.Options{})
		if err != nil {
			g.Close()
			return nil, fmt.Errorf("guest: open disk %q: %w", d.Name, err)
		}
		g.clients[d.Name] = c
	}
	return g, nil
}

// Close disconnects from every disk.
func (g *Guest) Close() {
	for _, c := range g.clients {
		c.Close()
	}
}

// Client is the NBD connection to one disk.
func (g *Guest) Client(disk string) *nbd.Client { return g.clients[disk] }

// Fill writes random data over the first share of each disk, in 1 MiB pieces.
func (g *Guest) Fill(ctx context.Context, share float64) error {
	for _, d := range g.disks {
		end := int64(float64(d.Size) * share)
		for off := int64(0); off < end; off += 1 << 20 {
			b := g.buf[:min(1<<20, end-off)]
			Random(g.rng, b)
			if err := g.clients[d.Name].Write(ctx, b, off, false); err != nil {
				return fmt.Errorf("guest: write %s at %d: %w", d.Name, off, err)
			}
		}
	}
	return nil
}

// Op is one guest write.
type Op struct {
	Disk   string
	Kind   string // "data", "pattern", "zero", "trim"
	Offset int64
	Length int64
}

// Touched is, by disk, every block of the grid that one of ops touched.
func Touched(ops []Op) map[string]map[int64]bool {
	out := map[string]map[int64]bool{}
	for _, op := range ops {
		if out[op.Disk] == nil {
			out[op.Disk] = map[int64]bool{}
		}
		for b := op.Offset / lifeboat.BlockSize; b*lifeboat.BlockSize < op.Offset+op.Length; b++ {
			out[op.Disk][b] = true
		}
	}
	return out
}

// TouchedBytes is the size of the blocks of the grid that ops touched.
func TouchedBytes(ops []Op) int64 {
	n := int64(0)
	for _, blocks := range Touched(ops) {
		n += int64(len(blocks)) * lifeboat.BlockSize
	}
	return n
}

// Mixed performs n writes: random data, a byte pattern, zeros or a discard, of
// 4 KiB to 4 MiB at aligned and unaligned offsets, on random disks.
func (g *Guest) Mixed(ctx context.Context, n int) ([]Op, error) {
	ops := make([]Op, 0, n)
	for range n {
		d := g.disks[g.rng.IntN(len(g.disks))]
		length := min(int64(4<<10)<<g.rng.IntN(11), d.Size)
		off := g.rng.Int64N(d.Size - length + 1)
		if g.rng.IntN(2) == 0 {
			off &^= 4<<10 - 1
		} else if g.rng.IntN(2) == 0 {
			length = max(length-int64(g.rng.IntN(4096)), 1) // unaligned length too
		}
		kinds := []string{"zero", "trim", "pattern", "data", "data", "data", "data", "data"}
		op := Op{Disk: d.Name, Kind: kinds[g.rng.IntN(len(kinds))], Offset: off, Length: length}
		if err := g.Do(ctx, op); err != nil {
			return ops, err
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// Small performs writes of random data, 4 to 64 KiB each at 4 KiB-aligned
// offsets, until total bytes are written; the incremental benchmark's workload.
// record, unless nil, is given each write after it is done (data is the
// guest's buffer: copy what must be kept).
func (g *Guest) Small(ctx context.Context, total int64, record func(op Op, data []byte)) error {
	for done := int64(0); done < total; {
		d := g.disks[g.rng.IntN(len(g.disks))]
		length := int64(4<<10) * int64(1+g.rng.IntN(16))
		off := g.rng.Int64N(d.Size-length+1) &^ (4<<10 - 1)
		op := Op{Disk: d.Name, Kind: "data", Offset: off, Length: length}
		if err := g.Do(ctx, op); err != nil {
			return err
		}
		if record != nil {
			record(op, g.buf[:length])
		}
		done += length
	}
	return nil
}

// Do performs one write.
func (g *Guest) Do(ctx context.Context, op Op) error {
	c := g.clients[op.Disk]
	var err error
	switch op.Kind {
	case "zero":
		err = c.WriteZeroes(ctx, op.Offset, op.Length, 0)
	case "trim":
		err = c.Trim(ctx, op.Offset, op.Length)
	case "pattern":
		b := g.buf[:op.Length]
		for i := range b {
			b[i] = byte(op.Offset>>12) ^ 0x5a
		}
		err = c.Write(ctx, b, op.Offset, false)
	default:
		b := g.buf[:op.Length]
		Random(g.rng, b)
		err = c.Write(ctx, b, op.Offset, false)
	}
	if err != nil {
		return fmt.Errorf("guest: %s %s at %d+%d: %w", op.Kind, op.Disk, op.Offset, op.Length, err)
	}
	return nil
}

// RunFor performs mixed writes for a while.
func (g *Guest) RunFor(ctx context.Context, d time.Duration) error {
	for end := time.Now().Add(d); time.Now().Before(end); {
		if _, err := g.Mixed(ctx, 1); err != nil {
			return err
		}
	}
	return nil
}

// Hashes reads every disk whole and returns its SHA-256 by disk name.
func (g *Guest) Hashes(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	for _, d := range g.disks {
		h := sha256.New()
		for off := int64(0); off < d.Size; off += int64(len(g.buf)) {
			b := g.buf[:min(int64(len(g.buf)), d.Size-off)]
			if err := g.clients[d.Name].Read(ctx, b, off); err != nil {
				return nil, fmt.Errorf("guest: read %s at %d: %w", d.Name, off, err)
			}
			h.Write(b)
		}
		out[d.Name] = hex.EncodeToString(h.Sum(nil))
	}
	return out, nil
}

// Random fills b with pseudo-random bytes (incompressible).
func Random(r *rand.Rand, b []byte) {
	i := 0
	for ; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		b[i], b[i+1], b[i+2], b[i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		b[i+4], b[i+5], b[i+6], b[i+7] = byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
	for ; i < len(b); i++ {
		b[i] = byte(r.Uint32())
	}
}

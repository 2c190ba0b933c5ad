package protect

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// changedTarget says it changed the ranges given, or fails.
type changedTarget struct {
	Target
	ranges [][2]int64
	err    error
}

func (c changedTarget) Peer() string { return "prod" }

func (c changedTarget) TargetChanged(_ context.Context, _, _ string, fn func(off, length int64) error) error {
	for _, r := range c.ranges {
		if err := fn(r[0], r[1]); err != nil {
			return err
		}
	}
	return c.err
}

// The target's own changes join the blocks to handle, whole blocks, the short
// last block counted by its size; a range off the disk or a target that
// cannot say fails the plan with the target's name.
func TestAddTargetChanges(t *testing.T) {
	const size = 10*lifeboat.BlockSize + 512
	newPlan := func() *diskPlan {
		nb := int64(11)
		pl := &diskPlan{disk: &diskState{name: "vda"}, size: size, blocks: nb, dirty: newBitset(nb), data: newBitset(nb)}
		pl.dirty.set(0)
		pl.count()
		return pl
	}
	pl := newPlan()
	err := pl.addTargetChanges(context.Background(), "vm1", changedTarget{ranges: [][2]int64{
		{lifeboat.BlockSize + 1, 1}, {3 * lifeboat.BlockSize, 2 * lifeboat.BlockSize}, {size - 1, 1}}})
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < pl.blocks; i++ {
		if want := i == 0 || i == 1 || i == 3 || i == 4 || i == 10; pl.dirty.has(i) != want {
			t.Errorf("block %d: to handle %v, want %v", i, pl.dirty.has(i), want)
		}
	}
	if want := int64(4*lifeboat.BlockSize + 512); pl.changed != want {
		t.Errorf("changed %d bytes, want %d", pl.changed, want)
	}
	for name, ct := range map[string]changedTarget{
		"past the end": {ranges: [][2]int64{{size - 1, 2}}},
		"negative":     {ranges: [][2]int64{{-lifeboat.BlockSize, lifeboat.BlockSize}}},
		"empty":        {ranges: [][2]int64{{0, 0}}},
		"failing":      {err: errors.New("bitmap inconsistent")},
	} {
		err := newPlan().addTargetChanges(context.Background(), "vm1", ct)
		if err == nil || !strings.Contains(err.Error(), "what prod changed on its own") {
			t.Errorf("%s: %v, want an error naming the target", name, err)
		}
	}
}

// The spans an incremental plan asks the allocation of cover every dirty
// block and only runs of them, are sorted and apart, and are at most the
// limit, for random bitsets (seed logged; replay with LIFEBOAT_SEED).
func TestBitsetSpans(t *testing.T) {
	seed := testenv.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	for round := range 300 {
		n := int64(1 + rng.IntN(5000))
		b := newBitset(n)
		// Runs of random lengths, dense or sparse.
		density := rng.Float64()
		for i := int64(0); i < n; {
			l := int64(1 + rng.IntN(200))
			if rng.Float64() < density {
				b.setRange(i, min(i+l, n))
			}
			i += l + int64(rng.IntN(100))
		}
		limit := 1 + rng.IntN(50)
		spans := b.spans(n, limit)
		if len(spans) > limit {
			t.Fatalf("round %d: %d spans, limit %d", round, len(spans), limit)
		}
		covered := newBitset(n)
		for k, sp := range spans {
			if sp[0] >= sp[1] || sp[1] > n || !b.has(sp[0]) || !b.has(sp[1]-1) {
				t.Fatalf("round %d: span %v does not start and end at dirty blocks (of %d)", round, sp, n)
			}
			if k > 0 && sp[0] <= spans[k-1][1] {
				t.Fatalf("round %d: span %v overlaps or touches %v", round, sp, spans[k-1])
			}
			covered.setRange(sp[0], sp[1])
		}
		for i := range n {
			if b.has(i) && !covered.has(i) {
				t.Fatalf("round %d: dirty block %d in no span %v", round, i, spans)
			}
		}
	}
	// With room for them, the runs themselves, joined when closer than 16 blocks.
	b := newBitset(300)
	b.setRange(0, 64)
	b.setRange(64, 130) // across a word boundary: one run
	b.setRange(140, 141)
	b.setRange(200, 299)
	if got, want := fmt.Sprint(b.spans(300, 100)), "[[0 141] [200 299]]"; got != want {
		t.Errorf("spans = %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(b.spans(300, 1)), "[[0 299]]"; got != want {
		t.Errorf("spans with limit 1 = %s, want %s", got, want)
	}
}

// A generation finer than the block grid marks the blocks its extents cover
// whole as whole and the others by the sub-blocks they touch, as a model of
// every sub-block says, for extents of any alignment; a block the target
// changed on its own is whole whatever the generation said of it.
func TestMarkDirtySubBlocks(t *testing.T) {
	seed := testenv.Seed(t)
	r := rand.New(rand.NewPCG(seed, 0))
	const nb = 40
	for round := range 200 {
		size := int64(nb * lifeboat.BlockSize)
		if r.IntN(2) == 0 {
			size -= 1 + r.Int64N(lifeboat.BlockSize-1) // a short last block
		}
		blocks := (size + lifeboat.BlockSize - 1) / lifeboat.BlockSize
		pl := &diskPlan{disk: &diskState{name: "vda"}, size: size, blocks: blocks, dirty: newBitset(blocks), data: newBitset(blocks)}
		model := make([]lifeboat.Dirty, blocks)
		// Ascending, disjoint extents, as a block-status reply gives them.
		for off := r.Int64N(3 * lifeboat.SubBlock); off < size; {
			unit := []int64{512, lifeboat.SubBlock, 16 << 10}[r.IntN(3)]
			length := (1 + r.Int64N(40)) * unit
			if r.IntN(5) == 0 {
				length = (1 + r.Int64N(4)) * lifeboat.BlockSize
			}
			pl.markDirty(off, length)
			for sb := off / lifeboat.SubBlock; sb*lifeboat.SubBlock < min(off+length, size); sb++ {
				model[sb*lifeboat.SubBlock/lifeboat.BlockSize] |= 1 << (sb % (lifeboat.BlockSize / lifeboat.SubBlock))
			}
			off += length + r.Int64N(6)*unit
		}
		var whole [2]int64
		if round%2 == 1 {
			whole[0] = r.Int64N(blocks)
			whole[1] = whole[0] + 1 + r.Int64N(blocks-whole[0])
			pl.markWhole(whole[0], whole[1])
		}
		for b := range blocks {
			n := int(min(lifeboat.BlockSize, size-b*lifeboat.BlockSize))
			want := model[b]
			if b >= whole[0] && b < whole[1] {
				want = lifeboat.AllDirty
			}
			if pl.dirty.has(b) != (want != 0) {
				t.Fatalf("seed %d round %d: block %d dirty %v, model %016b", seed, round, b, pl.dirty.has(b), want)
			}
			got, part := pl.partial[b]
			if wantPart := want != 0 && want.Bytes(n) != n; part != wantPart || (part && got != want) {
				t.Fatalf("seed %d round %d: block %d of %d bytes: partial %v %016b, model %016b", seed, round, b, n, part, got, want)
			}
		}
	}
}

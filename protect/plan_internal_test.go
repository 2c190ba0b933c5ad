package protect

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
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

package protect

import (
	"slices"
	"testing"
)

func TestShareOut(t *testing.T) {
	for _, tc := range []struct {
		pool int64
		caps []int64
		want []int64
	}{
		{100, []int64{1000}, []int64{100}},
		{100, []int64{1000, 1000}, []int64{50, 50}},
		{100, []int64{10, 1000}, []int64{10, 90}},         // the small disk leaves the rest
		{100, []int64{10, 1000, 20}, []int64{10, 70, 20}}, // in any order
		{100, []int64{40, 45, 1000}, []int64{33, 33, 33}}, // no cap reached
		{100, []int64{30, 30}, []int64{30, 30}},           // all capped
	} {
		if got := shareOut(tc.pool, tc.caps); !slices.Equal(got, tc.want) {
			t.Errorf("shareOut(%d, %v) = %v, want %v", tc.pool, tc.caps, got, tc.want)
		}
	}
}

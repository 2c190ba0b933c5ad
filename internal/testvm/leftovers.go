package testvm

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// AssertNoLeftovers checks that QEMU holds nothing of a fleece: no node or
// export of lifeboat's, no copy-before-write filter, no block job at all.
func AssertNoLeftovers(t testing.TB, m *qemu.Monitor) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	left, err := Leftovers(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range left {
		t.Errorf("%s left behind", l)
	}
}

// Leftovers says what QEMU holds of a fleece (see AssertNoLeftovers), one
// entry a thing; none when it holds nothing.
func Leftovers(ctx context.Context, m *qemu.Monitor) ([]string, error) {
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var left []string
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, qemu.OwnPrefix) || n.Driver == "copy-before-write" {
			left = append(left, fmt.Sprintf("node %s (%s)", n.NodeName, n.Driver))
		}
	}
	jobs, err := m.Jobs(ctx)
	if err != nil {
		return nil, err
	}
	for _, j := range jobs {
		left = append(left, fmt.Sprintf("job %s (%s)", j.ID, j.Type))
	}
	exports, err := m.Exports(ctx)
	if err != nil {
		return nil, err
	}
	for _, e := range exports {
		if strings.HasPrefix(e.ID, qemu.OwnPrefix) {
			left = append(left, "export "+e.ID)
		}
	}
	return left, nil
}

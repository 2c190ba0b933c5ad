package testvm

import (
	"context"
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
	nodes, err := m.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, qemu.OwnPrefix) || n.Driver == "copy-before-write" {
			t.Errorf("node %s (%s) left behind", n.NodeName, n.Driver)
		}
	}
	jobs, err := m.Jobs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, j := range jobs {
		t.Errorf("job %s (%s) left behind", j.ID, j.Type)
	}
	exports, err := m.Exports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range exports {
		if strings.HasPrefix(e.ID, qemu.OwnPrefix) {
			t.Errorf("export %s left behind", e.ID)
		}
	}
}

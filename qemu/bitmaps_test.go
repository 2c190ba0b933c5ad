package qemu_test

import (
	"context"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func bitmap(t *testing.T, ctx context.Context, m *qemu.Monitor, node, name string) (qemu.Bitmap, bool) {
	t.Helper()
	n, err := m.Node(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	return n.Bitmap(name)
}

func TestBitmapLifecycle(t *testing.T) {
	for _, tc := range []struct {
		format     string
		persistent bool
	}{
		{"qcow2", true},
		{"raw", false},
	} {
		t.Run(tc.format, func(t *testing.T) {
			vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: tc.format, Size: 4 << 20})
			m, ctx := vm.Monitor(), testCtx(t)
			uri := vm.NBDURI("vda")

			if err := m.AddBitmap(ctx, "vda", "g1", tc.persistent, false); err != nil {
				t.Fatal(err)
			}
			if err := m.AddBitmap(ctx, "vda", "g2", tc.persistent, true); err != nil {
				t.Fatal(err)
			}
			qemuIO(t, false, uri, "write -P 1 0 64k")
			b1, _ := bitmap(t, ctx, m, "vda", "g1")
			b2, _ := bitmap(t, ctx, m, "vda", "g2")
			if b1.Count != 64<<10 || !b1.Recording || b1.Granularity != lifeboat.BlockSize || b1.Persistent != tc.persistent {
				t.Errorf("g1 after a 64k write = %+v; want count 65536, recording, granularity %d, persistent %v", b1, lifeboat.BlockSize, tc.persistent)
			}
			if b2.Count != 0 || b2.Recording {
				t.Errorf("disabled g2 after a write = %+v; want count 0, not recording", b2)
			}

			if err := m.DisableBitmap(ctx, "vda", "g1"); err != nil {
				t.Fatal(err)
			}
			if err := m.EnableBitmap(ctx, "vda", "g2"); err != nil {
				t.Fatal(err)
			}
			qemuIO(t, false, uri, "write -P 2 1M 128k")
			b1, _ = bitmap(t, ctx, m, "vda", "g1")
			b2, _ = bitmap(t, ctx, m, "vda", "g2")
			if b1.Count != 64<<10 || b1.Recording {
				t.Errorf("g1 disabled = %+v; want it frozen at 65536", b1)
			}
			if b2.Count != 128<<10 || !b2.Recording {
				t.Errorf("g2 enabled = %+v; want 131072 recording", b2)
			}

			if err := m.MergeBitmaps(ctx, "vda", "g1", "g2"); err != nil {
				t.Fatal(err)
			}
			if b1, _ = bitmap(t, ctx, m, "vda", "g1"); b1.Count != 192<<10 {
				t.Errorf("g1 after merging g2 = %+v; want count 196608", b1)
			}

			if err := m.RemoveBitmap(ctx, "vda", "g2"); err != nil {
				t.Fatal(err)
			}
			if _, ok := bitmap(t, ctx, m, "vda", "g2"); ok {
				t.Error("g2 still there after RemoveBitmap")
			}
			err := m.RemoveBitmap(ctx, "vda", "g2")
			if err == nil || !strings.Contains(err.Error(), `"g2"`) {
				t.Errorf("removing a missing bitmap: err = %v, want an error naming it", err)
			}
		})
	}
}

func TestPersistentBitmapOnRawIsRefused(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "raw", Size: 1 << 20})
	if err := vm.Monitor().AddBitmap(testCtx(t), "vda", "g1", true, false); err == nil {
		t.Fatal("a persistent bitmap on a raw node was accepted")
	}
}

func TestTransactionIsAtomic(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	m, ctx := vm.Monitor(), testCtx(t)
	err := m.Transaction(ctx,
		qemu.AddBitmapAction("vda", "g1", true, false),
		qemu.DisableBitmapAction("vda", "missing"),
	)
	if err == nil {
		t.Fatal("transaction with a missing bitmap succeeded")
	}
	if _, ok := bitmap(t, ctx, m, "vda", "g1"); ok {
		t.Error("failed transaction left g1 behind")
	}
}

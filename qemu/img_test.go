package qemu_test

import (
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func TestCreateAndReadImageInfo(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	dir, ctx := t.TempDir(), testCtx(t)
	for _, tc := range []struct {
		name, format string
		opts         []string
		wantCompat   string
	}{
		{"v3.qcow2", "qcow2", nil, "1.1"},
		{"v2.qcow2", "qcow2", []string{"compat=0.10"}, "0.10"},
		{"d.raw", "raw", nil, ""},
		{"d.vmdk", "vmdk", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			if err := qemu.CreateImage(ctx, p, tc.format, 3<<20, "", "", tc.opts...); err != nil {
				t.Fatal(err)
			}
			info, err := qemu.ReadImageInfo(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			if info.Format != tc.format || info.VirtualSize != 3<<20 || info.Compat != tc.wantCompat || info.BackingFile != "" || info.Corrupt || info.Dirty {
				t.Errorf("info = %+v; want format %s, size %d, compat %q", info, tc.format, 3<<20, tc.wantCompat)
			}
		})
	}
	if _, err := qemu.ReadImageInfo(ctx, filepath.Join(dir, "missing")); err == nil {
		t.Error("info of a missing file succeeded")
	}
	if err := qemu.CreateImage(ctx, filepath.Join(dir, "x"), "no-such-format", 1<<20, "", ""); err == nil {
		t.Error("create with an unknown format succeeded")
	}
}

// TestImageChainOperations walks a chain through Convert, Compare, Commit and
// RebaseUnsafe, checking the guest-visible content after each.
func TestImageChainOperations(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-io")
	ctx := testCtx(t)
	// Relative paths in, absolute backing names out.
	dir := t.TempDir()
	t.Chdir(dir)
	if err := qemu.CreateImage(ctx, "base.qcow2", "qcow2", 1<<20, "", ""); err != nil {
		t.Fatal(err)
	}
	if err := qemu.CreateImage(ctx, "top.qcow2", "qcow2", 0, "base.qcow2", "qcow2"); err != nil {
		t.Fatal(err)
	}
	info, err := qemu.ReadImageInfo(ctx, "top.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if info.BackingFile != filepath.Join(dir, "base.qcow2") || info.VirtualSize != 1<<20 {
		t.Errorf("top info = %+v; want absolute backing %s and the backing's size", info, filepath.Join(dir, "base.qcow2"))
	}
	io := func(img string, cmds ...string) {
		t.Helper()
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		if out, err := runTool(t, "qemu-io", append(args, img)...); err != nil {
			t.Fatalf("qemu-io %v %s: %v: %s", cmds, img, err, out)
		}
	}
	io("base.qcow2", "write -P 1 0 64k")
	io("top.qcow2", "write -P 2 64k 64k")

	for _, format := range []string{"raw", "qcow2", "vmdk", "vdi", "vhdx"} {
		dst := "flat." + format
		if err := qemu.Convert(ctx, "top.qcow2", "qcow2", dst, format); err != nil {
			t.Fatal(err)
		}
		if eq, err := qemu.Compare(ctx, "top.qcow2", dst); err != nil || !eq {
			t.Errorf("Compare(top, %s) = %v, %v; want equal", dst, eq, err)
		}
	}
	if eq, err := qemu.Compare(ctx, "base.qcow2", "top.qcow2"); err != nil || eq {
		t.Errorf("Compare(base, top) = %v, %v; want different", eq, err)
	}
	if _, err := qemu.Compare(ctx, "base.qcow2", "missing.qcow2"); err == nil {
		t.Error("Compare with a missing image succeeded")
	}

	if err := qemu.Commit(ctx, "top.qcow2", false); err != nil {
		t.Fatal(err)
	}
	io("base.qcow2", "read -P 1 0 64k", "read -P 2 64k 64k")
	if eq, err := qemu.Compare(ctx, "base.qcow2", "flat.raw"); err != nil || !eq {
		t.Errorf("after commit Compare(base, flat) = %v, %v; want equal", eq, err)
	}
	io("top.qcow2", "read -P 2 64k 64k") // -d: top kept as it was

	// Rebase top onto the flat copy of the same content: data unchanged.
	if err := qemu.RebaseUnsafe(ctx, "top.qcow2", "flat.qcow2", "qcow2"); err != nil {
		t.Fatal(err)
	}
	info, _ = qemu.ReadImageInfo(ctx, "top.qcow2")
	if info.BackingFile != filepath.Join(dir, "flat.qcow2") {
		t.Errorf("backing after rebase = %q", info.BackingFile)
	}
	io("top.qcow2", "read -P 1 0 64k", "read -P 2 64k 64k")
	if err := qemu.RebaseUnsafe(ctx, "top.qcow2", "", ""); err != nil {
		t.Fatal(err)
	}
	info, _ = qemu.ReadImageInfo(ctx, "top.qcow2")
	if info.BackingFile != "" {
		t.Errorf("backing after removing it = %q", info.BackingFile)
	}
	io("top.qcow2", "read -P 0 0 64k", "read -P 2 64k 64k")
}

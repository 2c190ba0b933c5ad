package protect_test

import (
	"bytes"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Bad input gets a clear error that names the thing and what to do; disks whose
// change tracking cannot survive a restart are protected with a warning that
// says what lifeboat will do.
func TestDiskProblemsAreExplained(t *testing.T) {
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: "old", Format: "qcow2", Size: 8 << 20, Compat: "0.10"},
		testvm.DiskSpec{Name: "flat", Format: "raw", Size: 8 << 20})
	site := testsite.Start(t, recovery.Options{})
	var logs bytes.Buffer
	newP := func(v protect.VM) *protect.Protector {
		v.Name, v.WorkDir = "vm1", testsite.ShortDir(t)
		return &protect.Protector{VM: v, Target: site.Dial(t, wire.CompressionNone),
			Log: slog.New(slog.NewTextHandler(&logs, nil))}
	}
	cases := []struct {
		name string
		vm   protect.VM
		want []string
	}{
		{"missing QMP socket", protect.VM{QMPSocket: filepath.Join(t.TempDir(), "gone.qmp")}, []string{"gone.qmp", "is the VM running"}},
		{"unknown disk node", protect.VM{QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket(), Disks: []string{"vdz"}}, []string{`"vdz"`, "disks:"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newP(tc.vm).Cycle(ctx(t))
			if err == nil {
				t.Fatal("cycle succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	t.Run("qcow2 v2 and raw disks", func(t *testing.T) {
		p := newP(protect.VM{QMPSocket: vm.QMPSocket(), NBDSocket: vm.NBDSocket()})
		pt, err := p.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		if len(pt.Disks) != 2 {
			t.Fatalf("point has %d disks, want both discovered", len(pt.Disks))
		}
		for _, w := range []string{"qcow2 v2", "compat=1.1", "not qcow2", "resyncs the disk by comparing hashes"} {
			if !strings.Contains(logs.String(), w) {
				t.Fatalf("log does not explain %q:\n%s", w, logs.String())
			}
		}
		// Both disks keep in-memory tracking: the next cycle is incremental.
		pt, err = p.Cycle(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range pt.Disks {
			if d.Resync {
				t.Fatalf("disk %s resynced although its in-memory bitmap is alive", d.Name)
			}
		}
	})
}

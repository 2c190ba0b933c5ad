package failover

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// A lifeboat killed while a failover starts (after Start pins the VM,
// before it records the run) leaves a pin that no run names. At the next
// start ReleaseCrashedStarts releases it, killing the start's QEMU if it is
// still paused before the guest's first instruction, and retention goes on.
// A QEMU of such a start whose guest runs keeps its pin: it reads the chain.
//
// The crash is the one part not driven for real: the test leaves what
// Start leaves at that moment (its pin, directory and overlay, and a real
// qemu-system started by startQEMU), since a process cannot be killed at
// an exact step.
func TestReleaseCrashedStarts(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon", "qemu-system-x86_64")
	for _, tt := range []struct {
		name     string
		qemu     bool // Start got as far as QEMU, paused (-S)
		resumed  bool // and its guest ran
		released bool
	}{
		{name: "before QEMU", released: true},
		{name: "QEMU before the first instruction", qemu: true, released: true},
		{name: "QEMU whose guest runs", qemu: true, resumed: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			st, m := twoPointSite(ctx, t)

			// What a failover start of point 2 leaves when lifeboat dies.
			r := &Run{VM: "vm1", Point: 2, ID: "vm1-2-failover-" + nonce(), Overlays: map[string]string{}, disks: []lifeboat.DefinitionDisk{{Name: "vda"}}}
			m.place(r)
			if err := os.MkdirAll(r.Dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := st.AddPin(ctx, "vm1", r.ID, recovery.Pin{Point: 2, Reason: r.Kind(), Since: time.Now()}); err != nil {
				t.Fatal(err)
			}
			base, err := st.ImagePath("vm1", 2, "vda")
			if err != nil {
				t.Fatal(err)
			}
			r.Overlays["vda"] = filepath.Join(r.Dir, "disk-0.qcow2")
			if err := qemu.CreateImage(ctx, r.Overlays["vda"], "qcow2", 0, base, "qcow2"); err != nil {
				t.Fatal(err)
			}
			if tt.qemu {
				if err := m.startQEMU(ctx, r, &lifeboat.Definition{MemoryMiB: 64}); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { m.kill(r) })
				if tt.resumed {
					if err := m.resume(ctx, r); err != nil {
						t.Fatal(err)
					}
				}
			}
			commitPoint(ctx, t, st, "vm1", 3) // retention waits for the pin
			st.SettleRetention()

			err = m.ReleaseCrashedStarts(ctx)
			if tt.released && err != nil {
				t.Fatalf("ReleaseCrashedStarts: %v", err)
			}
			if !tt.released && (err == nil || !strings.Contains(err.Error(), r.ID) || !strings.Contains(err.Error(), fmt.Sprintf("kill %d", r.PID))) {
				t.Fatalf("ReleaseCrashedStarts with the start's guest running: %v, want an error naming the run and what to do", err)
			}
			if err := st.ApplyRetention(ctx, "vm1"); err != nil {
				t.Fatal(err)
			}
			pins, err := st.Pins("vm1")
			if err != nil {
				t.Fatal(err)
			}
			var ids []uint64
			pts, err := st.Points("vm1")
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range pts {
				ids = append(ids, p.ID)
			}
			_, dirErr := os.Stat(r.Dir)
			if tt.released {
				if len(pins) != 0 || !slices.Equal(ids, []uint64{2, 3}) || !os.IsNotExist(dirErr) {
					t.Errorf("after the release: pins %v, points %v (keep 2), run directory: %v; want no pin, points [2 3], no directory", pins, ids, dirErr)
				}
			} else if len(pins) != 1 || !slices.Equal(ids, []uint64{1, 2, 3}) || dirErr != nil {
				t.Errorf("with the start's guest running: pins %v, points %v, run directory: %v; want its pin and all points kept", pins, ids, dirErr)
			}
			if alive := r.PID > 0 && r.Alive(); tt.qemu && alive != tt.resumed {
				t.Errorf("the start's QEMU (pid %d) alive: %v, want %v", r.PID, alive, tt.resumed)
			}
		})
	}
}

// commitPoint commits point id of vm: one 1 MiB disk, its first block written.
func commitPoint(ctx context.Context, t *testing.T, st *recovery.Store, vm string, id uint64) {
	t.Helper()
	commitPointAt(ctx, t, st, vm, id, time.Now())
}

// commitPointAt is commitPoint with the instant the protected site's clock gave it.
func commitPointAt(ctx context.Context, t *testing.T, st *recovery.Store, vm string, id uint64, instant time.Time) {
	t.Helper()
	w, err := st.Begin(ctx, recovery.BeginSpec{VM: vm, ID: id, Instant: instant, Consistency: lifeboat.Crash,
		Disks: []recovery.DiskSpec{{Name: "vda", Size: 1 << 20, Resync: id == 1, Lineage: "l1",
			Base: id - 1, BaseGeneration: fmt.Sprint("g", id-1), Generation: fmt.Sprint("g", id)}}})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, lifeboat.BlockSize)
	for i := range buf {
		buf[i] = byte(int(id) + i)
	}
	if err := w.WriteBlocks(ctx, "vda", 0, buf, []lifeboat.Hash{lifeboat.HashBlock(buf)}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(ctx, lifeboat.CycleStats{}); err != nil {
		t.Fatal(err)
	}
}

// A lifeboat killed while a recovery plan runs leaves the pin planPoints
// took on each VM's point, which no run names: ReleaseCrashedStarts releases
// it too, and retention catches up with no new point. The kill is not driven
// for real (the test leaves the plan's pin as planPoints does); the runs the
// plan started keep their own pins (TestReleaseCrashedStarts).
func TestReleaseCrashedStartsReleasesAPlansPin(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, m := twoPointSite(ctx, t)
	points, release, err := m.planPoints(ctx, Plan{Name: "drill", Steps: []Step{{VMs: []string{"vm1"}}}}, time.Time{}, false, func(string) {})
	if err != nil || points["vm1"] != 2 {
		t.Fatalf("planPoints: %v %v", points, err)
	}
	_ = release // the site was killed: nothing releases it
	commitPoint(ctx, t, st, "vm1", 3)
	st.SettleRetention()
	if err := m.ReleaseCrashedStarts(ctx); err != nil {
		t.Fatal(err)
	}
	st.SettleRetention()
	pins, err := st.Pins("vm1")
	if err != nil {
		t.Fatal(err)
	}
	pts, err := st.Points("vm1")
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, p := range pts {
		ids = append(ids, p.ID)
	}
	if len(pins) != 0 || !slices.Equal(ids, []uint64{2, 3}) {
		t.Errorf("after the release: pins %v, points %v (keep 2); want no pin, points [2 3]", pins, ids)
	}
}

// twoPointSite is a recovery store (keep 2) holding points 1 and 2 of vm1,
// and a manager of runs on it, both quiet.
func twoPointSite(ctx context.Context, t *testing.T) (*recovery.Store, *Manager) {
	t.Helper()
	st, m := quietSite(ctx, t, 2)
	commitPoint(ctx, t, st, "vm1", 1)
	commitPoint(ctx, t, st, "vm1", 2)
	return st, m
}

// quietSite is an empty recovery store keeping keep points and a manager of
// runs on it, both quiet.
func quietSite(ctx context.Context, t *testing.T, keep int) (*recovery.Store, *Manager) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := recovery.Open(ctx, testsite.ShortDir(t), recovery.Options{Keep: keep, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, &Manager{Store: st, Dir: testsite.ShortDir(t), Site: "dr", Log: quiet}
}

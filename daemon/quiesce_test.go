package daemon

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguard"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qga"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// TestMain lets this test binary be the thaw guard the daemon starts before
// each freeze: guardCommand is os.Executable() thaw-guard, as in lifeboat.
func TestMain(m *testing.M) {
	testguard.Serve()
	os.Exit(m.Run())
}

// slowFreezeHook is a guest fsfreeze hook that outlasts freeze_limit.
const slowFreezeHook = `#!/bin/sh
[ "$1" = freeze ] || exit 0
sleep 12
`

// The daemon's cycles of one VM share its quiescer, so a freeze still
// pending from one cycle (a guest fsfreeze hook past freeze_limit) is known
// to the next: it falls back to crash at once, and the pending freeze's
// marker stays until that freeze is confirmed thawed. A freeze that qemu-ga
// refuses because another agent client holds the guest frozen is left to
// that client, unless lifeboat's own marker says a dead site left it.
func TestDaemonCyclesShareTheVMsQuiescer(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "dq"})
	site := testsite.Start(t, recovery.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	const limit = 2 * time.Second
	state := testsite.ShortDir(t)
	d := New(&Config{Site: "prod", StateDir: state, VMs: []VMConfig{{
		Name: "g1", QMP: g.StorageQMPSocket(), NBDSocket: g.StorageNBDSocket(), Disks: []string{g.DiskNode()}, Peer: "dr",
		Agent: g.AgentSocket(), Consistency: "filesystem", OnQuiesceFailure: "crash", FreezeLimit: Duration(limit),
	}}}, nil)
	d.peers["dr"] = site.Dial(t, wire.CompressionZstd)
	v := d.vms["g1"]
	marker := filepath.Join(d.frozenDir(), "g1.frozen")
	cycle := func(want lifeboat.Consistency) (lifeboat.Point, time.Duration) {
		t.Helper()
		start := time.Now()
		pt, err := v.sync(ctx, false, false)
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("point %d: %s in %v: %s", pt.ID, pt.Consistency, took.Round(time.Millisecond), pt.Note)
		if pt.Consistency != want {
			t.Fatalf("point %d is %s (%q), want %s", pt.ID, pt.Consistency, pt.Note, want)
		}
		return pt, took
	}
	otherClientFreezes := func() {
		t.Helper()
		a, err := qga.Dial(ctx, g.AgentSocket())
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		if n, err := a.Freeze(ctx); err != nil || n == 0 {
			t.Fatalf("another client's freeze: %d file systems, %v", n, err)
		}
	}
	cycle(lifeboat.Filesystem) // the initial sync, so that the cycles below are short

	t.Run("next cycle while the late freeze is pending", func(t *testing.T) {
		if _, err := g.Shell(ctx, "mkdir -p /etc/qemu/fsfreeze-hook.d && cat > /etc/qemu/fsfreeze-hook.d/slow <<'EOF'\n"+slowFreezeHook+"EOF\nchmod +x /etc/qemu/fsfreeze-hook.d/slow"); err != nil {
			t.Fatal(err)
		}
		pt, _ := cycle(lifeboat.Crash)
		if !strings.Contains(pt.Note, "guest-fsfreeze-freeze") {
			t.Errorf("the late freeze's point says %q, want the freeze named", pt.Note)
		}
		pt, took := cycle(lifeboat.Crash)
		if !strings.Contains(pt.Note, "previous freeze") || took > limit {
			t.Errorf("the cycle while the late freeze is pending took %v (note %q); want a fallback at once, within freeze_limit %v, saying the previous freeze is not confirmed thawed", took, pt.Note, limit)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Errorf("the freeze marker went while the late freeze is still pending: %v", err)
		}
		// The late freeze lands when the hook ends, and is thawed then.
		if _, err := g.WaitThawed(ctx, 40*time.Second); err != nil {
			t.Fatal(err)
		}
		waitMarkerGone(t, marker, "the marker %s stays after the late freeze was thawed")
		if _, err := g.Shell(ctx, "rm -f /etc/qemu/fsfreeze-hook.d/slow"); err != nil {
			t.Fatal(err)
		}
		cycle(lifeboat.Filesystem)
	})

	t.Run("another client's freeze", func(t *testing.T) {
		otherClientFreezes()
		defer func() {
			a, err := qga.Dial(ctx, g.AgentSocket())
			if err != nil {
				t.Fatal(err)
			}
			a.Thaw(ctx)
			a.Close()
		}()
		pt, _ := cycle(lifeboat.Crash)
		if !strings.Contains(pt.Note, "refused") {
			t.Errorf("the point's note %q does not say the agent refused the freeze", pt.Note)
		}
		time.Sleep(2 * time.Second) // a background thaw, were one started, lands within this
		if st, err := g.WaitThawed(ctx, time.Second); err == nil || st != "frozen" {
			t.Errorf("lifeboat ended the freeze another agent client holds: the guest is %q (%v)", st, err)
		}
		if _, err := os.Stat(marker); !os.IsNotExist(err) {
			t.Errorf("a marker stays for a freeze that is not lifeboat's: %v", err)
		}
	})

	t.Run("a freeze a dead site left", func(t *testing.T) {
		otherClientFreezes()
		if err := os.WriteFile(marker, []byte(g.AgentSocket()+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cycle(lifeboat.Crash)
		if st, err := g.WaitThawed(ctx, 20*time.Second); err != nil {
			t.Fatalf("the freeze lifeboat's marker names was not thawed: %q, %v", st, err)
		}
		waitMarkerGone(t, marker, "the marker %s stays after the guest was thawed")
		cycle(lifeboat.Filesystem)
	})
}

// startSite runs the daemon of cfg until the test ends and returns how long
// its API socket took to appear.
func startSite(t *testing.T, cfg *Config) time.Duration {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- New(cfg, nil).Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	for time.Since(start) < 30*time.Second {
		if _, err := os.Stat(cfg.API); err == nil {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no API socket %s 30 s after the site started", cfg.API)
	return 0
}

// writeMarker leaves a freeze marker as a site that died while vm was frozen.
func writeMarker(t *testing.T, state, vm, socket string) string {
	t.Helper()
	marker := filepath.Join(state, "frozen", vm+".frozen")
	if err := os.MkdirAll(filepath.Dir(marker), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(marker, []byte(socket+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return marker
}

// A site that died with guests frozen leaves markers; when their VMs have
// since been shut down or removed, no QEMU serves their agent sockets (gone:
// ENOENT; left behind by a QEMU killed with -9: ECONNREFUSED, made here by a
// listener closed without unlinking its socket, as a killed QEMU leaves it).
// Nothing there can be frozen: the site starts at once and drops the
// markers, instead of retrying each socket for a minute at every start.
func TestStaleFreezeMarkersDoNotDelayStart(t *testing.T) {
	state := testsite.ShortDir(t)
	gone := writeMarker(t, state, "removed", filepath.Join(state, "no-such-vm", "qga.sock"))
	dead := filepath.Join(state, "dead-qga.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: dead, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	killed := writeMarker(t, state, "killed", dead)

	took := startSite(t, &Config{Site: "prod", StateDir: state, API: filepath.Join(state, "api.sock")})
	t.Logf("API socket up %v after the start", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("the site took %v to start with two freeze markers of VMs no QEMU runs", took)
	}
	for _, m := range []string{gone, killed} {
		if _, err := os.Stat(m); !os.IsNotExist(err) {
			t.Errorf("the marker %s of a VM no QEMU runs stays, so every start tries it again: %v", m, err)
		}
	}
}

// A guest a dead site left frozen whose VM is configured here is thawed in
// the background by the VM's own quiescer: the site starts without waiting,
// and the guest is thawed and its marker gone soon after.
func TestLeftoverFreezeIsThawedAfterStart(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	g := testguest.Boot(t, testguest.Options{Workload: testguest.None, DiskSize: 32 << 20, Name: "left"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a, err := qga.Dial(ctx, g.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	if n, err := a.Freeze(ctx); err != nil || n == 0 {
		t.Fatalf("freeze: %d file systems, %v", n, err)
	}
	a.Close()
	state := testsite.ShortDir(t)
	marker := writeMarker(t, state, "g1", g.AgentSocket())

	took := startSite(t, &Config{Site: "prod", StateDir: state, API: filepath.Join(state, "api.sock"), VMs: []VMConfig{{
		Name: "g1", QMP: g.StorageQMPSocket(), NBDSocket: g.StorageNBDSocket(), Disks: []string{g.DiskNode()}, Peer: "dr",
		Agent: g.AgentSocket(), Consistency: "filesystem", Interval: Duration(time.Hour),
	}}})
	t.Logf("API socket up %v after the start", took.Round(time.Millisecond))
	if st, err := g.WaitThawed(ctx, 20*time.Second); err != nil {
		t.Fatalf("the guest the dead site left frozen: %q, %v", st, err)
	}
	waitMarkerGone(t, marker, "the marker %s stays after its guest was thawed")
}

// waitMarkerGone waits until the freeze marker is gone: the quiescer removes
// it once the guest is confirmed thawed.
func waitMarkerGone(t *testing.T, marker, failure string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(marker); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf(failure, marker)
		}
	}
}

// The quiescer of a libvirt VM gets the thaw guard and the marker directory
// of an agent VM: a site killed while either is frozen leaves a guard that
// thaws it, and a marker its next start thaws it by.
func TestQuiescersOfBothPathsAreGuarded(t *testing.T) {
	d := New(&Config{Site: "prod", StateDir: t.TempDir()}, nil)
	agent, err := d.quiescer(VMConfig{Name: "a", Agent: "/run/a.sock", Consistency: "filesystem"})
	if err != nil {
		t.Fatal(err)
	}
	lv, err := d.quiescer(VMConfig{Name: "l", Libvirt: &LibvirtConfig{Domain: "l"}, Consistency: "filesystem"})
	if err != nil {
		t.Fatal(err)
	}
	aq, lq := agent.(*protect.AgentQuiescer), lv.(*protect.LibvirtQuiescer)
	if len(lq.Guard) == 0 || !slices.Equal(lq.Guard, aq.Guard) || lq.MarkerDir == "" || lq.MarkerDir != aq.MarkerDir {
		t.Errorf("libvirt quiescer: guard %q, markers %q; agent quiescer: guard %q, markers %q; want the same, set", lq.Guard, lq.MarkerDir, aq.Guard, aq.MarkerDir)
	}
}

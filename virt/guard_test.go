package virt_test

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguard"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// TestMain lets this test binary be the thaw guard a LibvirtQuiescer starts
// before each freeze, and a lifeboat that freezes a domain and is then killed.
func TestMain(m *testing.M) {
	testguard.Serve()
	if len(os.Args) > 1 && os.Args[1] == "freeze-and-wait" {
		freezeAndWait(os.Args[2:])
	}
	if len(os.Args) > 1 && os.Args[1] == "cycle-and-wait" {
		cycleAndWait(os.Args[2:])
	}
	os.Exit(m.Run())
}

// freezeAndWait is a lifeboat frozen in the middle of a cycle: it freezes
// the domain through a LibvirtQuiescer (with the real thaw guard when asked),
// says FROZEN on stdout and waits, far longer than any test, to be killed.
func freezeAndWait(args []string) {
	fs := flag.NewFlagSet("freeze-and-wait", flag.ExitOnError)
	domain, markers, guard := fs.String("domain", "", ""), fs.String("markers", "", ""), fs.Bool("guard", false, "")
	fs.Parse(args)
	q := &protect.LibvirtQuiescer{VM: "web1", Domain: protect.LibvirtDomain{URI: testlibvirt.URI, Domain: *domain},
		Level: lifeboat.Filesystem, Limit: time.Hour, MarkerDir: *markers}
	if *guard {
		q.Guard = testguard.Command()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f, err := q.Freeze(ctx)
	if err != nil || f.Level != lifeboat.Filesystem {
		fmt.Fprintf(os.Stderr, "freeze: %+v %v\n", f, err)
		os.Exit(1)
	}
	fmt.Println("FROZEN")
	time.Sleep(time.Hour)
	os.Exit(1)
}

// killedWhileFrozen runs a lifeboat (this binary, freezeAndWait) that
// freezes the domain and kills it with -9 once the guest is frozen. Its log
// and its guard's are in the returned file.
func killedWhileFrozen(t *testing.T, dom *testlibvirt.Domain, markers string, guard bool) (log string) {
	t.Helper()
	return killedOnWord(t, "FROZEN", func() {
		if st := fsfreezeStatus(dom); !strings.Contains(st, `"frozen"`) {
			t.Fatalf("after the freeze the agent says %s, want frozen", st)
		}
	}, "freeze-and-wait", "--domain="+dom.Name, "--markers="+markers, fmt.Sprintf("--guard=%v", guard))
}

// killedOnWord runs a lifeboat (this binary, with args) and kills it with
// -9 once it says word on stdout and check (if any) has run. Its log (and
// its children's) is in the returned file.
func killedOnWord(t *testing.T, word string, check func(), args ...string) (log string) {
	t.Helper()
	l := testenv.StartLifeboat(t, word, args...)
	if check != nil {
		check()
	}
	l.Kill()
	return l.Log
}

func waitGone(t *testing.T, path string, within time.Duration, what string) {
	t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(path); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the freeze marker %s stays %v after %s", path, within, what)
		}
	}
}

// A lifeboat killed with -9 while a libvirt domain's guest is frozen: the
// thaw guard it started before the freeze sees its stdin end and thaws the
// guest through libvirtd (virDomainFSThaw), and its marker goes. A lifeboat
// whose guard died with it leaves the guest frozen and the marker names the
// domain: the next site's start (ThawLeftovers) thaws it, through the VM's
// own quiescer in the background when the VM is configured there (its
// freezes fall back until then; here it is held pending by pausing the
// domain), else before it goes on; a marker of a domain libvirt no longer
// has is dropped.
func TestLibvirtKilledWhileFrozenIsThawed(t *testing.T) {
	r := newFreezeRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 32 << 20}}})
	t.Cleanup(func() { testlibvirt.Virsh("resume", r.dom.Name); testlibvirt.Virsh("domfsthaw", r.dom.Name) }) // whatever the test left
	markers := t.TempDir()
	marker := filepath.Join(markers, "web1.frozen")
	const thawWithin = 10 * time.Second

	t.Run("guard", func(t *testing.T) {
		log := killedWhileFrozen(t, r.dom, markers, true)
		killed := time.Now()
		if _, err := os.Stat(marker); err != nil {
			t.Errorf("no freeze marker while frozen: %v", err)
		}
		waitThawed(t, r.dom, thawWithin, "the lifeboat that froze it was killed (its guard did not thaw it)")
		t.Logf("killed -> thawed by the guard (guest-fsfreeze-status) in %v", time.Since(killed).Round(time.Millisecond))
		waitGone(t, marker, 5*time.Second, "the guard thawed the guest")
		if b, _ := os.ReadFile(log); !strings.Contains(string(b), "thawing it") {
			t.Errorf("the guard did not say it thawed the guest; log:\n%s", b)
		}
	})

	t.Run("leftover of a VM configured here", func(t *testing.T) {
		killedWhileFrozen(t, r.dom, markers, false)
		time.Sleep(2 * time.Second)
		if st := fsfreezeStatus(r.dom); !strings.Contains(st, `"frozen"`) {
			t.Fatalf("with no guard the agent says %s 2 s after the kill, want frozen (something else thawed it)", st)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Fatalf("no freeze marker left by the killed lifeboat: %v", err)
		}
		if _, err := testlibvirt.Virsh("suspend", r.dom.Name); err != nil {
			t.Fatal(err)
		}
		q := &protect.LibvirtQuiescer{VM: "web1", Domain: *r.p.VM.Libvirt, Level: lifeboat.Filesystem, Limit: 3 * time.Second, MarkerDir: markers}
		start := time.Now()
		protect.ThawLeftovers(markers, func(vm string) protect.Quiescer {
			if vm == "web1" {
				return q
			}
			return nil
		}, slog.Default())
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("ThawLeftovers waited %v for a VM configured here, whose own quiescer thaws it in the background", took)
		}
		if f, err := q.Freeze(ctx(t)); err != nil || f.Level != lifeboat.Crash || !strings.Contains(f.Note, "previous freeze") {
			t.Errorf("a freeze while the leftover's thaw is pending: %+v %v; want crash consistent at once, saying why", f, err)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Errorf("the marker went before the guest was thawed: %v", err)
		}
		if _, err := testlibvirt.Virsh("resume", r.dom.Name); err != nil {
			t.Fatal(err)
		}
		waitThawed(t, r.dom, thawWithin, "its domain resumed (the leftover was not thawed)")
		waitGone(t, marker, 5*time.Second, "the leftover was thawed")
	})

	t.Run("leftover of a VM not configured here", func(t *testing.T) {
		killedWhileFrozen(t, r.dom, markers, false)
		gone := filepath.Join(markers, "gone.frozen")
		if err := os.WriteFile(gone, []byte("libvirt\n"+testlibvirt.URI+"\nlifeboat-no-such-domain\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		protect.ThawLeftovers(markers, nil, slog.Default())
		t.Logf("ThawLeftovers took %v", time.Since(start).Round(time.Millisecond))
		if st := fsfreezeStatus(r.dom); !strings.Contains(st, `"thawed"`) {
			t.Errorf("after ThawLeftovers the agent says %s, want thawed", st)
		}
		for _, m := range []string{marker, gone} {
			if _, err := os.Stat(m); !os.IsNotExist(err) {
				t.Errorf("the marker %s stays after ThawLeftovers: %v", m, err)
			}
		}
	})
}

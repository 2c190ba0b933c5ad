package protect_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// TestMain lets this test binary be a lifeboat killed in the middle of a
// cycle (cycleToInstant).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "cycle-to-instant" {
		cycleToInstant(os.Args[2:])
	}
	os.Exit(m.Run())
}

// cycleToInstant is a lifeboat in the middle of a cycle of a VM without an
// NBD server of its own: its NBD server runs and its fleece is exported. It
// says INSTANT on stdout and waits, far longer than any test, to be killed.
func cycleToInstant(args []string) {
	fs := flag.NewFlagSet("cycle-to-instant", flag.ExitOnError)
	qmp, work, pkiDir, addr, peer := fs.String("qmp", "", ""), fs.String("work", "", ""), fs.String("pki", "", ""), fs.String("addr", "", ""), fs.String("peer", "dr", "")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tlsConf, err := pki.ClientTLS(pki.SiteFiles(*pkiDir, "prod"), "127.0.0.1")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	c, err := wire.Dial(ctx, *addr, tlsConf, "prod", *peer, wire.CompressionZstd)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	p := &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: *qmp, WorkDir: *work},
		Target: c, Readers: 1,
		Hooks: protect.Hooks{AfterInstant: func(context.Context) error {
			fmt.Println("INSTANT")
			time.Sleep(time.Hour)
			return nil
		}},
	}
	_, err = p.Cycle(ctx)
	fmt.Fprintf(os.Stderr, "cycle: %v\n", err)
	os.Exit(1)
}

// lifeboatAtInstant runs a lifeboat (this binary, cycleToInstant) that cycles
// the VM of qmp with work dir work into site (whose certificate names it
// peer) up to its instant, and returns once its NBD server and fleece export
// are up. kill ends it with SIGKILL, as the OOM killer does: no deferred
// cleanup runs. It is killed when the test ends in any case.
func lifeboatAtInstant(t *testing.T, qmp, work string, site *testsite.Site, peer string) (kill func()) {
	t.Helper()
	return testenv.StartLifeboat(t, "INSTANT", "cycle-to-instant", "--qmp="+qmp, "--work="+work,
		"--pki="+site.PKI, "--addr="+site.Addr, "--peer="+peer).Kill
}

// lifeboatExports are the exports of lifeboat's in the VM's QEMU.
func lifeboatExports(t *testing.T, m *qemu.Monitor) []string {
	t.Helper()
	ex, err := m.Exports(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range ex {
		if strings.HasPrefix(e.ID, qemu.OwnPrefix) {
			ids = append(ids, e.ID)
		}
	}
	return ids
}

// A lifeboat killed (-9) mid-cycle leaves its NBD server and fleece export in
// the VM's QEMU; then its state_dir is moved to another file system (the old
// work dir is gone) or the VM is renamed in the config (the old work dir
// stays, the new one is elsewhere). The next cycle must recognise the server
// as a dead lifeboat cycle's, stop it, say so, and go on at once; its point is
// the disk's, byte for byte, and after a move it is still incremental.
func TestKilledCycleLeftoverIsCleared(t *testing.T) {
	for _, tc := range []struct {
		name   string
		rename bool
	}{{"state_dir moved", false}, {"vm renamed", true}} {
		t.Run(tc.name, func(t *testing.T) {
			site := testsite.Start(t, recovery.Options{Keep: 5})
			v := startLibvirtVM(t, site, "vm1")
			v.cycle(t)
			v.write(t, 0x5a, 1<<20, 256<<10)
			old := v.p.VM.WorkDir
			lifeboatAtInstant(t, v.p.VM.QMPSocket, old, site, "dr")()
			if ids := lifeboatExports(t, v.Monitor()); len(ids) == 0 {
				t.Fatal("the killed lifeboat left no fleece export: the test does not play a cycle cut off after its export")
			}

			v.p.VM.WorkDir = testsite.ShortDir(t)
			if tc.rename {
				v.p.VM.Name = "vm1-renamed"
			} else if err := os.RemoveAll(old); err != nil {
				t.Fatal(err)
			}
			v.p.BusyWait = 10 * time.Second
			want := sha256.Sum256(v.model)
			start := time.Now()
			pt, err := v.p.Cycle(ctx(t))
			took := time.Since(start)
			if err != nil {
				t.Fatalf("cycle after a killed one (%v later): %v\nlog:\n%s", took.Round(time.Millisecond), err, v.log)
			}
			if took > v.p.BusyWait/2 {
				t.Errorf("the cycle took %v: it waited for the dead lifeboat's NBD server", took)
			}
			if !strings.Contains(v.log.String(), "stopped the NBD server of a lifeboat cycle that is over") || !strings.Contains(v.log.String(), old) {
				t.Errorf("the log does not say which server was stopped and why:\n%s", v.log)
			}
			if tc.rename {
				if got := site.PointHash(t, v.p.VM.Name, pt.ID, sysDisk); got != hex.EncodeToString(want[:]) {
					t.Fatalf("point %d of the renamed VM: sha256 %s, want the disk's %s", pt.ID, got[:12], hex.EncodeToString(want[:6]))
				}
			} else {
				if pt.Disks[0].Resync {
					t.Errorf("point %d resynchronised the disk: want it incremental (the generations survive the kill)", pt.ID)
				}
				v.checkPoint(t, pt, hex.EncodeToString(want[:]))
			}
			assertNoNBDServer(t, v.Monitor(), v.Dir, "a cycle that cleared a dead lifeboat's leftovers")
			testvm.AssertNoLeftovers(t, v.Monitor())
		})
	}
}

// Two lifeboat deployments, each with its own recovery site, protect one VM:
// while one is in the middle of a cycle (its NBD server and fleece export up),
// the other's cycle leaves both alone, the export reading the first one's
// instant still, and fails after its wait saying whose server it is. Once the
// first is killed, the next cycle clears what it left and succeeds at once.
func TestOtherLifeboatsLiveCycleIsLeftAlone(t *testing.T) {
	site := testsite.Start(t, recovery.Options{Keep: 5})
	other := testsite.StartAs(t, site, "dr2", recovery.Options{Keep: 5})
	// Each lifeboat needs a QMP monitor of its own.
	otherQMP := filepath.Join(testsite.ShortDir(t), "other.qmp")
	v := startLibvirtVM(t, site, "vm1", "-qmp", "unix:"+otherQMP+",server=on,wait=off")
	v.cycle(t)
	v.write(t, 0x21, 1<<20, 128<<10)
	atInstant := sha256.Sum256(v.model)
	work := testsite.ShortDir(t)
	kill := lifeboatAtInstant(t, otherQMP, work, other, "dr2")
	v.write(t, 0x22, 1<<20, 128<<10) // after the other's instant: its fleece keeps the old data
	before := lifeboatExports(t, v.Monitor())
	if len(before) == 0 {
		t.Fatal("the other lifeboat's cycle has no fleece export")
	}

	v.p.BusyWait = 2 * time.Second
	_, err := v.p.Cycle(ctx(t))
	// The other's socket: where it listens, whatever its version named it.
	sock := filepath.Join(work, "lifeboat-nbd.sock")
	if _, serr := os.Stat(sock); serr != nil {
		sock = filepath.Join(work, "nbd.sock")
	}
	if after := lifeboatExports(t, v.Monitor()); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Fatalf("the other lifeboat's exports were %v, are %v: its cycle was torn down", before, after)
	}
	if got := exportHash(t, sock, "lifeboat-fleece-"+sysDiskNode, sysDiskSize); got != hex.EncodeToString(atInstant[:]) {
		t.Fatal("the other lifeboat's fleece export no longer reads the disk at its instant")
	}
	if err == nil || !strings.Contains(err.Error(), "another lifeboat's cycle under way") || !strings.Contains(err.Error(), sock) || !strings.Contains(err.Error(), "nbd_socket") {
		t.Fatalf("cycle beside another lifeboat's cycle: err = %v; want it to name the other's live cycle and its socket %s, and say to set nbd_socket", err, sock)
	}
	if !strings.Contains(v.log.String(), "belongs to another lifeboat's cycle under way: left alone") {
		t.Errorf("the log does not say the other's fleece was left alone:\n%s", v.log)
	}

	kill()
	v.p.BusyWait = 10 * time.Second
	start := time.Now()
	pt := v.cycle(t)
	if took := time.Since(start); took > v.p.BusyWait/2 {
		t.Errorf("the cycle after the other lifeboat was killed took %v: it waited for the dead one's NBD server", took)
	}
	if pt.Disks[0].Resync {
		t.Errorf("point %d resynchronised the disk: want it incremental", pt.ID)
	}
	if !strings.Contains(v.log.String(), "its work dir's cycle lock is free") {
		t.Errorf("the log does not say why the dead lifeboat's server was stopped:\n%s", v.log)
	}
	assertNoNBDServer(t, v.Monitor(), v.Dir, "a cycle after another lifeboat was killed")
	testvm.AssertNoLeftovers(t, v.Monitor())
}

// Another tool's NBD server in the VM's QEMU, on a socket of its own, serving
// the disk: a cycle waits for it, never stops it, and fails saying it has no
// sign of lifeboat's and where QEMU listens. On a socket with the name
// lifeboat gave its own before (nbd.sock) but no cycle lock beside it, the
// cycle cannot tell whose it is: it still leaves it alone, and its error says
// it may be lifeboat's own and how to stop it.
func TestForeignNBDServerIsNotTakenForLifeboats(t *testing.T) {
	v := startLibvirtVM(t, testsite.Start(t, recovery.Options{Keep: 5}), "vm1")
	m := v.Monitor()
	v.cycle(t)
	for _, tc := range []struct {
		socket string
		want   []string
		not    string
	}{
		{"other-tool.sock", []string{"no sign of lifeboat's", "nbd_socket"}, "may be lifeboat's own"},
		{"nbd.sock", []string{"may be lifeboat's own", `"nbd-server-stop"`, v.p.VM.QMPSocket}, "no sign of lifeboat's"},
	} {
		t.Run(tc.socket, func(t *testing.T) {
			sock := filepath.Join(testsite.ShortDir(t), tc.socket)
			if err := m.NBDServerStart(ctx(t), sock); err != nil {
				t.Fatal(err)
			}
			if err := m.ExportAdd(ctx(t), qemu.Export{ID: "other-exp", Node: sysDiskNode, Name: "other"}); err != nil {
				t.Fatal(err)
			}
			v.p.BusyWait = 1500 * time.Millisecond
			_, err := v.p.Cycle(ctx(t))
			if err == nil || !strings.Contains(err.Error(), sock) || strings.Contains(err.Error(), tc.not) {
				t.Fatalf("cycle beside another's NBD server: err = %v; want it to name %s and not say %q", err, sock, tc.not)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("cycle beside another's NBD server: err = %v; want it to say %q", err, w)
				}
			}
			want := sha256.Sum256(v.model)
			if got := exportHash(t, sock, "other", sysDiskSize); got != hex.EncodeToString(want[:]) {
				t.Fatal("the other tool's export no longer reads the disk")
			}
			if err := m.ExportDel(ctx(t), "other-exp"); err != nil {
				t.Fatal(err)
			}
			if err := m.NBDServerStop(ctx(t)); err != nil {
				t.Fatalf("the other tool's NBD server: %v", err)
			}
		})
	}
}

package virt_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testlibvirt"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// stallTarget is a recovery site that takes a point's begin and then never
// answers: a cycle stalls in its transfer, its backup job running.
type stallTarget struct{ peer string }

func (s stallTarget) Peer() string { return s.peer }
func (s stallTarget) Latest(context.Context, string) (lifeboat.Point, bool, error) {
	return lifeboat.Point{}, false, nil
}
func (s stallTarget) BlockMap(context.Context, string, string) (map[int64]lifeboat.Hash, error) {
	return map[int64]lifeboat.Hash{}, nil
}
func (s stallTarget) Begin(context.Context, lifeboat.Point) (lifeboat.PointSink, error) {
	fmt.Println("BEGUN")
	select {}
}
func (s stallTarget) Failover(context.Context, string, uint64) (wire.FailoverResult, error) {
	return wire.FailoverResult{}, errors.New("no failover here")
}

// cycleAndWait is a lifeboat in the middle of a cycle of a libvirt domain:
// its backup job runs with its new checkpoint made; it says BEGUN on stdout
// and waits, far longer than any test, to be killed.
func cycleAndWait(args []string) {
	fs := flag.NewFlagSet("cycle-and-wait", flag.ExitOnError)
	domain, work, state, peer := fs.String("domain", "", ""), fs.String("work", "", ""), fs.String("state", "", ""), fs.String("peer", "", "")
	fs.Parse(args)
	p := &protect.Protector{
		VM: protect.VM{Name: "web1", Libvirt: &protect.LibvirtDomain{URI: testlibvirt.URI, Domain: *domain},
			WorkDir: *work, StateDir: *state},
		Target: stallTarget{*peer}, Readers: 1, ChunkSize: 1 << 20,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := p.Cycle(ctx)
	fmt.Fprintf(os.Stderr, "cycle: %v\n", err)
	os.Exit(1)
}

// killedMidCycle runs a lifeboat (this binary, cycleAndWait) that begins a
// cycle of r's domain and kills it with -9 once its backup job runs.
func (r *libvirtRig) killedMidCycle(t *testing.T) {
	t.Helper()
	killedOnWord(t, "BEGUN", nil, "cycle-and-wait", "--domain="+r.dom.Name, "--work="+r.p.VM.WorkDir,
		"--state="+r.p.VM.StateDir, "--peer="+r.p.Target.Peer())
}

// virshFields is a virsh command's output, word by word.
func virshFields(t *testing.T, args ...string) []string {
	t.Helper()
	out, err := testlibvirt.Virsh(args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(out)
}

// `lifeboat unprotect` of a libvirt domain (Protector.Release) against what
// libvirt users do around it: it runs beside another tool's backup job
// without ending it or touching its checkpoint; after a lifeboat killed
// mid-cycle it leaves nothing of lifeboat's (no job, checkpoint, bitmap,
// scratch file or socket); the bitmap of a disk taken out of the domain,
// which libvirt cannot reach, it names; a domain shut off it refuses before
// changing anything, saying what to do; and then the user's internal snapshots revert and
// virtnbdbackup's full and incremental backups run.
func TestLibvirtReleaseLeavesNothingOfOurs(t *testing.T) {
	testenv.RequireTools(t, "virtnbdbackup")
	r := newLibvirtRig(t, testlibvirt.Options{Disks: []testlibvirt.DiskSpec{{Target: "vda", Size: 64 << 20}, {Target: "vdb", Size: 16 << 20}}})
	peer := r.p.Target.Peer()
	records := func() []string {
		recs, _ := filepath.Glob(filepath.Join(r.p.VM.WorkDir, "checkpoints", "*.xml"))
		return recs
	}
	r.cycle(t)
	r.cycle(t)
	if len(records()) != 1 {
		t.Fatalf("lifeboat keeps checkpoint records %v, want one", records())
	}

	t.Run("shut off", func(t *testing.T) {
		r.dom.Destroy()
		defer r.dom.Start()
		rel, err := r.p.Release(ctx(t), peer)
		t.Logf("release of the domain shut off: %+v %v", rel, err)
		if err == nil || !strings.Contains(err.Error(), "not running") || !strings.Contains(err.Error(), "qemu-img bitmap --remove") {
			t.Errorf("release of the domain shut off: %v; want it refused, saying to start it or how to clean its images", err)
		}
		if len(rel.Removed) != 0 || len(records()) != 1 {
			t.Errorf("release of the domain shut off removed %q, records left %v; want nothing removed", rel.Removed, records())
		}
		// vdb, tracked by lifeboat's checkpoint, is taken out of the domain.
		if _, err := testlibvirt.Virsh("detach-disk", r.dom.Name, "vdb", "--config"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("beside another tool's backup", func(t *testing.T) {
		// The user's own pull backup, with its checkpoint, as virsh begins it.
		dir := filepath.Join(r.dom.Dir, "theirs")
		if err := os.Mkdir(dir, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(dir, 0o777)
		bx := filepath.Join(dir, "backup.xml")
		cx := filepath.Join(dir, "checkpoint.xml")
		os.WriteFile(bx, []byte(`<domainbackup mode='pull'><server transport='unix' socket='`+dir+`/nbd.sock'/>
<disks><disk name='vda' backup='yes' type='file'><scratch file='`+dir+`/vda.scratch'/></disk></disks></domainbackup>`), 0o644)
		os.WriteFile(cx, []byte(`<domaincheckpoint><name>theirs</name></domaincheckpoint>`), 0o644)
		if _, err := testlibvirt.Virsh("backup-begin", r.dom.Name, bx, cx); err != nil {
			t.Fatal(err)
		}
		rel, err := r.p.Release(ctx(t), peer)
		t.Logf("release beside another tool's backup: %+v %v", rel, err)
		if len(rel.Left) != 1 || !strings.Contains(rel.Left[0], "vdb") || !strings.Contains(rel.Left[0], "qemu-img bitmap --remove") {
			t.Errorf("release left %q; want it to name vdb's bitmap, which it cannot reach once vdb left the domain, and how to remove it", rel.Left)
		}
		if out, _ := testlibvirt.Virsh("domjobinfo", r.dom.Name); !strings.Contains(out, "Backup") {
			t.Errorf("the other tool's backup job ended by the release: %s", out)
		}
		cps := virshFields(t, "checkpoint-list", r.dom.Name, "--name")
		if !slices.Contains(cps, "theirs") {
			t.Errorf("the other tool's checkpoint is gone after the release: %q", cps)
		}
		if err == nil && (len(records()) != 0 || len(cps) != 1) {
			t.Errorf("the release said nothing failed, yet lifeboat keeps records %v and libvirt lists checkpoints %q", records(), cps)
		}
		if err != nil && len(records()) == 0 {
			t.Errorf("the release failed (%v) with no record of lifeboat's left to finish it", err)
		}
		if _, err := testlibvirt.Virsh("domjobabort", r.dom.Name); err != nil {
			t.Fatal(err)
		}
		if err != nil {
			if _, err := r.p.Release(ctx(t), peer); err != nil {
				t.Fatalf("release once the other tool's backup ended: %v", err)
			}
		}
		if len(records()) != 0 {
			t.Errorf("after the release lifeboat keeps checkpoint records %v", records())
		}
	})

	t.Run("after a lifeboat killed mid-cycle", func(t *testing.T) {
		r.killedMidCycle(t)
		if out, _ := testlibvirt.Virsh("domjobinfo", r.dom.Name); !strings.Contains(out, "Backup") {
			t.Fatalf("the killed lifeboat's backup job is not running: %s", out)
		}
		rel, err := r.p.Release(ctx(t), peer)
		if err != nil {
			t.Fatalf("release after a killed cycle: %v", err)
		}
		t.Logf("release after a killed cycle: %+v", rel)
		if out, _ := testlibvirt.Virsh("domjobinfo", r.dom.Name); !strings.Contains(out, "None") {
			t.Errorf("after the release the domain runs a job: %s", out)
		}
		if cps := virshFields(t, "checkpoint-list", r.dom.Name, "--name"); !slices.Equal(cps, []string{"theirs"}) {
			t.Errorf("after the release libvirt lists checkpoints %q, want the other tool's only", cps)
		}
		if len(records()) != 0 {
			t.Errorf("after the release lifeboat keeps checkpoint records %v", records())
		}
		ents, _ := os.ReadDir(filepath.Join(r.p.VM.WorkDir, "libvirt"))
		for _, e := range ents {
			t.Errorf("after the release lifeboat's libvirt directory holds %s", e.Name())
		}
	})

	r.dom.Destroy()
	if b := imageBitmaps(t, r.dom.Image("vda")); slices.ContainsFunc(b, isGeneration) || !slices.Contains(b, "theirs") {
		t.Errorf("after the release vda's image holds bitmaps %q; want the other tool's (theirs) and none of lifeboat's", b)
	}
	if b := imageBitmaps(t, r.dom.Image("vdb")); !slices.ContainsFunc(b, isGeneration) {
		t.Errorf("the image vdb was holds bitmaps %q, none of lifeboat's: the release said it left one", b)
	}
	r.dom.Start()

	t.Run("the user's tools", func(t *testing.T) {
		if _, err := testlibvirt.Virsh("checkpoint-delete", r.dom.Name, "theirs"); err != nil {
			t.Fatal(err)
		}
		if _, err := testlibvirt.Virsh("snapshot-create-as", r.dom.Name, "s1"); err != nil {
			t.Fatal(err)
		}
		if _, err := testlibvirt.Virsh("snapshot-revert", r.dom.Name, "s1"); err != nil {
			t.Errorf("revert to an internal snapshot after the release: %v", err)
		}
		if _, err := testlibvirt.Virsh("snapshot-delete", r.dom.Name, "s1"); err != nil {
			t.Fatal(err)
		}
		backups := t.TempDir()
		for _, level := range []string{"full", "inc"} {
			out, err := exec.Command("virtnbdbackup", "-U", testlibvirt.URI, "-d", r.dom.Name, "-l", level, "-o", backups).CombinedOutput()
			if err != nil {
				t.Errorf("virtnbdbackup -l %s after the release: %v\n%s", level, err, tail(string(out), 20))
			}
		}
	})
}

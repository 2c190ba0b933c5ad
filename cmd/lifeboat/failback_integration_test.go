package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
)

// failbackRig is a VM replicated from prod to dr, then lost at production
// (kill -9 of its guest and its lifeboat, after its host wrote a little more
// into the image), failed over and running at dr; production's lifeboat is
// down.
type failbackRig struct {
	g                   *testguest.Guest
	dir, drCfg, prodCfg string
	plug                func(*testguest.Guest) // points production's VM sockets at a guest
	startRequested      string                 // the file the config's start: command makes
	dr, prod            *site
	rec                 *failover.Run
}

// rigOptions vary newFailbackRig: arguments for its failover, and what runs
// between production's two points.
type rigOptions struct {
	failover     []string
	betweenSyncs func(g *testguest.Guest)
}

func newFailbackRig(t *testing.T, opts ...rigOptions) *failbackRig {
	var o rigOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	if testing.Short() {
		t.Skip("boots a guest under TCG: covered by the full (non -short) run")
	}
	r := &failbackRig{}
	g := testguest.Boot(t, testguest.Options{Name: "fb", Workload: testguest.Counter})
	dir := shortDir(t)
	makePKI(t, dir)
	drAddr, prodAddr := freeAddr(t), freeAddr(t)
	drCfg := filepath.Join(dir, "dr.yaml")
	os.WriteFile(drCfg, []byte(fmt.Sprintf("site: dr\nstate_dir: %s/dr\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/dr.crt, key: pki/dr.key}\n"+
		"peers:\n  - {name: prod, address: %q}\n", dir, drAddr, prodAddr)), 0o600)
	prodCfg := filepath.Join(dir, "prod.yaml")
	// The VM lifeboat protects is the guest's storage daemon, whose disk is
	// the qcow2 image itself: production records it as the failback's target.
	// A storage daemon cannot tell how to start the guest: the config does.
	// Its sockets are symbolic links, as a service's fixed paths are, so that
	// the guest booted at production after the failback is the same VM to
	// the same config. Its start: command only asks the test to boot it (a
	// TCG guest is the test's to start and clean up; the daemon's part, run
	// the command and wait for the VM's QMP, is the same).
	kernel, initrd := testguest.Build(t)
	qmpLink, nbdLink := filepath.Join(dir, "vm1.qmp"), filepath.Join(dir, "vm1.nbd")
	r.startRequested = filepath.Join(dir, "start-requested")
	plug := func(g *testguest.Guest) {
		for link, target := range map[string]string{qmpLink: g.StorageQMPSocket(), nbdLink: g.StorageNBDSocket()} {
			if err := os.Symlink(target, link+".new"); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(link+".new", link); err != nil {
				t.Fatal(err)
			}
		}
	}
	plug(g)
	os.WriteFile(prodCfg, []byte(fmt.Sprintf("site: prod\nstate_dir: %s/prod\nlisten: %s\ntls: {ca: pki/ca.crt, cert: pki/prod.crt, key: pki/prod.key}\n"+
		"peers:\n  - {name: dr, address: %q}\nvms:\n  - name: vm1\n    qmp: %s\n    nbd_socket: %s\n    start: [touch, %s]\n"+
		"    definition: {machine: q35, cpus: 1, memory_mib: 512, kernel: %s, initrd: %s, append: \"console=ttyS0 panic=-1 lb.workload=none\", disks: [{name: vda, device: virtio-blk-pci}]}\n",
		dir, prodAddr, drAddr, qmpLink, nbdLink, r.startRequested, kernel, initrd)), 0o600)
	r.dr = startSite(t, "dr", drCfg)
	// Production's lifeboat ends with kill -9: the daemon over its disks that
	// it started for the failback outlives it, as after a crash, and is
	// killed after it (a restarted production site kills it first itself).
	t.Cleanup(func() { qemu.KillLeftover(context.Background(), filepath.Join(dir, "prod", "failback", "run", "vm1")) })
	prod := startSite(t, "prod", prodCfg)
	for i := 1; i <= 2; i++ {
		// A line may be stored twice (Count resends a lost one): the test
		// compares the file between sites, never its lines.
		if err := g.Count(fmt.Sprintf("line-%d", i)); err != nil {
			t.Fatal(err)
		}
		run(t, "sync", "vm1", "-c", prodCfg)
		if i == 1 && o.betweenSyncs != nil {
			o.betweenSyncs(g)
		}
	}

	// Production is lost: its guest and its lifeboat, kill -9; its host
	// wrote a little more into the image before it died.
	g.Kill()
	prod.kill()
	qemuIO(t, g.DiskImage(), "write -P 0x5a 3M 192k")
	out := run(t, append([]string{"failover", "vm1", "--force", "-c", drCfg}, o.failover...)...)
	t.Logf("lifeboat failover vm1 --force:\n%s", out)
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	t.Cleanup(func() {
		// An undo is refused once a failback began: the recovered QEMU,
		// which outlives lifeboat, is killed then.
		if _, err := runErr(t, "failover", "vm1", "--undo", "-c", drCfg); err != nil && runs[0].Alive() {
			syscall.Kill(runs[0].PID, syscall.SIGKILL)
		}
	})
	r.g, r.dir, r.drCfg, r.prodCfg, r.plug, r.prod, r.rec = g, dir, drCfg, prodCfg, plug, prod, runs[0]
	return r
}

// `lifeboat failback` as a user runs it, against real sites and a real
// guest: production replicates, is lost (kill -9) after writing a little
// more, the VM fails over and runs at the recovery site; production, back
// and serving, takes the failback. Its disk then reads exactly as the
// recovered VM's (paused, so that nothing moves under the comparison), and
// a second failback sends nothing. Production's change tracking died with
// its QEMU here, so its own writes are found by comparing hashes; the
// failback package's tests cover its record surviving. Then the recovered
// guest writes more and --finalize brings the VM home: once the recovery
// site has handed it over (its QEMU gone), production runs the VM's start:
// command; its disk then equals the recovery site's new point; the guest
// booted on it has the file the recovered guest wrote last, and production
// replicates it at once, incrementally from that point, which the finalize
// waits for and reports with the VM's downtime.
func TestFailbackCommands(t *testing.T) {
	r := newFailbackRig(t)
	g, drCfg, prodCfg, rec := r.g, r.drCfg, r.prodCfg, r.rec
	dir := r.dir

	// Before production serves again, a failback is refused and says why.
	if out, err := runErr(t, "failback", "vm1", "-c", drCfg); err == nil || !strings.Contains(out, "prod") {
		t.Fatalf("a failback with production down: %v\n%s", err, out)
	}
	startSite(t, "prod", prodCfg)

	// The recovered VM is paused, so that its disk stands still for the comparison.
	pause(t, rec.QMP)
	out := run(t, "failback", "vm1", "-c", drCfg)
	t.Logf("lifeboat failback vm1:\n%s", out)
	for _, want := range []string{"production's disks hold failback point 3", "disk vda: incremental from point 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("failback's output lacks %q", want)
		}
	}
	if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "failing back from dr: its disks here hold point 3") || !strings.Contains(st, "are overwritten") {
		t.Errorf("status at production during the failback:\n%s", st)
	}
	overlay := rec.Overlays["vda"]
	if cmp, err := exec.Command("qemu-img", "compare", "-U", g.DiskImage(), overlay).CombinedOutput(); err != nil {
		t.Fatalf("the production disk after the failback differs from the recovered VM's: %v\n%s", err, cmp)
	}

	out = run(t, "failback", "vm1", "--json", "-c", drCfg)
	var pt struct {
		ID    uint64 `json:"id"`
		Stats struct {
			BytesChanged int64 `json:"bytes_changed"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(out), &pt); err != nil {
		t.Fatalf("failback --json: %v\n%s", err, out)
	}
	if pt.ID != 4 || pt.Stats.BytesChanged != 0 {
		t.Errorf("a second failback of the paused VM: point %d, %d bytes changed; want point 4 and nothing\n%s", pt.ID, pt.Stats.BytesChanged, out)
	}

	if st := run(t, "status", "-c", drCfg); !strings.Contains(st, "failing back to prod: production's disks took failback point 4") {
		t.Errorf("status at the recovery site after the failbacks:\n%s", st)
	}

	// Finalize: the recovered guest runs on and writes, then is powered off
	// through its agent; production takes its last state, which also
	// becomes a point here, and the VM is handed back to production.
	cont(t, rec.QMP)
	sum := guestShell(t, rec.Agent, "dd if=/dev/urandom of=/data/home.bin bs=64k count=8 status=none && sync && sha256sum /data/home.bin")
	stopped := time.Now()
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := runErr(t, "failback", "vm1", "--finalize", "--json", "--shutdown-timeout", "60s", "--wait", "100s", "-c", drCfg)
		done <- result{out, err}
	}()
	// Production runs its start: command once the VM is handed over: the
	// recovered VM is gone by then. The test then boots the guest on
	// production's disk, as the command would have.
	var home *testguest.Guest
	var foldImage string
	deadline := time.Now().Add(90 * time.Second)
	for home == nil {
		select {
		case res := <-done:
			t.Fatalf("the finalize ended before production asked for the VM to start: %v\n%s", res.err, res.out)
		case <-time.After(100 * time.Millisecond):
		}
		if _, err := os.Stat(r.startRequested); err != nil {
			if time.Now().After(deadline) {
				t.Fatalf("production did not run the VM's start: command within 90 s of the finalize's start")
			}
			continue
		}
		if rec.Alive() {
			t.Errorf("production ran the VM's start: command while the recovered VM's QEMU (pid %d) still ran", rec.PID)
		}
		if st := run(t, "status", "-c", prodCfg); !strings.Contains(st, "coming-home") {
			t.Errorf("status at production while the VM starts:\n%s", st)
		}
		// The disk the VM starts on is the recovery site's newest point, the fold.
		images, _ := filepath.Glob(filepath.Join(dir, "dr", "recovery", "vms", "vm1", "vda", "????????????????.qcow2"))
		slices.Sort(images)
		if len(images) == 0 {
			t.Fatal("the recovery site holds no point image of vm1")
		}
		foldImage = images[len(images)-1]
		if cmp, err := exec.Command("qemu-img", "compare", "-U", g.DiskImage(), foldImage).CombinedOutput(); err != nil {
			t.Fatalf("the production disk, when the VM is to start, differs from the recovery site's newest point %s: %v\n%s", foldImage, err, cmp)
		}
		home = testguest.Boot(t, testguest.Options{Name: "fb-home", Image: g.DiskImage()})
		r.plug(home)
	}
	res := <-done
	if res.err != nil {
		t.Fatalf("lifeboat failback vm1 --finalize: %v\n%s", res.err, res.out)
	}
	var fin struct {
		ShutDown bool          `json:"shut_down"`
		Took     time.Duration `json:"took_ns"`
		Down     time.Duration `json:"down_ns"`
		Home     string        `json:"home"`
		Epoch    uint64        `json:"epoch"`
		Last     struct {
			ID uint64 `json:"id"`
		} `json:"last"`
		Fold struct {
			ID          uint64 `json:"id"`
			Consistency string `json:"consistency"`
		} `json:"fold"`
		Resumed *pointJSON `json:"resumed"`
	}
	if err := json.Unmarshal([]byte(res.out), &fin); err != nil {
		t.Fatalf("failback --finalize --json: %v\n%s", err, res.out)
	}
	t.Logf("lifeboat failback vm1 --finalize took %v from the guest's power-off request to production's disks released; the VM was down %v until its first point at production (%v from the finalize's start; the test guest's TCG boot took %v of it):\n%s",
		fin.Took.Round(time.Millisecond), fin.Down.Round(time.Millisecond), time.Since(stopped).Round(time.Millisecond), home.BootTime().Round(time.Millisecond), res.out)
	if !fin.ShutDown || fin.Home != "prod" || fin.Epoch != 3 || fin.Last.ID != 5 || fin.Fold.ID != 3 || fin.Fold.Consistency != "filesystem" {
		t.Errorf("finalize: %+v; want the guest powered off, home prod under epoch 3, production at failback point 5, point 3 here (filesystem)", fin)
	}
	// The VM replicates again from production, incrementally from the fold's point.
	if p := fin.Resumed; p == nil || p.ID != fin.Fold.ID+1 || p.Site != "prod" || len(p.Disks) != 1 || p.Disks[0].Resync || p.Disks[0].Base != fin.Fold.ID || p.Stats.BytesSent > 16<<20 {
		t.Errorf("production's first point after the finalize: %+v; want point %d from prod, incremental from point %d, a few MiB at most", p, fin.Fold.ID+1, fin.Fold.ID)
	} else {
		t.Logf("production's first point after the finalize: %d, %d bytes sent", p.ID, p.Stats.BytesSent)
	}
	if fin.Down <= 0 || fin.Down > 100*time.Second {
		t.Errorf("finalize: down %v: want the time from the guest's stop to production's first point", fin.Down)
	}
	if want := filepath.Join(dir, "dr", "recovery", "vms", "vm1", "vda", fmt.Sprintf("%016d.qcow2", fin.Fold.ID)); foldImage != want {
		t.Errorf("production's disk was compared with %s, the recovery site's newest point when the VM was started; the fold is %s", foldImage, want)
	}
	if got := guestShell(t, home.AgentSocket(), "sha256sum /data/home.bin"); got != sum {
		t.Errorf("the file the recovered guest wrote last reads at production as %q, want %q", got, sum)
	}
	if st := run(t, "failover", "--list", "-c", drCfg); strings.Contains(st, "vm1") {
		t.Errorf("the failover run is still listed after the finalize:\n%s", st)
	}
	if out, err := runErr(t, "failback", "vm1", "-c", drCfg); err == nil {
		t.Errorf("a failback after the finalize was taken:\n%s", out)
	}
	if st := run(t, "status", "-c", prodCfg); strings.Contains(st, "coming-home") || strings.Contains(st, "failed-over") {
		t.Errorf("status at production once the VM replicates again:\n%s", st)
	}
}

// guestShell runs a shell script in a guest through its agent and returns its output.
func guestShell(t *testing.T, agent, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := qga.Dial(ctx, agent)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	r, err := a.Exec(ctx, "/bin/sh", []string{"-c", script}, nil)
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("in the guest: %q: %v (exit %d) %s", script, err, r.ExitCode, r.Stderr)
	}
	return string(r.Stdout)
}

// qemuIO runs one qemu-io command on an image.
func qemuIO(t *testing.T, image, command string) {
	t.Helper()
	if out, err := exec.Command("qemu-io", "-c", command, image).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %q %s: %v\n%s", command, image, err, out)
	}
}

// pause stops a VM's CPUs through its QMP socket, cont resumes them.
func pause(t *testing.T, socket string) { qmpCommand(t, socket, "stop") }
func cont(t *testing.T, socket string)  { qmpCommand(t, socket, "cont") }

func qmpCommand(t *testing.T, socket, command string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := qemu.Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Execute(ctx, command, nil, nil); err != nil {
		t.Fatalf("%s on %s: %v", command, socket, err)
	}
}

// Kill -9 of either site at a random moment of a failback cycle or of a
// finalize (the seed is logged; LIFEBOAT_SEED replays it): the step run
// again completes (after a killed cycle, a finalize follows), the
// recovered VM no longer runs, production's disk holds exactly the
// recovery site's new point, and the VM started at production has the file
// its recovered guest wrote last and replicates incrementally. Two rounds
// here, twenty under `make soak`.
func TestFailbackFinalizeKill(t *testing.T) {
	rounds := 2
	if !testenv.Short() {
		rounds = 20
	}
	rng := rand.New(rand.NewPCG(testenv.Seed(t), 1))
	for round := range rounds {
		victim := []string{"dr", "prod"}[rng.IntN(2)]
		delay := time.Duration(rng.Int64N(int64(3 * time.Second)))
		step := []string{"finalize", "cycle"}[round%2]
		if step == "cycle" {
			delay /= 6 // a failback cycle of the guest's 32 MiB takes a few tenths of a second
		}
		t.Run(fmt.Sprintf("%d-%s-kill-%s-after-%v", round, step, victim, delay.Round(time.Millisecond)), func(t *testing.T) {
			finalizeKillRound(t, step, victim, delay)
		})
	}
}

func finalizeKillRound(t *testing.T, step, victim string, delay time.Duration) {
	r := newFailbackRig(t)
	r.prod = startSite(t, "prod", r.prodCfg)
	run(t, "failback", "vm1", "-c", r.drCfg)
	count := 16
	if step == "cycle" {
		count = 512 // enough for the cycle to be cut in the middle
	}
	sum := guestShell(t, r.rec.Agent, fmt.Sprintf("dd if=/dev/urandom of=/data/last.bin bs=64k count=%d status=none && sync && sha256sum /data/last.bin", count))
	sites := map[string]*site{"dr": r.dr, "prod": r.prod}
	finalize := []string{"failback", "vm1", "--finalize", "--json", "--shutdown-timeout", "60s", "--wait", "0", "-c", r.drCfg}
	var out []byte
	if step == "cycle" {
		untilDone(t, []string{"failback", "vm1", "-c", r.drCfg}, sites[victim], delay)
		out = []byte(run(t, finalize...))
	} else {
		out = untilDone(t, finalize, sites[victim], delay)
	}
	var fin struct {
		Fold struct {
			ID uint64 `json:"id"`
		} `json:"fold"`
	}
	if err := json.Unmarshal(out, &fin); err != nil || fin.Fold.ID == 0 {
		t.Fatalf("finalize --json: %v\n%s", err, out)
	}
	if r.rec.Alive() {
		t.Errorf("the recovered VM's QEMU (pid %d) still runs after the finalize", r.rec.PID)
	}
	foldImage := filepath.Join(r.dir, "dr", "recovery", "vms", "vm1", "vda", fmt.Sprintf("%016d.qcow2", fin.Fold.ID))
	if cmp, err := exec.Command("qemu-img", "compare", "-U", r.g.DiskImage(), foldImage).CombinedOutput(); err != nil {
		t.Fatalf("the production disk after the finalize differs from the recovery site's point %d: %v\n%s", fin.Fold.ID, err, cmp)
	}
	home := testguest.Boot(t, testguest.Options{Name: "fb-home", Image: r.g.DiskImage()})
	if got := guestShell(t, home.AgentSocket(), "sha256sum /data/last.bin"); got != sum {
		t.Errorf("the file the recovered guest wrote last reads at production as %q, want %q", got, sum)
	}
	// Production restarts before the VM has replicated from there (killed
	// first, its homecoming cannot have cycled): the restarted site brings
	// the VM home by itself, and its first cycle is incremental.
	r.prod.kill()
	r.plug(home)
	r.prod.start(t)
	type pointJSON struct {
		ID    uint64 `json:"id"`
		Site  string `json:"site"`
		Disks []struct {
			Resync bool   `json:"resync"`
			Base   uint64 `json:"base"`
		} `json:"disks"`
	}
	var next pointJSON
	for deadline := time.Now().Add(60 * time.Second); next.ID <= fin.Fold.ID; time.Sleep(250 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the restarted production site sent no point within 60 s of the VM running there; the recovery site's points:\n%s", run(t, "points", "vm1", "-c", r.drCfg))
		}
		var pts []json.RawMessage
		if err := json.Unmarshal([]byte(run(t, "points", "vm1", "--json", "-c", r.drCfg)), &pts); err != nil || len(pts) == 0 {
			t.Fatalf("points --json: %v", err)
		}
		for _, raw := range pts { // the newest
			var p struct {
				ID uint64 `json:"id"`
			}
			if err := json.Unmarshal(raw, &p); err != nil {
				t.Fatal(err)
			}
			if p.ID > next.ID {
				next = pointJSON{} // a fresh value: omitted fields must not keep an older point's
				if err := json.Unmarshal(raw, &next); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if next.ID != fin.Fold.ID+1 || next.Site != "prod" || len(next.Disks) != 1 || next.Disks[0].Resync || next.Disks[0].Base != fin.Fold.ID {
		t.Errorf("production's first point after the finalize: %+v; want point %d from prod, incremental from point %d; production's log:\n%s", next, fin.Fold.ID+1, fin.Fold.ID, readFile(r.prod.log))
	}
	// Home now: the finished failback's record no longer refuses a new one.
	rec, err := os.ReadFile(filepath.Join(r.dir, "prod", "failback", "vm1.home.json"))
	if err != nil || !strings.Contains(string(rec), `"resumed": true`) {
		t.Errorf("production's record of the finished failback after its first point: %v\n%s", err, rec)
	}
}

// untilDone runs lifeboat with args, kills victim (kill -9) delay after the
// start of the first attempt and starts it again, then runs the command
// again until it succeeds (at most 3 more times), and returns its stdout.
func untilDone(t *testing.T, args []string, victim *site, delay time.Duration) []byte {
	t.Helper()
	var out []byte
	for attempt := 0; ; attempt++ {
		if attempt == 4 {
			t.Fatalf("lifeboat %v did not complete in 4 attempts; the last said:\n%s", args, out)
		}
		cmd := exec.Command(binary, args...)
		var buf, errBuf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &errBuf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if attempt == 0 {
			time.Sleep(delay)
			victim.kill()
		}
		err := cmd.Wait()
		out = append(buf.Bytes(), errBuf.Bytes()...)
		if attempt == 0 {
			t.Logf("attempt 0, %s killed after %v: %v\n%s", victim.name, delay, err, out)
			victim.start(t)
		}
		if err == nil {
			return buf.Bytes() // the first attempt may have finished before the kill
		}
		t.Logf("attempt %d: %v\n%s", attempt, err, out)
		time.Sleep(time.Second) // as a user would, before trying again
	}
}

// A finalize after a failover from a point before the latest: the fold is
// written on top of the latest point, so the blocks that point changed
// after the failover's, which the recovered VM holds as the earlier point
// had them, are sent too (production wrote 256 KiB into free space of its
// disk between its two points, which the recovered VM never has).
// Production's disk, after the last failback cycle, then equals the fold's
// point here: both are the recovered VM's last state.
func TestFailbackFinalizeFromEarlierPoint(t *testing.T) {
	r := newFailbackRig(t, rigOptions{failover: []string{"--point", "1"}, betweenSyncs: func(g *testguest.Guest) {
		// As a guest write, through the VM's block layer; past the guest
		// file system's data (a small file system on a larger disk).
		out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0xab 200M 256k",
			"nbd+unix:///vda?socket="+g.StorageNBDSocket()).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-io: %v\n%s", err, out)
		}
	}})
	if r.rec.Point != 1 {
		t.Fatalf("the failover started from point %d, want 1", r.rec.Point)
	}
	startSite(t, "prod", r.prodCfg)
	guestShell(t, r.rec.Agent, "echo after-failover >> /data/counter && sync")
	out, err := runErr(t, "failback", "vm1", "--finalize", "--json", "--shutdown-timeout", "60s", "--wait", "0", "-c", r.drCfg)
	if err != nil {
		t.Fatalf("lifeboat failback vm1 --finalize after a failover from point 1: %v\n%s", err, out)
	}
	var fin struct {
		Fold pointJSON `json:"fold"`
	}
	if err := json.Unmarshal([]byte(out), &fin); err != nil {
		t.Fatalf("failback --finalize --json: %v\n%s", err, out)
	}
	if fin.Fold.ID != 3 || len(fin.Fold.Disks) != 1 || fin.Fold.Disks[0].Resync || fin.Fold.Disks[0].Base != 2 {
		t.Errorf("the fold: %+v; want point 3, on top of the latest point 2, not a resync", fin.Fold)
	}
	fold := filepath.Join(r.dir, "dr", "recovery", "vms", "vm1", "vda", fmt.Sprintf("%016d.qcow2", fin.Fold.ID))
	if cmp, err := exec.Command("qemu-img", "compare", "-U", r.g.DiskImage(), fold).CombinedOutput(); err != nil {
		t.Fatalf("production's disk after the finalize differs from the fold's point %s: %v\n%s", fold, err, cmp)
	}
}

// A finalize that fails after its fold (here production cannot write its
// finished-failback record; in life a network cut or a restart of
// production) leaves the recovered VM stopped. The operator resumes the
// service at the recovery site meanwhile and the guest writes. The next
// finalize is refused while the VM runs; once it is stopped, the finalize
// must not reuse the old fold, which lacks those writes: the VM's disk
// must reach production and this site's chain alike, so production's disk
// equals a new fold point, not the old one.
func TestFailbackFinalizeAfterTheVMRanAgain(t *testing.T) {
	r := newFailbackRig(t)
	r.prod = startSite(t, "prod", r.prodCfg)
	run(t, "failback", "vm1", "-c", r.drCfg)
	home := filepath.Join(r.dir, "prod", "failback", "vm1.home.json")
	if err := os.WriteFile(home, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	finalize := []string{"failback", "vm1", "--finalize", "--json", "--shutdown-timeout", "60s", "--wait", "0", "-c", r.drCfg}
	if out, err := runErr(t, finalize...); err == nil || !strings.Contains(out, "vm1.home.json") {
		t.Fatalf("a finalize whose FinishFailback production refused: %v\n%s", err, out)
	}
	points := filepath.Join(r.dir, "dr", "recovery", "vms", "vm1", "vda")
	images, _ := filepath.Glob(filepath.Join(points, "????????????????.qcow2"))
	slices.Sort(images)
	firstFold := images[len(images)-1]
	if err := os.Remove(home); err != nil {
		t.Fatal(err)
	}

	// The service comes back here: the guest powered off, so it is reset and run.
	qmpCommand(t, r.rec.QMP, "system_reset")
	cont(t, r.rec.QMP)
	waitAgent(t, r.rec.Agent)
	guestShell(t, r.rec.Agent, "dd if=/dev/urandom of=/data/late.bin bs=64k count=8 status=none && sync")
	if out, err := runErr(t, finalize...); err == nil || !strings.Contains(out, "runs here again") {
		t.Fatalf("a finalize while the recovered VM runs again: %v\n%s", err, out)
	}
	pause(t, r.rec.QMP)
	out := run(t, finalize...)
	var fin struct {
		ShutDown bool `json:"shut_down"`
		Last     struct {
			ID uint64 `json:"id"`
		} `json:"last"`
		Fold struct {
			ID uint64 `json:"id"`
		} `json:"fold"`
	}
	if err := json.Unmarshal([]byte(out), &fin); err != nil {
		t.Fatalf("failback --finalize --json: %v\n%s", err, out)
	}
	fold := filepath.Join(points, fmt.Sprintf("%016d.qcow2", fin.Fold.ID))
	if fold == firstFold {
		t.Fatalf("the finalize reused fold %s, taken before the VM ran again", firstFold)
	}
	if !fin.ShutDown {
		t.Errorf("the finalize did not power the guest off cleanly before its new fold:\n%s", out)
	}
	if cmp, err := exec.Command("qemu-img", "compare", "-U", r.g.DiskImage(), fold).CombinedOutput(); err != nil {
		t.Errorf("production's disk (failback point %d) differs from the recovery site's fold point %d, which production's next cycle continues: %v\n%s", fin.Last.ID, fin.Fold.ID, err, cmp)
	}
	if err := exec.Command("qemu-img", "compare", "-U", r.g.DiskImage(), firstFold).Run(); err == nil {
		t.Errorf("production's disk equals the fold taken before the VM ran again (%s): the guest's later writes are lost", firstFold)
	}
}

// waitAgent waits until a guest's agent answers.
func waitAgent(t *testing.T, socket string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		a, err := qga.Dial(ctx, socket)
		if err == nil {
			err = a.Ping(ctx)
			a.Close()
		}
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's agent %s did not answer within 2 minutes: %v", socket, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// A failover cannot be undone once a failback began: its cycles wrote the
// recovered VM's state into production's disks over production's own
// writes after its last point (the rig's 192 KiB of 0x5a at 3 MiB), so an
// undo would hand production disks that hold neither its state nor the
// recovered VM's. The undo is refused and says what to do; the recovered
// VM runs on and the failback can still be finished. A failback that
// production never took (it was down) does not count.
func TestFailoverUndoRefusedAfterAFailback(t *testing.T) {
	r := newFailbackRig(t)
	if out, err := runErr(t, "failback", "vm1", "-c", r.drCfg); err == nil {
		t.Fatalf("a failback with production down went through:\n%s", out)
	}
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", r.drCfg)), &runs); err != nil || len(runs) != 1 || !runs[0].FailbackSince.IsZero() {
		t.Errorf("the run after a failback production did not take: %+v %v; want one, no failback begun", runs, err)
	}
	r.prod = startSite(t, "prod", r.prodCfg)
	run(t, "failback", "vm1", "-c", r.drCfg)
	out, err := runErr(t, "failover", "vm1", "--undo", "-c", r.drCfg)
	if err == nil {
		t.Fatalf("the failover was undone after a failback cycle had written into production's disks:\n%s", out)
	}
	for _, want := range []string{`vm "vm1"`, "a failback to \"prod\" began", "lifeboat failback vm1 --finalize"} {
		if !strings.Contains(out, want) {
			t.Errorf("the undo's refusal lacks %q:\n%s", want, out)
		}
	}
	if !r.rec.Alive() {
		t.Errorf("the recovered VM's QEMU (pid %d) is gone after the refused undo", r.rec.PID)
	}
	if st := run(t, "status", "-c", r.prodCfg); !strings.Contains(st, "failing back from dr") {
		t.Errorf("status at production after the refused undo:\n%s", st)
	}
	// The failback goes on.
	run(t, "failback", "vm1", "-c", r.drCfg)
}

// A finalize completes, but the VM never runs at production (its host is
// lost again before the VM starts), so production's record of the
// finished failback stays "not resumed". The VM fails over again, from
// the fold point, and its failback must be taken: it is a new failover's,
// not a late retry of the finished one (which production refuses).
// Production's disk then equals the recovered VM's.
func TestFailbackAfterAFinalizeTheVMNeverRanAfter(t *testing.T) {
	r := newFailbackRig(t)
	r.prod = startSite(t, "prod", r.prodCfg)
	run(t, "failback", "vm1", "-c", r.drCfg)
	run(t, "failback", "vm1", "--finalize", "--shutdown-timeout", "60s", "--wait", "0", "-c", r.drCfg)
	r.prod.kill()
	t.Logf("second failover:\n%s", run(t, "failover", "vm1", "--force", "-c", r.drCfg))
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", r.drCfg)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	second := runs[0]
	t.Cleanup(func() {
		if second.Alive() {
			syscall.Kill(second.PID, syscall.SIGKILL) // its failover cannot be undone after the failback
		}
	})
	r.prod.start(t)
	pause(t, second.QMP)
	if out, err := runErr(t, "failback", "vm1", "-c", r.drCfg); err != nil {
		t.Fatalf("the failback of a new failover from point %d, after a finalize whose VM never ran at production, is refused: %v\n%s", second.Point, err, out)
	}
	if cmp, err := exec.Command("qemu-img", "compare", "-U", r.g.DiskImage(), second.Overlays["vda"]).CombinedOutput(); err != nil {
		t.Errorf("production's disk after the failback differs from the recovered VM's: %v\n%s", err, cmp)
	}
}

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// stopBound is how long a site may take to stop on SIGTERM in the middle of
// a cycle: its cycle is cancelled and cleaned up, not waited for.
const stopBound = 30 * time.Second

// stop is systemd's stop: SIGTERM, then a wait of at most stopBound for the
// site to exit. It returns how long the site took and how it exited.
func (s *site) stop(t *testing.T) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		s.cmd = nil
		return time.Since(start), err
	case <-time.After(stopBound):
		s.kill()
		t.Fatalf("site %s still ran %v after SIGTERM; its log:\n%s", s.name, stopBound, readFile(s.log))
		return 0, nil
	}
}

// vmBlockState is what of the VM's QEMU a cycle adds and must take away
// again: its block nodes and its exports.
func vmBlockState(t *testing.T, qmp string) (nodes, exports []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := qemu.Dial(ctx, qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ns, err := m.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		nodes = append(nodes, n.NodeName)
	}
	es, err := m.Exports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		exports = append(exports, e.ID)
	}
	slices.Sort(nodes)
	slices.Sort(exports)
	return nodes, exports
}

// SIGTERM, systemd's stop, of either site in the middle of a cycle (the
// protected site's while its recovery site hangs): the site exits cleanly
// within stopBound, the VM's QEMU is left as it was before the
// cycle (no fleece node, no export), the recovery site's writer daemon is
// gone, no point appears, and after a restart the next cycle is incremental
// and byte-exact.
func TestStopSitesMidCycle(t *testing.T) {
	d := deploy(t, 256<<20)
	if err := d.guest.Fill(context.Background(), 0.3); err != nil {
		t.Fatal(err)
	}
	run(t, "sync", "vm1", "-c", d.prod.config)
	nodes0, exports0 := vmBlockState(t, d.vm.QMPSocket())
	committed := d.points(t, d.dr.config)[0].ID
	for _, victim := range []*site{d.prod, d.dr} {
		sync, out := d.startLongSync(t)
		waitWriting(t, d.dir)
		if victim == d.prod {
			// The recovery site stops answering (SIGSTOP: the one way to
			// make a real site hang): the cycle cannot end by itself, and
			// the protected site must still stop, and clean up, at once.
			if err := d.dr.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
		}
		took, err := victim.stop(t)
		if victim == d.prod {
			d.dr.cmd.Process.Signal(syscall.SIGCONT)
		}
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatal(err)
		}
		if err != nil {
			t.Errorf("site %s exited with %v on SIGTERM; want 0; its log:\n%s", victim.name, err, readFile(victim.log))
		}
		t.Logf("site %s stopped %v after SIGTERM mid-cycle", victim.name, took.Round(time.Millisecond))
		if err := sync.Wait(); err == nil {
			t.Logf("the cycle finished before %s stopped", victim.name)
		} else {
			t.Logf("sync failed as it should when %s stopped: %s", victim.name, strings.TrimSpace(out.String()))
		}
		// The recovery site drops the point it was writing, and its writer,
		// whichever side stopped (a stopped sender ends its stream).
		for deadline := time.Now().Add(10 * time.Second); processWith("qemu-storage-daemon", d.dir+"/dr"); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the recovery site's writer daemon still runs 10 s after %s stopped", victim.name)
			}
		}
		if victim == d.prod {
			// The stopped protected site took back everything it added.
			if nodes, exports := vmBlockState(t, d.vm.QMPSocket()); !slices.Equal(nodes, nodes0) || !slices.Equal(exports, exports0) {
				t.Errorf("the VM's QEMU after its site stopped mid-cycle: nodes %v, exports %v; before the cycle: %v, %v", nodes, exports, nodes0, exports0)
			}
		}
		victim.start(t)
		pts := d.points(t, d.dr.config)
		if latest := pts[len(pts)-1].ID; latest != committed && latest != committed+1 {
			t.Fatalf("latest point %d after a cycle cut by a stop, want %d (or %d if it committed first)", latest, committed, committed+1)
		} else {
			committed = latest
		}
		want := d.hashes(t)
		run(t, "sync", "vm1", "-c", d.prod.config)
		committed++
		pts = d.points(t, d.dr.config)
		last := pts[len(pts)-1]
		if last.ID != committed {
			t.Fatalf("latest point %d after the restart's cycle, want %d", last.ID, committed)
		}
		for _, dk := range last.Disks {
			if dk.Resync {
				t.Errorf("point %d disk %s after %s stopped mid-cycle: a resync, want the change tracking to survive a clean stop", last.ID, dk.Name, victim.name)
			}
		}
		d.checkLatest(t, want)
		run(t, "verify", "vm1", "-c", d.dr.config)
	}
}

// A site killed while a command waited for its answer: the command said
// `lifeboat site at SOCKET: Post "http://lifeboat/v1/vms/vm1/failover":
// EOF`, neither what happened nor what to do. The site is stopped
// (SIGSTOP) before the command, which its socket still takes, then killed.
func TestSiteKilledBeforeItAnswered(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	for _, args := range [][]string{
		{"failover", "vm1", "--test", "--agent-wait", "0"},
		{"export", "vm1", "-o", filepath.Join(d.dir, "vm1.raw")},
	} {
		if err := d.dr.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(binary, append(args, "-c", d.dr.config)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // the request is in the site's socket
		d.dr.kill()
		err := cmd.Wait()
		t.Logf("lifeboat %s, its site killed: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
		if err == nil || !strings.Contains(out.String(), "ended before it answered") || !strings.Contains(out.String(), "lifeboat status") {
			t.Errorf("lifeboat %s, its site killed before it answered: %v\n%s\nwant it to say so, and where to look", strings.Join(args, " "), err, out.String())
		}
		d.dr.start(t)
	}
}

// A site killed while an export ran left qemu-img writing on (its child
// outlived it) and the export's hidden temporary image beside the output,
// as large as the disk, for good. The next export to the same file removes
// both. The site's qemu-img is a script that stops itself (SIGSTOP) before
// it converts, so that the kill lands mid-export.
func TestExportCutShortByAKill(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	if err := d.guest.Fill(context.Background(), 0.5); err != nil {
		t.Fatal(err)
	}
	want := d.hashes(t)
	run(t, "sync", "vm1", "-c", d.prod.config)
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	wrap := t.TempDir()
	script := "#!/bin/sh\ncase \" $* \" in *\" convert \"*) kill -STOP $$ ;; esac\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(filepath.Join(wrap, "qemu-img"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	path := os.Getenv("PATH")
	t.Setenv("PATH", wrap+":"+path)
	d.dr.kill()
	d.dr.start(t)

	out := filepath.Join(d.dir, "vm1.raw")
	export := exec.Command(binary, "export", "vm1", "-o", out, "-c", d.dr.config)
	if err := export.Start(); err != nil {
		t.Fatal(err)
	}
	converter := 0
	for deadline := time.Now().Add(30 * time.Second); converter == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			export.Process.Kill()
			t.Fatal("the export's qemu-img did not start in 30 s")
		}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if strings.Contains(string(cmd), "\x00convert\x00") && strings.Contains(string(cmd), exportTempName(out)) {
				converter = pid
			}
		}
	}
	t.Cleanup(func() { syscall.Kill(converter, syscall.SIGKILL) })
	d.dr.kill()
	export.Wait()
	if temps, _ := filepath.Glob(filepath.Join(d.dir, exportTempName(out)+"*")); len(temps) != 1 {
		t.Fatalf("after the kill, temporary images %v, want the one of the export cut short", temps)
	}
	t.Setenv("PATH", path)
	d.dr.start(t)
	run(t, "export", "vm1", "-o", out, "-c", d.dr.config)
	if temps, _ := filepath.Glob(filepath.Join(d.dir, exportTempName(out)+"*")); len(temps) != 0 {
		t.Errorf("after an export to the same file, the temporary images %v are left", temps)
	}
	if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", converter)); err == nil && len(cmd) > 0 {
		t.Errorf("the qemu-img of the export cut short (pid %d) still runs: %q", converter, cmd)
	}
	if got := exportSHA256(t, out); got != want["vda"] {
		t.Errorf("the export after one cut short differs from the disk at its point")
	}
}

// exportTempName starts the name of an export's temporary image beside out
// (recovery.Export's).
func exportTempName(out string) string { return "." + filepath.Base(out) + ".lifeboat-export-" }

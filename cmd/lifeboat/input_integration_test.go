package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
)

// A verify asked over the local API for point "abc" is refused naming it:
// it verified the latest point and answered OK.
func TestVerifyAPIBadPoint(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	c := apiClient(filepath.Join(d.dir, "dr", "api.sock"))
	for _, point := range []string{"abc", "-1", "1.5"} {
		resp, err := c.Post("http://lifeboat/v1/vms/vm1/verify?point="+point, "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), point) {
			t.Errorf("verify of point %q over the API: %d %s, want it refused naming the point", point, resp.StatusCode, b)
		}
	}
}

// Bad input on the command line gets an error naming it and what to do,
// never a panic: a VM named ".." got "404 Not Found" (the API's path
// lost it), one with '/' or "../vm1" an answer about a VM that cannot be.
func TestBadInputNamed(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	for _, args := range [][]string{
		{"verify", "vm1", "--point", "abc"},
		{"verify", "vm1", "--point", "0"},
		{"verify", "vm1", "--point", "99"},
		{"export", "vm1", "--point", "99", "-o", filepath.Join(d.dir, "x.raw")},
		{"export", "vm1", "-o", filepath.Join(d.dir, "missing", "x.raw")},
		{"points", "../vm1"},
		{"verify", "a/b"},
		{"verify", ".."},
		{"verify", strings.Repeat("v", 300)},
		{"failover", "a/b", "--test"},
		{"plan", "run", "no-such-plan", "--test"},
	} {
		out, err := runErr(t, append(args, "-c", d.dr.config)...)
		t.Logf("lifeboat %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out))
		if strings.Contains(out, "panic") || strings.Contains(out, "goroutine ") {
			t.Errorf("lifeboat %s panicked: %s", strings.Join(args, " "), out)
		}
		if err == nil || strings.Contains(out, "404") {
			t.Errorf("lifeboat %s: %v: %s, want an error saying what is wrong", strings.Join(args, " "), err, out)
		}
		if strings.Contains(out, "STEP") {
			t.Errorf("lifeboat %s printed a summary of nothing: %s", strings.Join(args, " "), out)
		}
	}
}

// export -o named a path that the export's rename then replaced: a FIFO or
// a device node (`-o /dev/sdb` left a regular file in /dev and the disk as
// it was), or a file of the site's own state (a point's image, the
// catalog), which the site then read as an exported raw disk. Each is
// refused, naming it and what to do, and stays as it was; so is a relative
// path asked over the API, which the site read against its own directory.
func TestExportRefusesOutputsItWouldReplace(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	pts := d.points(t, d.dr.config)
	image := pts[0].Disks[0].File
	sum := exportSHA256(t, image)
	fifo := filepath.Join(d.dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ out, want string }{
		{image, "state_dir"},
		{filepath.Join(d.dir, "dr", "x.raw"), "state_dir"},
		{fifo, "not a regular file"},
	} {
		out, err := runErr(t, "export", "vm1", "-o", tc.out, "-c", d.dr.config)
		if err == nil || !strings.Contains(out, tc.out) || !strings.Contains(out, tc.want) {
			t.Errorf("export -o %s: %v\n%s\nwant it refused, naming it and %q", tc.out, err, out, tc.want)
		}
	}
	if exportSHA256(t, image) != sum {
		t.Errorf("the image of point 1 changed under an export to it")
	}
	if fi, err := os.Lstat(fifo); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("the FIFO an export was refused to: %v %v", fi.Mode(), err)
	}
	if _, err := os.Stat(filepath.Join(d.dir, "dr", "x.raw")); err == nil {
		t.Errorf("an export was written into the state_dir")
	}

	rel := fmt.Sprintf("lifeboat-export-%d.raw", os.Getpid())
	t.Cleanup(func() { os.Remove(rel) }) // where the old site wrote it: its working directory
	resp, err := apiClient(filepath.Join(d.dir, "dr", "api.sock")).Post("http://lifeboat/v1/vms/vm1/export", "application/json",
		strings.NewReader(`{"out": "`+rel+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), rel) || !strings.Contains(string(b), "absolute") {
		t.Errorf("export to a relative path over the API: %d %s\nwant it refused, naming it", resp.StatusCode, b)
	}
}

// A negative duration was taken as the default or as none (`failover
// --planned --shutdown-timeout -1s` said "up to -1s" and waited 2 minutes):
// it is refused, naming the flag, before the site is asked anything.
func TestNegativeDurationsRefused(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "site.yaml") // never read: the flag is refused first
	for _, args := range [][]string{
		{"failover", "vm1", "--agent-wait", "-1s"},
		{"failover", "vm1", "--planned", "--shutdown-timeout", "-1s"},
		{"failback", "vm1", "--finalize", "--shutdown-timeout", "-1m"},
		{"failback", "vm1", "--finalize", "--wait", "-1s"},
		{"protect", "vm1", "--reverse", "--interval", "-5m"},
	} {
		out, err := runErr(t, append(args, "-c", cfg)...)
		flag := args[len(args)-2]
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(out, flag) {
			t.Errorf("lifeboat %s: %v\n%s\nwant a usage error naming %s", strings.Join(args, " "), err, out, flag)
		}
	}
}

// `points --json` of a VM the recovery site holds nothing of printed
// "null", which a script reading a list of points fails on: it prints [].
func TestPointsOfAnUnknownVMAsJSON(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	if out := strings.TrimSpace(run(t, "points", "nosuchvm", "--json", "-c", d.dr.config)); out != "[]" {
		t.Errorf("points nosuchvm --json at the recovery site: %q, want []", out)
	}
}

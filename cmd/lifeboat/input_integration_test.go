package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
)

// A verify asked over the local API for point "abc" is refused naming it:
// it verified the latest point and answered OK.
func TestVerifyAPIBadPoint(t *testing.T) {
	d := deployDisks(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(d.dir, "dr", "api.sock"))
	}}}
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

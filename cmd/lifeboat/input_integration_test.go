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


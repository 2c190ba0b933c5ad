package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A second site started on a state_dir a running site serves (a copied
// config, its api_socket changed) is refused, naming the first. Before, a
// protected site started and ran the same VMs' cycles, each clearing the
// other's fleece as a dead lifeboat's; a recovery site was refused by its
// catalog's lock without saying whose, after it had thawed the first's
// guests as left frozen.
func TestSecondSiteOnAStateDirIsRefused(t *testing.T) {
	d := deploy(t, 16<<20)
	for _, s := range []*site{d.prod, d.dr} {
		cfg, err := os.ReadFile(s.config)
		if err != nil {
			t.Fatal(err)
		}
		second := filepath.Join(d.dir, s.name+"-again.yaml")
		again := string(cfg) + fmt.Sprintf("api_socket: %s\n", filepath.Join(d.dir, s.name+"-again.sock"))
		if s == d.dr {
			again = strings.Replace(again, "listen: ", "listen: 127.0.0.1:0\n# was: ", 1)
		}
		if err := os.WriteFile(second, []byte(again), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		out, err := exec.CommandContext(ctx, binary, "serve", "-c", second).CombinedOutput()
		timedOut := ctx.Err() != nil
		cancel()
		want := fmt.Sprintf("site %q, pid %d", s.name, s.cmd.Process.Pid)
		if timedOut || err == nil || !strings.Contains(string(out), want) {
			t.Fatalf("a second `lifeboat serve` on site %s's state_dir: %v (ran for the whole 15 s: %v)\n%s\nwant it refused, naming %s", s.name, err, timedOut, out, want)
		}
		if _, err := runErr(t, "status", "-c", s.config); err != nil {
			t.Fatalf("site %s after the refusal: %v", s.name, err)
		}
	}
}

package qemu_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// testCtx is the bound for one test's QEMU conversations.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// qemuIO runs qemu-io commands on an NBD URI (or image) and fails the test on
// any error, including a pattern mismatch.
func qemuIO(t testing.TB, readOnly bool, target string, cmds ...string) {
	t.Helper()
	if err := tryQemuIO(t, readOnly, target, cmds...); err != nil {
		t.Fatal(err)
	}
}

func tryQemuIO(t testing.TB, readOnly bool, target string, cmds ...string) error {
	t.Helper()
	args := []string{"-f", "raw"}
	if readOnly {
		args = append(args, "-r")
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, target)
	if out, err := runTool(t, "qemu-io", args...); err != nil {
		return fmt.Errorf("qemu-io %s on %s: %w: %s", strings.Join(cmds, "; "), target, err, out)
	}
	return nil
}

// extent is one entry of nbdinfo --map.
type extent struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        int    `json:"type"`
	Description string `json:"description"`
}

// dirtyMap returns the dirty extents a bitmap published on an export holds.
func dirtyMap(t testing.TB, uri, bitmap string) []extent {
	t.Helper()
	testenv.RequireTools(t, "nbdinfo")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nbdinfo", "--json", "--map=qemu:dirty-bitmap:"+bitmap, uri).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo --map=qemu:dirty-bitmap:%s %s: %v: %s", bitmap, uri, err, out)
	}
	var all []extent
	if err := json.Unmarshal(out, &all); err != nil {
		t.Fatalf("nbdinfo output: %v: %s", err, out)
	}
	var dirty []extent
	for _, e := range all {
		if e.Type&1 != 0 {
			dirty = append(dirty, e)
		}
	}
	return dirty
}

// runTool runs a program with a bound and returns its combined output; a
// qemu-io pattern mismatch counts as an error.
func runTool(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	testenv.RequireTools(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err == nil && name == "qemu-io" && strings.Contains(string(out), "failed") {
		err = errors.New("a command failed") // qemu-io does not always exit non-zero
	}
	return string(out), err
}

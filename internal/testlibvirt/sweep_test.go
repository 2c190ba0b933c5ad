package testlibvirt

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// A test domain whose test process is gone (killed before its cleanup) is
// destroyed and undefined by the next process's start; one of a live
// process is left alone.
func TestSweepOrphans(t *testing.T) {
	Require(t)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	live := exec.Command("sleep", "60")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { live.Process.Kill(); live.Wait() })
	orphan, kept := fmt.Sprintf("lbt-%d-1", dead.Process.Pid), fmt.Sprintf("lbt-%d-1", live.Process.Pid)
	for _, name := range []string{orphan, kept} {
		d, err := create(Options{Name: name})
		if d != nil {
			t.Cleanup(func() { d.Remove() })
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	sweepOrphans()
	out, err := Virsh("list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	names := strings.Fields(out)
	if slices.Contains(names, orphan) {
		t.Errorf("domain %s of a process that is gone is still defined: %v", orphan, names)
	}
	if !slices.Contains(names, kept) {
		t.Errorf("domain %s of a live process was swept: %v", kept, names)
	}
}

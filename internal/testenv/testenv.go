// Package testenv is what integration tests share: finding the real QEMU tools
// they drive, and failing instead of skipping under CI when one is missing.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI, where a missing tool is a failure:
// a green CI must mean the real thing ran.
func InCI() bool { return os.Getenv("CI") == "true" }

// RequireTools skips the test when one of the named programs is not on PATH, or
// fails it under CI. The message says how to install them.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			msg := "needs " + tool + " on PATH: run `make deps` (installs qemu-utils, qemu-system-x86, qemu-system-common, qemu-guest-agent, libnbd-bin, nbdkit)"
			if InCI() {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

// Short reports whether long campaigns should run their short version.
func Short() bool { return testing.Short() || os.Getenv("LIFEBOAT_LONG") == "" }

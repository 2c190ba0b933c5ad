// Package testenv is what integration tests share: finding the real QEMU tools
// they drive, failing instead of skipping under CI when one is missing, and the
// seed of every random workload.
package testenv

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
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

// Seed is where every random workload of the tests takes its seed: the value of
// LIFEBOAT_SEED if it is set (to replay a failure), otherwise a fresh one. Every
// call in one test (by name) returns the same seed, logged on the first, so one
// value replays the whole test; a test that needs several streams derives them
// from it (rand.NewPCG(seed, 1), rand.NewPCG(seed, 2), ...).
func Seed(t testing.TB) uint64 {
	t.Helper()
	if v, ok := seeds.Load(t.Name()); ok {
		return v.(uint64)
	}
	var seed uint64
	if s := os.Getenv("LIFEBOAT_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("LIFEBOAT_SEED=%q is not a seed: set it to the number a failing test logged", s)
		}
		seed = v
	} else {
		seed = rand.Uint64()
	}
	if v, loaded := seeds.LoadOrStore(t.Name(), seed); loaded {
		return v.(uint64)
	}
	t.Logf("seed %d (replay with LIFEBOAT_SEED=%d)", seed, seed)
	return seed
}

// seeds holds each test's seed, by test name.
var seeds sync.Map

// LogBuffer is a log sink that a test reads while other goroutines write to it.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Context is a context that ends after d or with the test.
func Context(t testing.TB, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}

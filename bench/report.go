package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// printMachine heads the output with what the figures depend on.
func printMachine(ctx context.Context, e *env) {
	e.printf("# lifeboat benchmarks, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	e.printf("machine:  %d CPUs (%s), %s RAM, Linux %s, %s\n", runtime.NumCPU(), cpuModel(), memTotal(), osRelease(), runtime.Version())
	for _, tool := range [][]string{
		{"qemu-storage-daemon", "--version"}, {"qemu-img", "--version"},
		{"nbdcopy", "--version"}, {"rsync", "--version"},
	} {
		e.printf("%-9s %s\n", strings.TrimPrefix(tool[0], "qemu-storage-")+":", toolVersion(ctx, tool[0], tool[1]))
	}
	e.printf("all on one machine, on loopback mutual TLS: the recovery site runs in a process of its own (as on another host) in\n" +
		"the initial, metadata and libvirt benchmarks, and in this process in the others; every figure is from this run\n")
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "?"
	}
	var kb int64
	for _, line := range strings.Split(string(b), "\n") {
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			return size(kb << 10)
		}
	}
	return "?"
}

func osRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func toolVersion(ctx context.Context, tool, flag string) string {
	if _, err := exec.LookPath(tool); err != nil {
		return "not installed (skipped where needed; `make deps` installs it)"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, tool, flag).Output()
	if err != nil {
		return "version unknown: " + err.Error()
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.Join(strings.Fields(line), " ")
}

// table prints aligned columns.
type table struct{ tw *tabwriter.Writer }

func (e *env) table(header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(e.out, 0, 4, 2, ' ', 0)}
	t.row(header...)
	dashes := make([]string, len(header))
	for i, h := range header {
		dashes[i] = strings.Repeat("-", len([]rune(h)))
	}
	t.row(dashes...)
	return t
}

func (t *table) row(cells ...string) { fmt.Fprintln(t.tw, strings.Join(cells, "\t")+"\t") }

func (t *table) flush() { t.tw.Flush() }

func size(n int64) string {
	switch {
	case n >= gib && n%gib == 0:
		return fmt.Sprintf("%d GiB", n/gib)
	case n >= gib:
		return fmt.Sprintf("%.2f GiB", float64(n)/float64(gib))
	case n >= mib:
		return fmt.Sprintf("%.1f MiB", float64(n)/float64(mib))
	case n >= kib:
		return fmt.Sprintf("%.1f KiB", float64(n)/float64(kib))
	}
	return fmt.Sprintf("%d B", n)
}

func secs(s float64) string { return fmt.Sprintf("%.2f s", s) }

func mibps(n int64, s float64) float64 {
	if s <= 0 {
		return 0
	}
	return float64(n) / float64(mib) / s
}

// ratio is a/b as "1.23×".
func ratio(a, b float64) string {
	if b <= 0 {
		return "-"
	}
	r := a / b
	if r >= 10 {
		return fmt.Sprintf("%.0f×", r)
	}
	return fmt.Sprintf("%.2f×", r)
}

// goalMet is a goal's cell: the goal and whether this run met it.
func goalMet(ok bool, goal string) string {
	if ok {
		return goal + ": met"
	}
	return goal + ": MISSED"
}

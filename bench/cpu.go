package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every Linux
// architecture Go runs on (the kernel exports it to user space as a constant).
const clockTicks = 100

// cpuSample is the CPU spent so far by this process, by its children already
// reaped, and by each child still running.
type cpuSample struct {
	self, reaped float64
	live         map[int]float64 // pid -> CPU seconds
	writers      map[int]float64 // the live ones that are a recovery site's writer daemons
}

// writerDaemon matches the command line of a recovery site's writer
// daemon: its runtime directory is the store's run/wNNN (or the temporary
// directory's), which a writer's daemon keeps from one point to the next.
var writerDaemon = regexp.MustCompile(`qemu-storage-daemon\x00.*/(lifeboat-)?w[0-9]+/qmp\.sock`)

// cpuUse is the CPU spent between two samples, in seconds.
type cpuUse struct {
	Self   float64 // this process: both sites, the NBD reads, hashing, zstd, TLS
	Reaped float64 // children that exited in between (a recovery writer qsd, qemu-img, a peer tool)
	Live   float64 // children still running at the end (the source qemu-storage-daemon)
	Writer float64 // of those, a recovery site's writer daemons (kept from one point to the next)
	Site   float64 // a recovery site in a process of its own, with its children (replication.Cycle)
}

func (u cpuUse) Total() float64 { return u.Self + u.Reaped + u.Live + u.Writer + u.Site }

func sampleCPU() (cpuSample, error) {
	var self, kids syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &self); err != nil {
		return cpuSample{}, fmt.Errorf("getrusage: %w", err)
	}
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &kids); err != nil {
		return cpuSample{}, fmt.Errorf("getrusage: %w", err)
	}
	live, err := childrenCPU(os.Getpid())
	if err != nil {
		return cpuSample{}, err
	}
	writers := map[int]float64{}
	for pid, sec := range live {
		if _, ok := siteProcesses.Load(pid); ok {
			delete(live, pid) // a recovery site's, counted apart
			continue
		}
		if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && writerDaemon.Match(cmd) {
			delete(live, pid)
			writers[pid] = sec
		}
	}
	return cpuSample{self: rusageSeconds(self), reaped: rusageSeconds(kids), live: live, writers: writers}, nil
}

func rusageSeconds(r syscall.Rusage) float64 {
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(r.Utime) + tv(r.Stime)
}

// since is the CPU spent from an earlier sample to s. A child alive at the first
// sample and reaped before s has its whole life in RUSAGE_CHILDREN: the part it
// had spent before the first sample is taken off again.
func (s cpuSample) since(before cpuSample) cpuUse {
	u := cpuUse{Self: s.self - before.self, Reaped: s.reaped - before.reaped}
	for pid, sec := range s.live {
		u.Live += sec - before.live[pid]
	}
	for pid, sec := range s.writers {
		u.Writer += sec - before.writers[pid]
	}
	for _, m := range []map[int]float64{before.live, before.writers} {
		for pid, sec := range m {
			if _, ok := s.live[pid]; !ok {
				if _, ok := s.writers[pid]; !ok {
					u.Reaped -= sec
				}
			}
		}
	}
	u.Reaped = max(u.Reaped, 0)
	return u
}

// childrenCPU reads utime+stime of every running child of pid from /proc.
func childrenCPU(pid int) (map[int]float64, error) {
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return nil, err
	}
	out := map[int]float64{}
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // the process went away meanwhile
		}
		ppid, sec, ok := parseStat(string(b))
		if ok && ppid == pid {
			p, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
			out[p] = sec
		}
	}
	return out, nil
}

// parseStat takes the parent pid and utime+stime (seconds) from a /proc/PID/stat
// line. The command name in parentheses may hold spaces, so fields count from
// the last ')'.
func parseStat(line string) (ppid int, sec float64, ok bool) {
	f := statFields(line)
	if len(f) < 13 {
		return 0, 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	sec, ok = statSeconds(line, false)
	if err != nil || !ok {
		return 0, 0, false
	}
	return ppid, sec, true
}

// statFields are a /proc/PID/stat line's fields from the third (state) on.
func statFields(line string) []string {
	i := strings.LastIndexByte(line, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(line[i+1:])
}

// statSeconds is utime+stime (fields 14, 15) of a /proc/PID/stat line, with
// cutime+cstime (16, 17: its reaped children's) when children is set; ok
// false when the line does not parse.
func statSeconds(line string, children bool) (sec float64, ok bool) {
	f := statFields(line)
	n := 2
	if children {
		n = 4
	}
	if len(f) < 11+n {
		return 0, false
	}
	var ticks uint64
	for _, s := range f[11 : 11+n] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, false
		}
		ticks += v
	}
	return float64(ticks) / clockTicks, true
}

// measured is one timed step and the CPU it cost.
type measured struct {
	Wall time.Duration
	CPU  cpuUse
}

// measure times f and the CPU spent by this process and its children meanwhile.
// It first writes back what earlier steps left dirty in the page cache, so that
// a step's flush does not pay for its predecessors' writes (the read cache stays hot).
func measure(f func() error) (measured, error) {
	syscall.Sync()
	before, err := sampleCPU()
	if err != nil {
		return measured{}, err
	}
	start := time.Now()
	if err := f(); err != nil {
		return measured{}, err
	}
	wall := time.Since(start)
	after, err := sampleCPU()
	if err != nil {
		return measured{}, err
	}
	return measured{Wall: wall, CPU: after.since(before)}, nil
}

// cpuSplit is a contender's CPU in seconds, by who spent it.
type cpuSplit struct {
	Own      float64 // lifeboat: this process (both sites); a peer: its own process(es)
	Source   float64 // the VM's qemu-storage-daemon, serving the reads
	Recovery float64 // lifeboat only: the recovery site's writer daemon and qemu-img
}

func (c cpuSplit) Total() float64 { return c.Own + c.Source + c.Recovery }

func (c cpuSplit) String() string {
	return fmt.Sprintf("%.1f + %.1f + %.1f", c.Own, c.Source, c.Recovery)
}

// lifeboatCPU: the protected site runs in this process, and the recovery
// site too unless it runs in a process of its own (Site); the children
// reaped during a cycle are the recovery site's (a writer daemon stopped at
// commit, qemu-img), and so are its writer daemons still running (kept for
// the next point); the other one running throughout is the source VM's daemon.
func lifeboatCPU(m measured) cpuSplit {
	return cpuSplit{Own: m.CPU.Self, Source: m.CPU.Live, Recovery: m.CPU.Reaped + m.CPU.Writer + m.CPU.Site}
}

// peerCPU: the peer tool is the child reaped during the step.
func peerCPU(m measured) cpuSplit {
	return cpuSplit{Own: m.CPU.Reaped, Source: m.CPU.Live}
}

// stealSeconds is the CPU time the hypervisor has taken from this machine's
// CPUs since boot (the steal column of /proc/stat), or -1 when unknown: a
// noisy neighbour shows here.
func stealSeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	// cpu user nice system idle iowait irq softirq steal ...
	if len(f) < 9 || f[0] != "cpu" {
		return -1
	}
	v, err := strconv.ParseUint(f[8], 10, 64)
	if err != nil {
		return -1
	}
	return float64(v) / clockTicks
}

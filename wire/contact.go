package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
)

// The split-brain guard (failover) asks when a VM's owner last called. A
// restart of this site must not blind it: each call is also recorded in
// Server.ContactFile with the boot clock's reading, which no step of the
// wall clock moves, so that the next run of the site on the same boot can
// still date it; a call it cannot date (another boot, no record) makes the
// owner's state unknown since this site started.

// contactRecordEvery is how stale a VM's record may be: a call is written
// to the file, before it goes on, when the VM's record is older than that,
// so the owner's last call is never later than its record plus this.
const contactRecordEvery = 10 * time.Second

// Contact is what this site knows of the last call about a VM from its
// owner.
type Contact struct {
	// Site is the owner that called ("" when nothing of it is on record).
	Site string
	// At is the latest the owner's last call can have been, with this
	// process's monotonic clock reading: time.Since(At) is the least time the
	// owner has been silent. When Unknown, it is Started.
	At time.Time
	// Wall is the call's time by the wall clock as it was recorded (zero:
	// none on record); a step of that clock since may have moved it, so it
	// is for messages only.
	Wall time.Time
	// Restarted says the call came before this site started: this run of
	// the site did not hear it, the one before it on this boot recorded it.
	Restarted bool
	// Unknown says the site heard nothing from the VM's owner since it
	// started, and holds no call of it that it can date (none recorded, or
	// one recorded before the host last booted): the owner may have called
	// just before the start.
	Unknown bool
	// Started is when this run of the site began to watch its peers' calls.
	Started time.Time
}

// heard is a call this run of the site received.
type heard struct {
	site string
	at   time.Time // with the monotonic reading
}

// contactRecord is a VM's last call as Server.ContactFile keeps it.
type contactRecord struct {
	Site string    `json:"site"`
	Wall time.Time `json:"wall"`
	// Boot and BootNS are the host's boot ID and the boot clock
	// (CLOCK_BOOTTIME) at the call: within one boot, the time since it
	// whatever the wall clock did.
	Boot   string        `json:"boot"`
	BootNS time.Duration `json:"boot_ns"`
}

type contactFile struct {
	VMs map[string]contactRecord `json:"vms"`
}

// bootClock says which boot of the host this is and how long ago it
// happened (suspend included). A variable for tests.
var bootClock = func() (id string, since time.Duration, err error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", 0, err
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return "", 0, fmt.Errorf("boot clock: %w", err)
	}
	return strings.TrimSpace(string(b)), time.Duration(ts.Nano()), nil
}

// watch starts the site's watch of its peers' calls on first use: its start
// time, and the calls the run before it recorded. s.cmu is held.
func (s *Server) watch() {
	if !s.started.IsZero() {
		return
	}
	s.started = time.Now()
	s.heard, s.records = map[string]heard{}, map[string]contactRecord{}
	if s.ContactFile == "" {
		return
	}
	b, err := os.ReadFile(s.ContactFile)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f contactFile
	if err == nil {
		err = json.Unmarshal(b, &f)
	}
	if err != nil {
		// Every VM's owner is then unknown since this start: the guard
		// refuses failovers for a while rather than trust nothing.
		s.log().Error("reading the record of protected sites' last calls; until they call again, a failover of their VMs is refused for the contact window after this start", "file", s.ContactFile, "err", err)
		return
	}
	for vm, r := range f.VMs {
		s.records[vm] = r
	}
}

// recordContact notes a call about vm from site, its owner, and writes it to
// ContactFile when the VM's record there is contactRecordEvery old.
func (s *Server) recordContact(site, vm string) {
	now := time.Now()
	s.cmu.Lock()
	defer s.cmu.Unlock()
	s.watch()
	s.heard[vm] = heard{site: site, at: now}
	if s.ContactFile == "" {
		return
	}
	boot, since, err := bootClock()
	if err != nil {
		boot = "" // a record no later run can date: it stays unknown
	}
	if r, ok := s.records[vm]; ok && r.Site == site && r.Boot == boot && boot != "" && since-r.BootNS < contactRecordEvery {
		return
	}
	s.records[vm] = contactRecord{Site: site, Wall: now.UTC().Round(0), Boot: boot, BootNS: since}
	b, err := json.Marshal(contactFile{VMs: s.records})
	if err == nil {
		err = fsutil.WriteFileAtomic(s.ContactFile, b, 0o600)
	}
	if err != nil {
		// A stale record would let the next run of the site take a
		// recent call for an old one: without the file, it knows nothing,
		// and refuses failovers for the contact window instead.
		delete(s.records, vm)
		rerr := os.Remove(s.ContactFile)
		if errors.Is(rerr, fs.ErrNotExist) {
			rerr = nil
		}
		s.log().Error("recording a protected site's call; after a restart of this site, a failover of its VMs is refused for the contact window", "vm", vm, "site", site, "err", err, "remove_err", rerr)
	}
}

// LastContact says when the VM's owner last called about it (a cycle's
// Latest, a point's stream): a production site in contact a moment ago is
// probably running the VM. After a restart of this site, a call made before
// it is dated from ContactFile; one it cannot date leaves the owner unknown
// since the start.
func (s *Server) LastContact(vm string) Contact {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	s.watch()
	if h, ok := s.heard[vm]; ok {
		return Contact{Site: h.site, At: h.at, Wall: h.at, Started: s.started}
	}
	c := Contact{At: s.started, Unknown: true, Started: s.started}
	r, ok := s.records[vm]
	if !ok {
		return c
	}
	c.Site, c.Wall = r.Site, r.Wall
	boot, since, err := bootClock()
	if err != nil || boot == "" || boot != r.Boot || since < r.BootNS {
		return c
	}
	// The record can lag the last call by contactRecordEvery; and that
	// call came before this start.
	at := time.Now().Add(-(since - r.BootNS) + contactRecordEvery)
	if at.After(s.started) {
		at = s.started
	}
	c.At, c.Unknown, c.Restarted = at, false, true
	return c
}

func (s *Server) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

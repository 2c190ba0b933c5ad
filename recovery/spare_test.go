package recovery

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// spareOf waits for the retention and the writer made ahead that the last
// commit started, and returns the VM's spare (nil if none was made).
func spareOf(s *Store, vm string) *spare {
	s.SettleRetention()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.spares[vm]
}

func spareParts(t *testing.T, s *Store) []string {
	t.Helper()
	parts, err := filepath.Glob(filepath.Join(s.Dir(), "vms", "*", "*", "spare-*.part"))
	if err != nil {
		t.Fatal(err)
	}
	return parts
}

// alive says whether process pid still runs 2 s on (a killed daemon is
// reaped by its Daemon's wait, soon).
func alive(pid int) bool {
	for range 100 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(b), ") Z ") {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// Points that come often are written by a writer made ahead, above the
// chain as it is when the point begins, and read back byte-exact whatever
// retention merged meanwhile (keep 2: every commit merges the oldest).
func TestWriterMadeAheadWritesThePoint(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 2)
	const size = 4 << 20
	m := model{}
	used := 0
	for id := uint64(1); id <= 6; id++ {
		sp := spareOf(s, "vm1")
		if id <= 2 && sp != nil {
			t.Fatalf("point %d: a writer was made ahead before the VM's points came often", id)
		}
		if id > 2 && sp == nil {
			t.Fatalf("point %d: no writer was made ahead after two points in a row", id)
		}
		spid := 0
		if sp != nil {
			spid = sp.daemon.Pid()
		}
		p := begin(t, s, "vm1", id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1}, DiskSpec{Name: "vdb", Size: size, Resync: id == 1})
		if sp != nil {
			if p.w.daemon.Pid() != spid {
				t.Fatalf("point %d: the writer made ahead (daemon %d) was not used (daemon %d)", id, spid, p.w.daemon.Pid())
			}
			if len(spareParts(t, s)) != 0 {
				t.Fatalf("point %d: the images made ahead were not taken: %v", id, spareParts(t, s))
			}
			used++
		}
		p.data("vda", p.rng.Int64N(60), 1+p.rng.Int64N(4))
		p.data("vdb", p.rng.Int64N(60), 1+p.rng.Int64N(4))
		p.zeros("vda", p.rng.Int64N(60), 1)
		p.commit()
		checkPoint(t, s, "vm1", id, m)
	}
	if used != 4 {
		t.Fatalf("%d of 6 points used a writer made ahead, want 4", used)
	}
	sp := spareOf(s, "vm1")
	if sp == nil {
		t.Fatal("no writer made ahead after the last point")
	}
	pid := sp.daemon.Pid()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if parts := spareParts(t, s); len(parts) != 0 {
		t.Errorf("Close left the images made ahead: %v", parts)
	}
	if alive(pid) {
		t.Errorf("Close left the daemon made ahead (pid %d) running", pid)
	}
}

// A writer made ahead that no longer fits the chain is thrown away and the
// point written by a new one: a disk that grew, a disk added, and the
// latest point's image replaced by a merge into it (keep 1).
func TestWriterMadeAheadThatNoLongerFits(t *testing.T) {
	requireQEMU(t)
	for _, tc := range []struct {
		name  string
		keep  int
		disks func(id uint64) []DiskSpec
	}{
		{"disk grew", 24, func(id uint64) []DiskSpec {
			return []DiskSpec{{Name: "vda", Size: int64(4+id) << 20, Resync: id == 1}}
		}},
		{"disk added", 24, func(id uint64) []DiskSpec {
			d := []DiskSpec{{Name: "vda", Size: 4 << 20, Resync: id == 1}}
			if id == 3 {
				d = append(d, DiskSpec{Name: "vdb", Size: 4 << 20, Resync: true})
			}
			return d
		}},
		{"merged into the latest", 1, func(id uint64) []DiskSpec {
			return []DiskSpec{{Name: "vda", Size: 4 << 20, Resync: id == 1}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), tc.keep)
			m := model{}
			for id := uint64(1); id <= 3; id++ {
				sp := spareOf(s, "vm1")
				p := begin(t, s, "vm1", id, m, tc.disks(id)...)
				if id == 3 {
					if sp == nil {
						t.Fatal("no writer was made ahead of point 3")
					}
					if p.w.daemon.Pid() == sp.daemon.Pid() {
						t.Fatal("the writer made ahead was used though the chain changed under it")
					}
					if alive(sp.daemon.Pid()) {
						t.Errorf("the daemon made ahead (pid %d) still runs", sp.daemon.Pid())
					}
					if parts := spareParts(t, s); len(parts) != 0 {
						t.Errorf("the images made ahead are still there: %v", parts)
					}
				}
				for disk := range m {
					p.data(disk, p.rng.Int64N(60), 2)
				}
				p.commit()
				checkPoint(t, s, "vm1", id, m)
			}
		})
	}
}

// twoPointsAndASpare commits points 1 and 2 of vm's disk vda (size bytes)
// in a row, so that a writer is made ahead for point 3, and returns it.
func twoPointsAndASpare(t *testing.T, s *Store, vm string, size int64, m model) *spare {
	t.Helper()
	for id := uint64(1); id <= 2; id++ {
		p := begin(t, s, vm, id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1})
		p.data("vda", p.rng.Int64N(60), 3)
		p.commit()
	}
	sp := spareOf(s, vm)
	if sp == nil || sp.daemon == nil {
		t.Fatal("no writer made ahead after two points in a row")
	}
	return sp
}

// A lifeboat that stops with a writer made ahead leaves its daemon and
// images; the next Open kills the one and deletes the others, and the
// chain goes on.
func TestWriterMadeAheadAfterACrash(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	s := openStore(t, dir, 24)
	const size = 4 << 20
	m := model{}
	sp := twoPointsAndASpare(t, s, "vm1", size, m)
	pid := sp.daemon.Pid()
	if len(spareParts(t, s)) == 0 {
		t.Fatal("the writer made ahead has no image")
	}
	crash(t, s)
	s2 := openStore(t, dir, 24)
	if alive(pid) {
		t.Errorf("Open left the daemon made ahead (pid %d) running", pid)
	}
	if parts := spareParts(t, s2); len(parts) != 0 {
		t.Errorf("Open left the images made ahead: %v", parts)
	}
	p := begin(t, s2, "vm1", 3, m, DiskSpec{Name: "vda", Size: size})
	p.data("vda", p.rng.Int64N(60), 3)
	p.commit()
	for id := uint64(1); id <= 3; id++ {
		if _, err := os.Stat(s2.abs(imageRel("vm1", "vda", id))); err != nil {
			t.Fatalf("point %d: %v", id, err)
		}
	}
	checkPoint(t, s2, "vm1", 3, m)
}

// A writer's daemon goes on to the next point (its chain stays open) up to
// maxCarry times, while retention merges below it at every commit (keep
// 3): every point reads back byte-exact and verifies, and then a fresh
// daemon opens the chain again.
func TestWriterDaemonGoesOn(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 3)
	const size = 4 << 20
	m := model{}
	pids := map[int]int{} // daemon → points it wrote
	var order []int
	for id := uint64(1); id <= maxCarry+4; id++ {
		spareOf(s, "vm1")
		p := begin(t, s, "vm1", id, m, DiskSpec{Name: "vda", Size: size, Resync: id == 1}, DiskSpec{Name: "vdb", Size: size, Resync: id == 1})
		pid := p.w.daemon.Pid()
		if pids[pid] == 0 {
			order = append(order, pid)
		}
		pids[pid]++
		p.data("vda", p.rng.Int64N(60), 1+p.rng.Int64N(4))
		p.data("vdb", p.rng.Int64N(60), 1+p.rng.Int64N(4))
		p.zeros("vdb", p.rng.Int64N(60), 1)
		if id > 1 {
			// A patch: the rest of its block is read through the chain
			// the daemon holds, which merges have rewritten below it.
			p.patch("vdb", p.rng.Int64N(60), lifeboat.Dirty(1+p.rng.Uint32N(0xfffe)))
		}
		p.commit()
		checkPoint(t, s, "vm1", id, m)
	}
	// Point 1 has its own daemon; point 2's goes on for maxCarry more.
	if len(order) < 3 || pids[order[1]] != maxCarry+1 {
		counts := []int{}
		for _, pid := range order {
			counts = append(counts, pids[pid])
		}
		t.Fatalf("points per daemon, in order: %v; want 1, %d, then a fresh one", counts, maxCarry+1)
	}
	// The daemon that went on is stopped after its last commit, in the
	// background, and its runtime directory deleted.
	s.SettleRetention()
	if alive(order[1]) {
		t.Errorf("the daemon that wrote points 2–%d (pid %d) still runs", maxCarry+2, order[1])
	}
	runs, _ := filepath.Glob(filepath.Join(s.Dir(), "run", "*"))
	if len(runs) > 2 { // the fresh writer's and its spare's at most
		t.Errorf("runtime directories left: %v", runs)
	}
}

// patch writes random bytes over the sub-blocks dirty of block b, as a
// patch (the rest of the block is the chain's).
func (p *pointWriter) patch(disk string, b int64, dirty lifeboat.Dirty) {
	p.t.Helper()
	block := bytes.Clone(p.m[disk][b*B : (b+1)*B])
	for _, r := range dirty.Ranges(B) {
		for i := r[0]; i < r[1]; i++ {
			block[i] = byte(p.rng.Uint32())
		}
	}
	parts := dirty.Gather(nil, block)
	if err := p.w.WritePatch(testCtx(p.t), disk, b*B, dirty, parts, lifeboat.HashBlock(parts), lifeboat.HashBlock(block)); err != nil {
		p.t.Fatalf("WritePatch %s block %d: %v", disk, b, err)
	}
	copy(p.m[disk][b*B:], block)
}

// A writer made ahead whose daemon died between points (the OOM killer, a
// crash of QEMU; here a real SIGKILL) is not handed to the next Begin, which
// would fail on its NBD socket: the Begin discards it, opens the chain
// itself, and the point is written and reads right.
func TestDeadWriterMadeAheadIsNotTaken(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 24)
	const size = 4 << 20
	m := model{}
	sp := twoPointsAndASpare(t, s, "vm1", size, m)
	dead, runDir := sp.daemon, sp.runDir
	if err := dead.Kill(); err != nil {
		t.Fatal(err)
	}
	p := begin(t, s, "vm1", 3, m, DiskSpec{Name: "vda", Size: size})
	if p.w.daemon == dead {
		t.Fatal("the writer took the dead daemon made ahead")
	}
	p.data("vda", p.rng.Int64N(60), 3)
	p.commit()
	checkPoint(t, s, "vm1", 3, m)
	s.SettleRetention()
	s.stops.Wait() // the discarded spare's removal runs in the background
	if _, err := os.Stat(runDir); !os.IsNotExist(err) {
		t.Errorf("the dead spare's runtime directory %s: %v, want it removed", runDir, err)
	}
}

package failback_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// recovered stands in for the VM a failover started from the shared point:
// a VM whose disks hold that point (copied from the recovery site's store),
// with the failover's generations on them, named for the production site.
// (The failover package's own tests run the real one, a qemu-system guest.)
func (r *replicated) recovered(t *testing.T, from uint64) (*testvm.VM, *workload.Guest, lifeboat.Point) {
	t.Helper()
	vm := testvm.Start(t,
		testvm.DiskSpec{Name: disks[0].Name, Format: "qcow2", Size: disks[0].Size},
		testvm.DiskSpec{Name: disks[1].Name, Format: "qcow2", Size: disks[1].Size})
	g, err := workload.Open(ctx(t), vm.NBDSocket(), testenv.Seed(t)+7, disks...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	holds := lifeboat.Point{VM: "vm1", ID: from}
	for _, d := range r.latest.Disks {
		out := filepath.Join(t.TempDir(), d.Name+".raw")
		if err := r.site.Store.Export(ctx(t), "vm1", from, d.Name, out, "raw"); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if err := g.Client(d.Name).Write(ctx(t), b, 0, false); err != nil {
			t.Fatal(err)
		}
		gen := lifeboat.NewGeneration("prod", d.Lineage, from)
		if err := vm.Monitor().AddBitmap(ctx(t), d.Name, gen, true, false); err != nil {
			t.Fatal(err)
		}
		holds.Disks = append(holds.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Lineage: d.Lineage, Generation: gen})
	}
	return vm, g, holds
}

// productionServer serves store (failback points for vm1 into the production
// disks) as site "prod", and returns the recovery site's client of it.
func (r *replicated) productionServer(t *testing.T, fb wire.Store) *wire.Client {
	t.Helper()
	tlsConf, err := pki.ServerTLS(pki.SiteFiles(r.site.PKI, "prod"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &wire.Server{Site: "prod", Store: fb}
	go srv.Serve(l, tlsConf)
	t.Cleanup(srv.Stop)
	clientTLS, err := pki.ClientTLS(pki.SiteFiles(r.site.PKI, "dr"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	c, err := wire.Dial(ctx(t), l.Addr().String(), clientTLS, "dr", "prod", wire.CompressionZstd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// The failback's whole mechanism over the wire, but for the command that
// drives it: production wrote after the shared point and was lost (stopped
// cleanly, or killed), the recovered VM wrote more; a failback cycle from the
// recovered VM into the production disks sends the union of both sides'
// changes (production's from its generations, or by hashes where it has no
// record: its raw disk, or every disk after the kill), incremental from the
// shared point, and leaves the production disks exactly as the recovered
// VM's. A second cycle sends only what the recovered VM wrote since, and the
// production site, restarted, still knows which point its disks hold. A
// failover from the point before the latest adds what the latest wrote.
func TestFailbackOverTheWire(t *testing.T) {
	for _, tc := range []struct {
		name         string
		crash, older bool
	}{{"production stopped", false, false}, {"production killed", true, false}, {"failover from an older point", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			r := replicate(t, tc.crash)
			if tc.crash {
				r.vm.Kill(t)
			} else {
				r.vm.PowerOff(t)
			}
			from := r.latest.ID
			if tc.older {
				from--
			}
			rec, guest, holds := r.recovered(t, from)
			recOps, err := guest.Mixed(ctx(t), 15)
			if err != nil {
				t.Fatal(err)
			}

			stateDir := t.TempDir()
			fb, prod := r.prepare(t, stateDir, holds)
			target := &failback.Target{Client: r.productionServer(t, fb), Shared: from, SharedMap: r.pointMap(from)}
			if tc.older {
				target.LatestMap = r.pointMap(r.latest.ID)
			}
			p := &protect.Protector{
				VM:     protect.VM{Name: "vm1", QMPSocket: rec.QMPSocket(), NBDSocket: rec.NBDSocket(), WorkDir: testsite.ShortDir(t)},
				Target: target, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
			}

			pt := r.failbackCycle(t, p, prod, guest, holds.ID)
			union := workload.TouchedBytes(append(recOps, r.after...))
			if tc.older {
				union += r.latest.Stats.BytesChanged // what the latest point wrote, at most
			}
			t.Logf("first failback cycle: handled %d bytes (union of both sides' changes %d: recovered %d, production %d), sent %d",
				pt.Stats.BytesChanged, union, workload.TouchedBytes(recOps), workload.TouchedBytes(r.after), pt.Stats.BytesSent)
			if pt.Stats.BytesChanged > union+int64(len(disks))*lifeboat.BlockSize {
				t.Errorf("the first cycle handled %d bytes, more than the %d both sides changed", pt.Stats.BytesChanged, union)
			}

			more, err := guest.Mixed(ctx(t), 8)
			if err != nil {
				t.Fatal(err)
			}
			pt2 := r.failbackCycle(t, p, prod, guest, pt.ID)
			if pt2.Stats.BytesChanged > workload.TouchedBytes(more) {
				t.Errorf("the second cycle handled %d bytes, more than the %d the recovered VM wrote since the first", pt2.Stats.BytesChanged, workload.TouchedBytes(more))
			}

			// A restarted production site knows what its disks hold.
			again, err := failback.NewStore(stateDir, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := again.Prepare(ctx(t), "vm1", "dr", prod, holds, r.own()); err != nil {
				t.Fatal(err)
			}
			if l, _, _ := again.Latest("vm1"); l.ID != pt2.ID {
				t.Errorf("after a restart production says it holds point %d, want %d", l.ID, pt2.ID)
			}
			if err := again.Authorize("vm1", "prod"); err == nil {
				t.Error("production takes failback points of vm1 from a site other than its owner")
			}
		})
	}
}

// own is production's generations at the shared point, as the recovery
// site's point names them.
func (r *replicated) own() map[string]failback.Shared {
	out := map[string]failback.Shared{}
	for _, d := range r.latest.Disks {
		out[d.Name] = failback.Shared{Peer: r.peer, Lineage: d.Lineage, Point: r.latest.ID, Generation: d.Generation}
	}
	return out
}

// pointMap is the block map of one of the recovery site's points.
func (r *replicated) pointMap(id uint64) func(context.Context, string) (map[int64]lifeboat.Hash, error) {
	return func(_ context.Context, disk string) (map[int64]lifeboat.Hash, error) {
		return r.site.Store.BlockMap("vm1", disk, id)
	}
}

// prepare opens the production disks and readies vm1's failback.
func (r *replicated) prepare(t *testing.T, dir string, holds lifeboat.Point) (*failback.Store, *failback.Production) {
	t.Helper()
	prod := r.open(t)
	fb, err := failback.NewStore(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := fb.Prepare(ctx(t), "vm1", "dr", prod, holds, r.own()); err != nil {
		t.Fatal(err)
	}
	return fb, prod
}

// failbackCycle runs one failback cycle and checks that it built on base
// and left the production disks as the recovered VM's.
func (r *replicated) failbackCycle(t *testing.T, p *protect.Protector, prod *failback.Production, guest *workload.Guest, base uint64) lifeboat.Point {
	t.Helper()
	return r.failbackCycleResyncing(t, p, prod, guest, base, nil)
}

// failbackCycleResyncing is failbackCycle where the disks named in resync
// are compared by hashes instead.
func (r *replicated) failbackCycleResyncing(t *testing.T, p *protect.Protector, prod *failback.Production, guest *workload.Guest, base uint64, resync map[string]bool) lifeboat.Point {
	t.Helper()
	want, err := guest.Hashes(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := p.Cycle(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range pt.Disks {
		if d.Resync != resync[d.Name] || !d.Resync && d.Base != base {
			t.Errorf("point %d disk %s: resync %v from base %d, want resync %v (else an incremental from point %d)", pt.ID, d.Name, d.Resync, d.Base, resync[d.Name], base)
		}
	}
	for _, d := range disks {
		buf := make([]byte, d.Size)
		if err := prod.Clients()[d.Name].Read(ctx(t), buf, 0); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(buf)
		if got := hex.EncodeToString(sum[:]); got != want[d.Name] {
			t.Errorf("after point %d production disk %s reads sha256 %s, the recovered VM's %s", pt.ID, d.Name, got[:12], want[d.Name][:12])
		}
	}
	return pt
}

// The production VM runs between two failback cycles: production's site
// restarts after the first (its daemon lets go of the disks), the VM is
// started there (autostart after a reboot, or by hand), writes, and is
// stopped or dies. Those writes are production's own, after its disks
// took the failback point: the next cycle must overwrite them. The
// generation production started at that point's commit says which blocks
// they are (the qcow2 disk, the VM stopped cleanly: still incremental);
// where it cannot (the raw disk, whose bitmaps die with its QEMU; a VM
// killed, which leaves them inconsistent) the disk is compared by hashes.
func TestFailbackProductionWritesBetweenCycles(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kill   bool
		resync map[string]bool
	}{
		{"production VM stopped", false, map[string]bool{"vdb": true}},
		{"production VM killed", true, map[string]bool{"vda": true, "vdb": true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := replicate(t, false)
			r.vm.PowerOff(t)
			rec, guest, holds := r.recovered(t, r.latest.ID)
			if _, err := guest.Mixed(ctx(t), 10); err != nil {
				t.Fatal(err)
			}
			stateDir := t.TempDir()
			fb, prod := r.prepare(t, stateDir, holds)
			workDir := testsite.ShortDir(t)
			protector := func(fb *failback.Store) *protect.Protector {
				return cycles(rec, workDir, r.failbackTarget(t, fb, holds))
			}
			pt := r.failbackCycle(t, protector(fb), prod, guest, holds.ID)

			// Production's site restarts: its daemon lets go of the disks.
			if err := fb.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			r.runByHand(t, tc.kill)

			// The failback goes on: production takes it again from its
			// record (as Site.Take does after a restart).
			again, prod2 := r.prepare(t, stateDir, holds)
			if _, err := guest.Mixed(ctx(t), 3); err != nil {
				t.Fatal(err)
			}
			r.failbackCycleResyncing(t, protector(again), prod2, guest, pt.ID, tc.resync)
		})
	}
}

// runByHand starts the production VM on its disks, as an admin or an
// autostart does while lifeboat does not hold them, writes 256 KiB at 3 MiB
// of each disk, and stops it (kill: kills it).
func (r *replicated) runByHand(t *testing.T, kill bool) {
	t.Helper()
	r.vm.PowerOn(t)
	pg, err := workload.Open(ctx(t), r.vm.NBDSocket(), testenv.Seed(t)+99, disks...)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if err := pg.Do(ctx(t), workload.Op{Disk: d.Name, Kind: "data", Offset: 3 << 20, Length: 4 * lifeboat.BlockSize}); err != nil {
			t.Fatal(err)
		}
	}
	pg.Close()
	if kill {
		r.vm.Kill(t)
	} else {
		r.vm.PowerOff(t)
	}
}

// cycles is a protector of the (recovered) VM rec's cycles into target,
// working in workDir.
func cycles(rec *testvm.VM, workDir string, target protect.Target) *protect.Protector {
	return &protect.Protector{
		VM:     protect.VM{Name: "vm1", QMPSocket: rec.QMPSocket(), NBDSocket: rec.NBDSocket(), WorkDir: workDir},
		Target: target, Readers: 4, ChunkSize: 1 << 20, Connections: 2,
	}
}

// failbackTarget is production's store fb, served over the wire, as the
// target of failback cycles from a failover of point holds.
func (r *replicated) failbackTarget(t *testing.T, fb wire.Store, holds lifeboat.Point) *failback.Target {
	return &failback.Target{Client: r.productionServer(t, fb), Shared: holds.ID, SharedMap: r.pointMap(holds.ID)}
}

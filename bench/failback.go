package main

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// The failback benchmark: what a failback cycle moves against what changed.
// A production disk is replicated, then written a little more and lost; the
// VM "runs" at the recovery site (a qemu-storage-daemon on an overlay of the
// point, with the failover's generation: the failover package's tests run
// the real qemu-system) and writes more; one failback cycle sends both
// sides' changes into the production disk. Once with production's change
// record intact (it stopped cleanly), once with it lost (kill -9: its
// blocks are compared by hashes, read at production).

type failbackRow struct {
	Mode             string
	Disk, Data       int64
	Rec, Prod, Union int64 // bytes of the 64 KiB blocks each side wrote, and of their union
	Handled, Sent    int64 // the cycle's changed bytes (read or zeroed), and its bytes on the wire
	ProdRead         int64 // bytes production read to find its own changes
	Time             time.Duration
	Identical        bool
}

type failbackResult struct{ Rows []failbackRow }

func benchFailback(ctx context.Context, e *env) (*failbackResult, error) {
	res := &failbackResult{}
	for _, killed := range []bool{false, true} {
		row, err := failbackOnce(ctx, e, killed)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, row)
	}
	return res, nil
}

// randomBlocks writes n bytes of random 64 KiB blocks at distinct random
// block offsets of a disk of size, and returns the blocks.
func randomBlocks(ctx context.Context, c *nbd.Client, rng *rand.Rand, size, n int64) (map[int64]bool, error) {
	blocks := map[int64]bool{}
	buf := make([]byte, lifeboat.BlockSize)
	for int64(len(blocks))*lifeboat.BlockSize < n {
		b := rng.Int64N(size / lifeboat.BlockSize)
		if blocks[b] {
			continue
		}
		blocks[b] = true
		workload.Random(rng, buf)
		if err := c.Write(ctx, buf, b*lifeboat.BlockSize, false); err != nil {
			return nil, err
		}
	}
	return blocks, c.Flush(ctx)
}

func failbackOnce(ctx context.Context, e *env, killed bool) (row failbackRow, err error) {
	cfg := e.cfg
	mode := map[bool]string{false: "production's record (stopped cleanly)", true: "by hashes (production killed)"}[killed]
	row = failbackRow{Mode: mode, Disk: cfg.FailbackDisk, Data: cfg.FailbackData}
	e.progress("failback, %s: replicating a %s disk holding %s", mode, size(cfg.FailbackDisk), size(cfg.FailbackData))
	dir := e.path(fmt.Sprintf("failback-%v", killed))
	seed := uint64(0x1fb) + map[bool]uint64{false: 0, true: 1}[killed]
	rng := rand.New(rand.NewPCG(seed, 7))
	vm, err := startVM(ctx, filepath.Join(dir, "prod"), cfg.FailbackDisk, seed)
	if err != nil {
		return row, err
	}
	defer e.stop("failback production VM", vm.Stop)
	content, _ := newContent(contentRandom, seed)
	extents := cfg.FailbackData / libvirtExtent
	for i := range extents {
		if err := vm.WriteContent(ctx, content, i*(cfg.FailbackDisk/extents), libvirtExtent); err != nil {
			return row, err
		}
	}
	rep, err := startReplication(ctx, filepath.Join(dir, "dr"), "fb", vm, wire.CompressionZstd, e.log)
	if err != nil {
		return row, err
	}
	defer e.stop("failback recovery site", rep.Stop)
	shared, _, _, err := rep.Cycle(ctx)
	if err != nil {
		return row, err
	}
	d := shared.Disks[0]

	// Production writes a little more, and is lost.
	prodBlocks, err := randomBlocks(ctx, vm.Guest.Client(diskName), rng, cfg.FailbackDisk, cfg.FailbackProd)
	if err != nil {
		return row, err
	}
	vm.Guest.Close()
	vm.Guest = nil
	if killed {
		err = vm.Daemon.Kill()
	} else {
		sctx, cancel := context.WithTimeout(ctx, stopTimeout)
		err = vm.Daemon.Stop(sctx)
		cancel()
	}
	vm.Daemon = nil
	if err != nil {
		return row, err
	}

	// The VM runs at the recovery site, on an overlay of the point, and writes more.
	top, err := rep.Site.Store.ImagePath("fb", shared.ID, d.Name)
	if err != nil {
		return row, err
	}
	recDir := filepath.Join(dir, "rec")
	overlay := filepath.Join(recDir, "vda.qcow2")
	if err := os.MkdirAll(recDir, 0o700); err != nil {
		return row, err
	}
	if err := qemu.CreateImage(ctx, overlay, "qcow2", cfg.FailbackDisk, top, "qcow2"); err != nil {
		return row, err
	}
	rec, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: recDir, Args: qemu.DiskArgs(diskName, overlay, "qcow2"), NBD: true})
	if err != nil {
		return row, err
	}
	defer e.stop("failback recovered VM", rec.Kill)
	gen := lifeboat.NewGeneration("prod", d.Lineage, shared.ID)
	if err := rec.Monitor().AddBitmap(ctx, diskName, gen, true, false); err != nil {
		return row, err
	}
	recClient, err := nbd.Dial(ctx, "unix:"+rec.NBDSocket(), diskName, nbd.Options{MetaContexts: []string{"base:allocation"}})
	if err != nil {
		return row, err
	}
	defer recClient.Close()
	e.progress("failback, %s: %s written at the recovery site, %s at production", mode, size(cfg.FailbackRec), size(cfg.FailbackProd))
	recBlocks, err := randomBlocks(ctx, recClient, rng, cfg.FailbackDisk, cfg.FailbackRec)
	if err != nil {
		return row, err
	}
	row.Rec, row.Prod = int64(len(recBlocks))*lifeboat.BlockSize, int64(len(prodBlocks))*lifeboat.BlockSize
	union := maps.Clone(recBlocks)
	maps.Copy(union, prodBlocks)
	row.Union = int64(len(union)) * lifeboat.BlockSize

	// Production takes the failback.
	images, err := protect.ReadImages(rep.P.VM.WorkDir)
	if err != nil {
		return row, err
	}
	prod, err := failback.Open(ctx, filepath.Join(dir, "prodfb"), "fb", images, e.log)
	if err != nil {
		return row, err
	}
	defer e.stop("failback production disks", func() error { return prod.Close(context.WithoutCancel(ctx)) })
	store, err := failback.NewStore(filepath.Join(dir, "prodstate"), e.log)
	if err != nil {
		return row, err
	}
	holds := lifeboat.Point{VM: "fb", ID: shared.ID, Disks: []lifeboat.PointDisk{{Name: d.Name, Size: d.Size, Lineage: d.Lineage, Generation: gen}}}
	own := map[string]failback.Shared{d.Name: {Peer: rep.Client.Peer(), Lineage: d.Lineage, Point: shared.ID, Generation: d.Generation}}
	if err := store.Prepare(ctx, "fb", "dr", prod, holds, own); err != nil {
		return row, err
	}
	client, stop, err := productionServer(ctx, rep, store)
	if err != nil {
		return row, err
	}
	defer stop()
	target := &failback.Target{Client: client, Shared: shared.ID, Log: e.log, SharedMap: func(_ context.Context, disk string) (map[int64]lifeboat.Hash, error) {
		return rep.Site.Store.BlockMap("fb", disk, shared.ID)
	}}
	p := &protect.Protector{
		VM:     protect.VM{Name: "fb", QMPSocket: rec.ClientQMPSocket(), NBDSocket: rec.NBDSocket(), Disks: []string{diskName}, WorkDir: filepath.Join(recDir, "work")},
		Target: target, Log: e.log, Readers: protectReaders, ChunkSize: protectChunkSize, Connections: protectConnections,
	}
	if err := os.MkdirAll(p.VM.WorkDir, 0o700); err != nil {
		return row, err
	}
	e.progress("failback, %s: one failback cycle", mode)
	start := time.Now()
	pt, err := p.Cycle(ctx)
	if err != nil {
		return row, err
	}
	row.Time = time.Since(start)
	row.Handled, row.Sent, row.ProdRead = pt.Stats.BytesChanged, pt.Stats.BytesSent, target.Hashed.Load()

	// The production disk now reads as the recovered VM's: the same data blocks.
	want, err := dataHashes(ctx, recClient)
	if err != nil {
		return row, err
	}
	got := map[int64]lifeboat.Hash{}
	if err := prod.Hashes(ctx, diskName, func(b int64, h lifeboat.Hash) error { got[b] = h; return nil }); err != nil {
		return row, err
	}
	row.Identical = maps.Equal(got, want)
	return row, nil
}

// productionServer serves store as site "prod" on loopback mutual TLS, and
// returns the recovery site's client of it.
func productionServer(ctx context.Context, rep *replication, store *failback.Store) (*wire.Client, func(), error) {
	if err := rep.Site.IssueSite("prod"); err != nil {
		return nil, nil, err
	}
	tlsConf, err := pki.ServerTLS(pki.SiteFiles(rep.Site.PKI, "prod"))
	if err != nil {
		return nil, nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	srv := &wire.Server{Site: "prod", Store: store}
	go srv.Serve(l, tlsConf)
	clientTLS, err := pki.ClientTLS(pki.SiteFiles(rep.Site.PKI, "dr"), "127.0.0.1")
	if err != nil {
		srv.Stop()
		return nil, nil, err
	}
	c, err := wire.Dial(ctx, l.Addr().String(), clientTLS, "dr", "prod", wire.CompressionZstd)
	if err != nil {
		srv.Stop()
		return nil, nil, err
	}
	return c, func() { c.Close(); srv.Stop() }, nil
}

// dataHashes is the hash of every block of an export that does not read as zeros.
func dataHashes(ctx context.Context, c *nbd.Client) (map[int64]lifeboat.Hash, error) {
	out := map[int64]lifeboat.Hash{}
	buf := make([]byte, lifeboat.BlockSize)
	var extents []nbd.Extent
	if err := c.BlockStatus(ctx, "base:allocation", 0, c.Size(), func(x nbd.Extent) error {
		if x.Flags&nbd.StateZero == 0 {
			extents = append(extents, x)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	for _, x := range extents {
		for b := x.Offset / lifeboat.BlockSize; b*lifeboat.BlockSize < x.Offset+x.Length; b++ {
			if _, done := out[b]; done {
				continue
			}
			blk := buf[:min(lifeboat.BlockSize, c.Size()-b*lifeboat.BlockSize)]
			if err := c.Read(ctx, blk, b*lifeboat.BlockSize); err != nil {
				return nil, err
			}
			if !lifeboat.AllZero(blk) {
				out[b] = lifeboat.HashBlock(blk)
			}
		}
	}
	return out, nil
}

func (r *failbackResult) print(e *env) {
	e.printf("\n## 7. Failback: one cycle sends both sides' changes into the production disk\n\n")
	if len(r.Rows) > 0 {
		x := r.Rows[0]
		e.printf("A %s qcow2 disk holding %s is replicated; production then writes %s in 64 KiB random blocks and is lost;\n"+
			"the VM, running at the recovery site on an overlay of the point, writes %s more the same way. One failback cycle.\n\n",
			size(x.Disk), size(x.Data), size(x.Prod), size(x.Rec))
	}
	t := e.table("production's changes found", "changed at recovery", "at production", "union", "cycle handled", "sent", "sent / union", "goal",
		"read at production", "time", "production = recovered")
	for _, x := range r.Rows {
		ratio := float64(x.Sent) / float64(x.Union)
		goal := "≤ 1.05×: met"
		if ratio > 1.05 {
			goal = "≤ 1.05×: MISSED"
		}
		t.row(x.Mode, size(x.Rec), size(x.Prod), size(x.Union), size(x.Handled), size(x.Sent), fmt.Sprintf("%.3f×", ratio), goal,
			size(x.ProdRead), secs(x.Time.Seconds()), yesNo(x.Identical))
	}
	t.flush()
	e.printf("\nThe cycle reads at the recovery site only the blocks it handled (the recovered VM's dirty blocks and production's\n" +
		"changed ones); production reads nothing of its disk when its generations survived (a bitmap scan), and its data\n" +
		"blocks, hashed locally, when they did not (only their hashes cross). Random data: zstd gains nothing here.\n")
}

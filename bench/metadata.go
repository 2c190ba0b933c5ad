package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// The metadata benchmark (`go run ./bench -only metadata`): a 16 TiB sparse
// qcow2 with a few GiB of data, its initial sync, a cycle after the guest
// discards 4 TiB, and a cycle whose commit runs a retention merge (keep 2),
// with the peak RSS of each site, the commit and merge times and the size of
// the catalog's records. The recovery site runs in a process of its own (this
// binary again, see serveRecoverySite) so that each site's RSS is its own.

const tib = gib << 10

type metadataPhase struct {
	Name        string
	Cycle       measured
	Phases      phases
	Merge       time.Duration // the retention merge inside the commit, as the site logged it
	ProtRSS     int64         // peak RSS of this process (the protected side) during the phase
	RecRSS      int64         // peak RSS of the recovery site's process
	Records     []recovery.RecordStat
	CatalogSize int64
	ImageSize   int64 // the point's own qcow2 file (its qcow2 metadata and data)
}

type metadataResult struct {
	DiskSize, Data, Discard int64
	Phases                  []metadataPhase
	Identical               bool
}

var mergedTook = regexp.MustCompile(`"msg":"retention: merged".*"took":([0-9]+)`)

// lastMerge is the duration of the newest merge the site logged.
func lastMerge(dir string) time.Duration {
	b, _ := os.ReadFile(filepath.Join(dir, "site.log"))
	var d time.Duration
	for _, m := range mergedTook.FindAllSubmatch(b, -1) {
		n, _ := strconv.ParseInt(string(m[1]), 10, 64)
		d = time.Duration(n)
	}
	return d
}

// discardingDiskArgs are qemu.DiskArgs with discard=unmap on the qcow2 node,
// so that the guest's trim frees clusters (and dirties the bitmap) as a real
// VM's disk with discard enabled does.
func discardingDiskArgs(node, image, format string) []string {
	args := qemu.DiskArgs(node, image, format)
	for i := range args {
		var spec map[string]any
		if args[i] == "--blockdev" && i+1 < len(args) && json.Unmarshal([]byte(args[i+1]), &spec) == nil {
			spec["discard"] = "unmap"
			b, _ := json.Marshal(spec)
			args[i+1] = string(b)
		}
	}
	return args
}

func benchMetadata(ctx context.Context, e *env) (*metadataResult, error) {
	c := e.cfg
	res := &metadataResult{DiskSize: c.MetaDisk, Data: c.MetaData, Discard: c.MetaDiscard}
	e.progress("metadata: a %s sparse disk, writing %s of random data", size(c.MetaDisk), size(c.MetaData))
	vm, err := startVMArgs(ctx, e.path("meta-vm"), c.MetaDisk, 11, "qcow2", discardingDiskArgs)
	if err != nil {
		return nil, err
	}
	defer e.stop("source VM", vm.Stop)
	// The data: a third at the start, a third inside the range discarded
	// later, a third at the end.
	third := c.MetaData / 3 / mib * mib
	discardAt := c.MetaDisk / 4
	content, _ := newContent(contentRandom, 11)
	for _, off := range []int64{0, discardAt + c.MetaDiscard/2, c.MetaDisk - third} {
		if err := vm.WriteContent(ctx, content, off, third); err != nil {
			return nil, err
		}
	}
	res.Data = 3 * third

	siteDir := e.path("meta-site")
	if err := os.MkdirAll(siteDir, 0o700); err != nil {
		return nil, err
	}
	site, err := startRecoveryProcess(ctx, siteDir, 2)
	if err != nil {
		return nil, err
	}
	defer e.stop("recovery site", site.Stop)
	client, err := site.client(ctx, wire.CompressionZstd)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	work := e.path("meta-work")
	if err := os.MkdirAll(work, 0o700); err != nil {
		return nil, err
	}
	rep := &replication{Name: "bench-meta", Client: client, dir: work, P: &protect.Protector{
		VM: protect.VM{Name: "bench-meta", QMPSocket: vm.Daemon.ClientQMPSocket(), NBDSocket: vm.Daemon.NBDSocket(),
			Disks: []string{diskName}, WorkDir: work},
		Target: client, Log: e.log,
		Readers: protectReaders, ChunkSize: protectChunkSize, Connections: protectConnections,
	}}

	phase := func(name string, before func() error) error {
		if before != nil {
			if err := before(); err != nil {
				return err
			}
		}
		e.progress("metadata: %s", name)
		for _, pid := range []int{os.Getpid(), site.cmd.Process.Pid} {
			if err := resetPeakRSS(pid); err != nil {
				return fmt.Errorf("resetting the peak RSS of process %d: %w", pid, err)
			}
		}
		merge0 := lastMerge(siteDir)
		pt, m, ph, err := rep.Cycle(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		p := metadataPhase{Name: name, Cycle: m, Phases: ph}
		if p.ProtRSS, err = peakRSS(os.Getpid()); err != nil {
			return err
		}
		if p.RecRSS, err = peakRSS(site.cmd.Process.Pid); err != nil {
			return err
		}
		if d := lastMerge(siteDir); d != merge0 {
			p.Merge = d
		}
		st, err := site.stats(rep.Name)
		if err != nil {
			return err
		}
		p.Records, p.CatalogSize = st.Records, st.CatalogSize
		if fi, err := os.Stat(filepath.Join(siteDir, "store", "vms", rep.Name, diskName, fmt.Sprintf("%016d.qcow2", pt.ID))); err == nil {
			p.ImageSize = fi.Size()
		}
		res.Phases = append(res.Phases, p)
		return nil
	}
	if err := phase("initial sync", nil); err != nil {
		return nil, err
	}
	if err := phase("cycle after a "+size(c.MetaDiscard)+" discard", func() error {
		return vm.Guest.Client(diskName).Trim(ctx, discardAt, c.MetaDiscard)
	}); err != nil {
		return nil, err
	}
	if err := phase("cycle after 64 MiB of writes, with a retention merge", func() error {
		return vm.WriteContent(ctx, content, discardAt/2, 64*mib)
	}); err != nil {
		return nil, err
	}
	if err := vm.Flush(ctx); err != nil {
		return nil, err
	}
	st, err := site.stats(rep.Name)
	if err != nil {
		return nil, err
	}
	if res.Identical, err = qemu.Compare(ctx, vm.Image, st.Image); err != nil {
		return nil, fmt.Errorf("comparing the replica with the source: %w", err)
	}
	return res, nil
}

func (r *metadataResult) print(e *env) {
	e.printf("\n## 4. Metadata on a %s sparse disk (%s of data; %s discarded)\n\n", size(r.DiskSize), size(r.Data), size(r.Discard))
	e.printf("Each site in its own process; peak RSS (VmHWM, reset before each cycle) is the whole process:\n" +
		"the protected side is this harness (protector, wire client, the stand-in guest's NBD client), the\n" +
		"recovery site is the wire server and store (not the qemu-storage-daemons either side starts).\n" +
		"Commit is the cycle's commit phase (drain, flush, catalog commit, retention); merge is the retention merge in it.\n" +
		"Records are the catalog's entries per point after the cycle; the point's qcow2 is its own overlay's file size.\n\n")
	t := e.table("cycle", "time", "prepare / send / commit", "merge", "protected RSS", "recovery RSS", "records (point: data blocks + zero runs)", "catalog", "point's qcow2")
	for _, p := range r.Phases {
		var recs []string
		for _, s := range p.Records {
			recs = append(recs, fmt.Sprintf("%d: %d+%d", s.Point, s.Data, s.ZeroRuns))
		}
		merge := "-"
		if p.Merge > 0 {
			merge = secs(p.Merge.Seconds())
		}
		t.row(p.Name, secs(p.Cycle.Wall.Seconds()), p.Phases.String()+" s", merge,
			size(p.ProtRSS), size(p.RecRSS), strings.Join(recs, ", "), size(p.CatalogSize), size(p.ImageSize))
	}
	t.flush()
	e.printf("\nreplica of the latest point identical to the source: %s\n", yesNo(r.Identical))
}

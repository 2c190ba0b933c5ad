package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testsite"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// What `lifeboat serve` gives each protected VM (daemon/vm.go): the benchmarks
// measure the product as shipped.
const (
	protectReaders     = 8
	protectChunkSize   = 1 << 20
	protectConnections = 4
)

// stopTimeout bounds stopping a qemu-storage-daemon.
const stopTimeout = 20 * time.Second

// sourceVM stands in for the protected VM: a qemu-storage-daemon holding one
// qcow2 disk "vda" with a writable NBD export, through which the guest writes.
type sourceVM struct {
	Dir    string
	Image  string
	Format string
	Size   int64
	Daemon *qemu.Daemon
	Guest  *workload.Guest
}

const diskName = "vda"

// startVM creates a sparse qcow2 disk of size in dir and starts its daemon and guest.
func startVM(ctx context.Context, dir string, size int64, seed uint64) (*sourceVM, error) {
	return startVMArgs(ctx, dir, size, seed, "qcow2", qemu.DiskArgs)
}

// startVMArgs is startVM with a disk of format (qcow2 or raw) and the daemon's
// disk arguments made by diskArgs.
func startVMArgs(ctx context.Context, dir string, size int64, seed uint64, format string, diskArgs func(node, image, format string) []string) (*sourceVM, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	v := &sourceVM{Dir: dir, Image: filepath.Join(dir, diskName+"."+format), Size: size, Format: format}
	if err := qemu.CreateImage(ctx, v.Image, format, size, "", ""); err != nil {
		return nil, fmt.Errorf("source disk: %w", err)
	}
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, Args: diskArgs(diskName, v.Image, format), NBD: true})
	if err != nil {
		return nil, fmt.Errorf("source VM: %w", err)
	}
	v.Daemon = d
	g, err := workload.Open(ctx, d.NBDSocket(), seed, workload.Disk{Name: diskName, Size: size})
	if err != nil {
		v.Stop()
		return nil, err
	}
	v.Guest = g
	return v, nil
}

// Stop ends the guest and the daemon (bounded) and deletes the disk.
func (v *sourceVM) Stop() error {
	if v.Guest != nil {
		v.Guest.Close()
		v.Guest = nil
	}
	var err error
	if v.Daemon != nil {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		err = v.Daemon.Stop(ctx)
		v.Daemon = nil
	}
	return errors.Join(err, os.RemoveAll(v.Dir))
}

// Flush makes the image file on disk hold what the guest wrote (qcow2 metadata
// included), so that tools reading the file (rsync, cp, qemu-img) see it.
func (v *sourceVM) Flush(ctx context.Context) error {
	if err := v.Guest.Client(diskName).Flush(ctx); err != nil {
		return fmt.Errorf("flush source disk: %w", err)
	}
	return nil
}

// NBDURI is the VM's writable export of the disk, for nbdcopy.
func (v *sourceVM) NBDURI() string {
	return "nbd+unix:///" + diskName + "?socket=" + v.Daemon.NBDSocket()
}

// WriteContent writes n bytes from r at off in 1 MiB writes, as a guest
// writing files would.
func (v *sourceVM) WriteContent(ctx context.Context, r io.Reader, off, n int64) error {
	buf := make([]byte, 1<<20)
	for done := int64(0); done < n; {
		b := buf[:min(int64(len(buf)), n-done)]
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("content: %w", err)
		}
		if err := v.Guest.Client(diskName).Write(ctx, b, off+done, false); err != nil {
			return fmt.Errorf("guest write at %d: %w", off+done, err)
		}
		done += int64(len(b))
	}
	return nil
}

// replication is a recovery site on loopback mutual TLS and a protector of
// one source VM replicating to it.
type replication struct {
	Name   string
	Site   *testsite.Site
	Client *wire.Client
	P      *protect.Protector
	dir    string
	// remote, when set, is the recovery site's own process (Site is nil).
	remote *recoveryProcess
	// mark, when set, is told when a cycle starts ("start"), reaches each
	// phase it reports ("snapshot", "send", "commit") and ends ("end").
	mark func(event string)
}

// startReplication runs a fresh recovery site in dir and a protector of vm.
func startReplication(ctx context.Context, dir, name string, vm *sourceVM, comp wire.Compression, log *slog.Logger) (*replication, error) {
	return newReplication(ctx, dir, vm.protected(dir, name), comp, log)
}

// protected is vm as the protector named name, working in dir, sees it.
func (v *sourceVM) protected(dir, name string) protect.VM {
	return protect.VM{Name: name, QMPSocket: v.Daemon.ClientQMPSocket(), NBDSocket: v.Daemon.NBDSocket(),
		Disks: []string{diskName}, WorkDir: filepath.Join(dir, "work")}
}

// newReplication runs a fresh recovery site in dir and a protector of v
// (whose first disk Identical compares), as `lifeboat serve` sets one up.
func newReplication(ctx context.Context, dir string, v protect.VM, comp wire.Compression, log *slog.Logger) (*replication, error) {
	return startSite(dir, v, log, func(r *replication) (err error) {
		if r.Site, err = testsite.New(ctx, dir, recovery.Options{Keep: 100, Logger: log}); err != nil {
			return err
		}
		r.Client, err = r.Site.Client(ctx, comp)
		return err
	})
}

// newRemoteReplication is newReplication with the recovery site in a
// process of its own, as on another host: its CPU is counted apart from this
// process's, which is then the protected site's alone.
func newRemoteReplication(ctx context.Context, dir string, v protect.VM, comp wire.Compression, log *slog.Logger) (*replication, error) {
	return startSite(dir, v, log, func(r *replication) (err error) {
		if r.remote, err = startRecoveryProcess(ctx, dir, 100); err != nil {
			return err
		}
		r.Client, err = r.remote.client(ctx, comp)
		return err
	})
}

// startSite makes dir and v's work directory, has start set up the site and
// r.Client, and makes the protector.
func startSite(dir string, v protect.VM, log *slog.Logger, start func(*replication) error) (*replication, error) {
	r := &replication{Name: v.Name, dir: dir}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(v.WorkDir, 0o700); err != nil {
		return nil, err
	}
	if err := start(r); err != nil {
		r.Stop()
		return nil, err
	}
	r.P = &protect.Protector{
		VM: v, Target: r.Client, Log: log,
		Readers: protectReaders, ChunkSize: protectChunkSize, Connections: protectConnections,
	}
	return r, nil
}

// phases splits a cycle's time by the phases it reports through Progress.
type phases struct {
	Prepare time.Duration // QMP, generations, the fleece transaction, planning, Begin at the recovery site
	Send    time.Duration // reading, hashing, compressing, sending, writing at the recovery site
	Commit  time.Duration // the last writes drained, the replica flushed, the point committed; the fleece torn down
}

func (p phases) String() string {
	return fmt.Sprintf("%.2f / %.2f / %.2f", p.Prepare.Seconds(), p.Send.Seconds(), p.Commit.Seconds())
}

// Cycle runs one cycle, measured.
func (r *replication) Cycle(ctx context.Context) (lifeboat.Point, measured, phases, error) {
	var (
		pt                lifeboat.Point
		start, send, comm time.Time
	)
	mark := func(string) {}
	if r.mark != nil {
		mark = r.mark
	}
	r.P.Progress = func(p protect.Progress) {
		// Called from the cycle's own goroutine, before Cycle returns.
		mark(p.Phase)
		switch {
		case p.Phase == "send" && send.IsZero():
			send = time.Now()
		case p.Phase == "commit" && comm.IsZero():
			comm = time.Now()
		}
	}
	defer func() { r.P.Progress = nil }()
	var site0 float64
	if r.remote != nil {
		site0 = r.remote.cpu()
	}
	m, err := measure(func() error {
		start = time.Now()
		mark("start")
		var err error
		pt, err = r.P.Cycle(ctx)
		mark("end")
		return err
	})
	if r.remote != nil {
		m.CPU.Site = r.remote.cpu() - site0
	}
	var ph phases
	if err == nil && !send.IsZero() && !comm.IsZero() {
		end := start.Add(m.Wall)
		ph = phases{Prepare: send.Sub(start), Send: comm.Sub(send), Commit: end.Sub(comm)}
	}
	return pt, m, ph, err
}

// Identical reports whether the replica of point id is byte-identical to the
// source image (the source must not be written to since the point's instant,
// and flushed).
func (r *replication) Identical(ctx context.Context, id uint64, source string) (bool, error) {
	var (
		img string
		err error
	)
	if r.remote != nil {
		img, err = r.remote.imagePath(r.Name, id, r.P.VM.Disks[0])
	} else {
		img, err = r.Site.Store.ImagePath(r.Name, id, r.P.VM.Disks[0])
	}
	if err != nil {
		return false, err
	}
	return qemu.Compare(ctx, source, img)
}

// Stop ends the site and deletes its directory.
func (r *replication) Stop() error {
	if r.Client != nil {
		r.Client.Close()
	}
	if r.Site != nil {
		r.Site.Stop()
	}
	if r.remote != nil {
		r.remote.Stop()
	}
	return os.RemoveAll(r.dir)
}

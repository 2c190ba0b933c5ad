package recovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// runDir makes a fresh runtime directory for a qemu-storage-daemon: under the
// store when its path leaves room for the daemon's unix sockets, else under
// the system's temporary directory.
func (s *Store) runDir() (string, error) {
	parent := filepath.Join(s.dir, "run")
	// 107 bytes of sun_path, less "/" + "w" + 10 random digits + "/qmp.sock";
	// and no comma, which qemu's option syntax would split the path on.
	if len(parent) > 107-21 || strings.Contains(parent, ",") {
		parent = os.TempDir()
	}
	d, err := os.MkdirTemp(parent, "w")
	if errors.Is(err, syscall.ENOSPC) && parent != os.TempDir() {
		// A full store must still verify, export and fail over: the
		// daemon's sockets need no room of the store's.
		d, err = os.MkdirTemp(os.TempDir(), "lifeboat-w")
	}
	if err != nil {
		return "", fmt.Errorf("creating a runtime directory for qemu-storage-daemon: %w", err)
	}
	return d, nil
}

// helperCommandTimeout bounds one blockdev-add or block-export-add in a
// daemon of startDaemon's: each takes milliseconds. A variable so a test can
// shorten it.
var helperCommandTimeout = 20 * time.Second

// testHookDaemonStarted, when set (by a test), is called with each daemon
// startDaemon starts, before it opens anything.
var testHookDaemonStarted func(*qemu.Daemon)

// startDaemon starts a qemu-storage-daemon in runDir that opens the qcow2
// images files (each with its backing chain) and exports them over NBD as
// names. Where chains names a file's backing images (newest first, all qcow2
// images of the store), they are opened read-only and without QEMU's image
// locks, so that a retention merge may commit into them meanwhile (see
// vmLock); the last one's own backing, if any, is opened as its header says.
// A daemon that does not answer a command in helperCommandTimeout (seen once
// in CI under heavy load; what it was doing is logged) is killed and one more
// is started: it has opened images and nothing else, so nothing is lost by
// killing it.
func (s *Store) startDaemon(ctx context.Context, runDir string, names, files []string, chains [][]string, writable bool) (*qemu.Daemon, error) {
	d, err := s.startDaemonOnce(ctx, runDir, names, files, chains, writable)
	if errors.Is(err, errUnanswered) && ctx.Err() == nil {
		s.log.Warn("qemu-storage-daemon did not answer; starting another", "dir", runDir, "err", err)
		d, err = s.startDaemonOnce(ctx, runDir, names, files, chains, writable)
	}
	return d, err
}

// preallocMax is how far ahead the preallocate filter grows a new image.
const preallocMax = 128 << 20

// preallocSize is how far ahead the preallocate filter may grow each new
// image in dir: 128 MiB, less when the file system has less than 2 GiB free
// (a sixteenth of what is free), and 0 (no filter) below 256 MiB free. The
// filter grows a file by what it can get when the file system has less room
// than it asks for, gives up, and leaves the file that large when the image
// is closed: on a 64 MiB file system a point of 8 MiB took every free byte,
// and its catalog transaction then failed (TestStoreFullLosesNothing).
func preallocSize(dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	n := min(preallocMax, free/16) &^ (1<<20 - 1)
	if n < 16<<20 {
		return 0
	}
	return n
}

// errUnanswered marks a command a daemon did not answer in helperCommandTimeout.
var errUnanswered = errors.New("qemu-storage-daemon did not answer")

func (s *Store) startDaemonOnce(ctx context.Context, runDir string, names, files []string, chains [][]string, writable bool) (*qemu.Daemon, error) {
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: runDir, NBD: true})
	if err != nil {
		return nil, err
	}
	if testHookDaemonStarted != nil {
		testHookDaemonStarted(d)
	}
	run := func(what string, cmd func(context.Context) error) error { return bounded(ctx, d, what, cmd) }
	prealloc := int64(0)
	if writable && s.prealloc.Load() {
		prealloc = preallocSize(filepath.Dir(files[0]))
	}
	for i, file := range files {
		var below string
		if i < len(chains) && len(chains[i]) > 0 {
			if err := run("opening the chain below "+file, func(ctx context.Context) (err error) {
				below, err = s.addChain(ctx, d, i, "", chains[i])
				return err
			}); err != nil {
				return nil, err
			}
		}
		if err := s.openImage(ctx, d, i, names[i], file, below, writable, prealloc); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// bounded runs one command of d's, bounded by helperCommandTimeout within
// ctx; on an error it kills d.
func bounded(ctx context.Context, d *qemu.Daemon, what string, cmd func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, helperCommandTimeout)
	defer cancel()
	err := cmd(cctx)
	if err == nil {
		return nil
	}
	if cctx.Err() != nil && ctx.Err() == nil {
		err = fmt.Errorf("%s: %w in %v: %w (%s)", what, errUnanswered, helperCommandTimeout, err, d.Diagnosis())
	} else {
		err = fmt.Errorf("%s: %w", what, err)
	}
	return errors.Join(err, d.Kill())
}

// testHookBlockdevAdd, when set, may refuse a blockdev-add before QEMU sees
// it (tests: errors a real QEMU gives only when the whole machine is short of
// something).
var testHookBlockdevAdd func(spec map[string]any) error

// blockdevAdd adds the node spec describes to d. Linux AIO needs a context
// of the kernel's, and a host has fs.aio-max-nr events for all of them
// (1024 per QEMU daemon that uses it: a host running many VMs with
// aio=native, or daemons that a crash left, can use them all). QEMU 7.2 then
// fails the blockdev-add ("Unable to use native AIO") instead of falling back
// to its thread pool, which would fail every point from then on: the store
// falls back itself, with a warning, and opens files without native AIO from
// then on.
func (s *Store) blockdevAdd(ctx context.Context, d *qemu.Daemon, spec map[string]any) error {
	if s.noNativeAIO.Load() {
		withoutNativeAIO(spec)
	}
	add := func() error {
		if h := testHookBlockdevAdd; h != nil {
			if err := h(spec); err != nil {
				return err
			}
		}
		return d.Monitor().BlockdevAdd(ctx, spec)
	}
	err := add()
	if err != nil && strings.Contains(err.Error(), "native AIO") && withoutNativeAIO(spec) {
		if !s.noNativeAIO.Swap(true) {
			s.log.Warn("the kernel refused QEMU a Linux AIO context (is fs.aio-max-nr reached? see /proc/sys/fs/aio-nr): restore points are written through QEMU's thread pool from now on (more CPU)", "err", err)
		}
		err = add()
	}
	return err
}

// withoutNativeAIO removes aio=native from every file node of spec and says
// whether there was one.
func withoutNativeAIO(spec map[string]any) bool {
	found := false
	for m := spec; m != nil; {
		if m["aio"] == "native" {
			delete(m, "aio")
			found = true
		}
		m, _ = m["file"].(map[string]any)
	}
	return found
}

// openImage opens file in d as node d<i>, above the node below ("" for
// none: its header says), and exports it as name.
func (s *Store) openImage(ctx context.Context, d *qemu.Daemon, i int, name, file, below string, writable bool, prealloc int64) error {
	run := func(what string, cmd func(context.Context) error) error { return bounded(ctx, d, what, cmd) }
	node := "d" + strconv.Itoa(i)
	proto := map[string]any{"driver": "file", "filename": file}
	spec := map[string]any{
		"driver":    "qcow2",
		"node-name": node,
		"read-only": !writable,
		"file":      proto,
	}
	if writable {
		spec["discard"] = "unmap" // zeroed ranges leave no data behind
		// No flush to the disk while the point is written: qcow2 syncs
		// each new L2 table's L1 entry (a flush per 256 MiB of the disk
		// that the point first writes into, with subclusters), and a
		// point not committed is thrown away whole, so the order in which
		// its metadata reaches the disk does not matter until the commit,
		// which fdatasyncs every image once its node is closed
		// (Writer.Commit: syncFiles). 2800 random writes spread over a
		// new overlay of a 64 GiB disk (qemu-img bench, 3 runs each):
		// 64 KiB 0.37–0.41 s, 0.24–0.28 s without the flushes; 4 KiB
		// 0.32–0.37 s, 0.19–0.25 s.
		cache := map[string]any{"no-flush": true}
		spec["cache"] = cache
		if s.direct {
			// A point's blocks are written once and not read back soon:
			// the page cache would only cost a copy of each, and on some
			// hosts that copy is most of the writer's CPU (see directIO).
			cache["direct"] = true
			// With O_DIRECT, Linux AIO submits each write from the
			// daemon's own thread instead of handing it to a worker
			// thread and back: 2048 random 64 KiB writes cost the daemon
			// 0.5 CPU s instead of 0.8 here. Where the kernel refuses an
			// AIO context, blockdevAdd falls back to the thread pool.
			proto["aio"] = "native"
		}
		if prealloc > 0 {
			// Every write of a new point allocates a cluster at the
			// image's end. Growing the file by each write serialises
			// the writes in the file system (ext4 takes an O_DIRECT
			// write past the end under its inode lock): the
			// preallocate filter grows it 128 MiB at a time and cuts
			// it back to its end when the image is closed. 2800 random
			// 64 KiB writes into a new overlay through the Writer, 8 in
			// flight, O_DIRECT, 9 rounds each here: 16 GiB disk 0.73 s
			// without it, 0.42 s with it (means); 64 GiB 0.91 s, 0.66 s.
			spec["file"] = map[string]any{"driver": "preallocate", "prealloc-size": prealloc, "file": proto}
		}
	}
	if below != "" {
		spec["backing"] = below
	}
	add := func(ctx context.Context) error {
		err := s.blockdevAdd(ctx, d, spec)
		if f, ok := spec["file"].(map[string]any); ok && err != nil && f["driver"] == "preallocate" && strings.Contains(err.Error(), "preallocate") {
			// A QEMU older than 6.0 has no preallocate filter: write
			// through the file alone from now on.
			s.log.Warn("this QEMU has no preallocate filter: new restore points are written without it (slower)", "err", err)
			s.prealloc.Store(false)
			spec["file"] = proto
			err = s.blockdevAdd(ctx, d, spec)
		}
		return err
	}
	if err := run("opening "+file, add); err != nil {
		if _, serr := os.Stat(file); serr == nil {
			// Seen once in CI: QEMU reported a path one byte short of the one
			// sent. Say so, with the bytes sent, for the next time.
			sent, _ := json.Marshal(spec)
			err = fmt.Errorf("%w (the file exists; lifeboat sent %s)", err, sent)
		}
		return err
	}
	exp := qemu.Export{ID: "e" + strconv.Itoa(i), Node: node, Name: name, Writable: writable}
	return run("exporting "+file, func(ctx context.Context) error { return d.Monitor().ExportAdd(ctx, exp) })
}

// addChain opens a chain of qcow2 images in d (newest first), each its own
// node, read-only, without image locks, with the writer's cache mode, above
// the node below ("" for none: the last one's backing is left to its
// header), and returns the newest one's node name. Named nodes outlive the
// image above them, so that a writer's daemon can go on to the next point
// (see carry).
func (s *Store) addChain(ctx context.Context, d *qemu.Daemon, disk int, below string, files []string) (string, error) {
	for j := len(files) - 1; j >= 0; j-- {
		name := chainNode(disk, files[j])
		proto := map[string]any{"driver": "file", "filename": files[j], "locking": "off"}
		spec := map[string]any{"driver": "qcow2", "node-name": name, "read-only": true, "file": proto}
		if s.direct {
			spec["cache"] = map[string]any{"direct": true}
			proto["aio"] = "native"
		}
		if below != "" {
			spec["backing"] = below
		}
		if err := s.blockdevAdd(ctx, d, spec); err != nil {
			return "", fmt.Errorf("opening %s: %w", files[j], err)
		}
		below = name
	}
	return below, nil
}

// chainNode names the node of disk's image file in a writer's daemon (a
// node name is at most 31 letters, digits and "-._", whatever the path).
func chainNode(disk int, file string) string {
	h := fnv.New64a()
	h.Write([]byte(file))
	return fmt.Sprintf("c%d-%016x", disk, h.Sum64())
}

// directIO reports whether files in dir can be opened with O_DIRECT, which
// the writer daemon then uses for the images it writes. Measured with `make
// bench` on a 2-core VM: writing 1 GiB of a point cost the writer 1.8 CPU
// seconds through the page cache and 0.6 with O_DIRECT, and the initial
// sync's time fell from 4.4 s to 2.9 s; `dd bs=1M conv=fsync` of 1 GiB
// there took 2.8 s of system time buffered, 0.3 s direct. A file system
// without O_DIRECT (FUSE, older tmpfs) is written through the cache as
// before. Durability is unchanged: a commit still flushes (fdatasync).
func directIO(dir string) bool {
	f, err := os.CreateTemp(dir, ".direct-probe-")
	if err != nil {
		return false
	}
	name := f.Name()
	f.Close()
	defer os.Remove(name)
	fd, err := syscall.Open(name, syscall.O_RDWR|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	syscall.Close(fd)
	return true
}

// dialExport connects to a disk's export and checks it has the disk's size.
func dialExport(ctx context.Context, d *qemu.Daemon, disk string, size int64) (*nbd.Client, error) {
	c, err := nbd.Dial(ctx, "unix:"+d.NBDSocket(), disk, nbdOptions)
	if err != nil {
		return nil, fmt.Errorf("disk %q: connecting to its NBD export: %w", disk, err)
	}
	if c.Size() != size {
		c.Close()
		return nil, fmt.Errorf("disk %q: its image is %d bytes, the catalog says %d: %w", disk, c.Size(), size, errCatalog)
	}
	return c, nil
}

// resizeImage sets a qcow2 image's virtual size through a daemon of its own
// (block_resize may shrink; qemu-img's resize is not one of our tools).
func (s *Store) resizeImage(ctx context.Context, vm, path string, size int64) error {
	run, err := s.runDir()
	if err != nil {
		return err
	}
	defer os.RemoveAll(run)
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: run})
	if err != nil {
		return err
	}
	spec := map[string]any{"driver": "qcow2", "node-name": "r0", "file": map[string]any{"driver": "file", "filename": path}}
	if err := d.Monitor().BlockdevAdd(ctx, spec); err != nil {
		return errors.Join(err, d.Kill())
	}
	if err := d.Monitor().BlockResize(ctx, "r0", size); err != nil {
		return errors.Join(err, d.Kill())
	}
	return d.Stop(ctx)
}

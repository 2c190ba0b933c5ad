package recovery

import (
	"context"
	"errors"
	"fmt"
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
	if err != nil {
		return "", fmt.Errorf("creating a runtime directory for qemu-storage-daemon: %w", err)
	}
	return d, nil
}

// startDaemon starts a qemu-storage-daemon in runDir that opens the qcow2
// images files (each with its backing chain) and exports them over NBD as names.
func (s *Store) startDaemon(ctx context.Context, runDir string, names, files []string, writable bool) (*qemu.Daemon, error) {
	d, err := qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: runDir, NBD: true})
	if err != nil {
		return nil, err
	}
	for i, file := range files {
		node := "d" + strconv.Itoa(i)
		spec := map[string]any{
			"driver":    "qcow2",
			"node-name": node,
			"read-only": !writable,
			"file":      map[string]any{"driver": "file", "filename": file},
		}
		if writable {
			spec["discard"] = "unmap" // zeroed ranges leave no data behind
		}
		if err := d.Monitor().BlockdevAdd(ctx, spec); err != nil {
			return nil, errors.Join(fmt.Errorf("opening %s: %w", file, err), d.Kill())
		}
		if err := d.Monitor().ExportAdd(ctx, qemu.Export{ID: "e" + strconv.Itoa(i), Node: node, Name: names[i], Writable: writable}); err != nil {
			return nil, errors.Join(fmt.Errorf("exporting %s: %w", file, err), d.Kill())
		}
	}
	return d, nil
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

// killLeftoverDaemon kills the qemu-storage-daemon a crashed lifeboat left
// running in runDir, if any, so it neither holds image locks nor writes into
// files about to be deleted. The pid file is trusted only when the process
// is a qemu-storage-daemon using that directory.
func killLeftoverDaemon(ctx context.Context, runDir string) error {
	if runDir == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(runDir, "qsd.pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	isOurs := func() bool {
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		return err == nil && strings.Contains(string(cmd), "qemu-storage-daemon") && strings.Contains(string(cmd), runDir)
	}
	if !isOurs() {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing leftover qemu-storage-daemon %d: %w", pid, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for isOurs() { // a zombie's cmdline reads empty: its locks are gone
		select {
		case <-ctx.Done():
			return fmt.Errorf("leftover qemu-storage-daemon %d did not exit after SIGKILL", pid)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

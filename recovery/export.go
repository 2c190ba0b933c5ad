package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Export writes point id's (0 = latest) view of a disk to out as a standalone
// image in format (raw, qcow2, vmdk, vdi, vhdx: anything qemu-img writes),
// leaving zeros unallocated. The image is written beside out (mode 0600) and
// renamed to it once whole: a failed export leaves a file that was at out as
// it was, and never a part of an image under out's name. A point an image of
// which was cut short is refused (CheckImages).
func (s *Store) Export(ctx context.Context, vm string, id uint64, disk, out, format string) error {
	if fi, err := os.Stat(out); err == nil && fi.IsDir() {
		return fmt.Errorf("vm %q disk %q: %s is a directory: give the image's file name (-o %s)", vm, disk, out, filepath.Join(out, vm+"-"+disk+".img"))
	} else if err == nil && !fi.Mode().IsRegular() {
		// The image is renamed to out once whole: that would replace a
		// device node or a FIFO with a file, and write nothing into it.
		return fmt.Errorf("vm %q disk %q: %s is not a regular file (%s): an export writes an image file, which would take its place; export to a file, then write that onto it (`qemu-img convert -n -O raw FILE %s`)", vm, disk, out, fileKind(fi.Mode()), out)
	}
	dir := filepath.Dir(out)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vm %q disk %q: cannot export to %s: its directory %s does not exist (create it, or give another -o)", vm, disk, out, dir)
	}
	unlock, err := s.lockChain(ctx, vm, false)
	if err != nil {
		return err
	}
	defer unlock()
	src, err := s.ImagePath(vm, id, disk)
	if err != nil {
		return err
	}
	// qemu-img reads the clusters past a truncated image's end as zeros,
	// and wrote them out as the disk's without a word.
	pt, err := s.Point(vm, id)
	if err != nil {
		return err
	}
	if err := s.checkDiskImages(vm, pt.ID, disk); err != nil {
		return fmt.Errorf("%w (to write it out all the same, zeros where the file was cut: qemu-img convert -f qcow2 -O raw %s %s)", err, src, out)
	}
	if format == "" {
		format = "raw"
	}
	s.sweepExportTemps(out)
	f, err := os.CreateTemp(dir, exportTempPrefix(out)+"*")
	if err != nil {
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s: %w", vm, disk, id, out, err)
	}
	tmp := f.Name()
	// Held while the export runs, and dropped by the kernel with this
	// process: an export to out finds by it what a killed one left.
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s: locking %s: %w", vm, disk, id, out, tmp, err)
	}
	if err := qemu.Convert(ctx, src, "qcow2", tmp, format); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s as %s: %w", vm, disk, id, out, format, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s: %w", vm, disk, id, out, err)
	}
	return nil
}

// exportTempPrefix starts the name of an export's temporary image beside
// out.
func exportTempPrefix(out string) string { return "." + filepath.Base(out) + ".lifeboat-export-" }

// sweepExportTemps removes what exports to out that their site did not
// finish (it was killed) left beside it: the temporary image, as large as
// the disk, and the qemu-img that may still be writing it (a child of the
// dead site, which outlived it). A temporary image that an export under way
// holds (its flock, in this site or another) is left alone.
func (s *Store) sweepExportTemps(out string) {
	temps, _ := filepath.Glob(filepath.Join(filepath.Dir(out), exportTempPrefix(out)+"*"))
	for _, tmp := range temps {
		f, err := os.Open(tmp)
		if err != nil {
			continue
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			continue // an export under way
		}
		killed := killExportWriters(tmp)
		err = os.Remove(tmp)
		f.Close()
		s.log.Warn("removed what an export that its site did not finish left beside its output", "file", tmp, "killed_qemu_img", killed, "err", err)
	}
}

// killExportWriters kills the processes converting into file (qemu-img
// convert ... file: file's name is an export's own, random), and returns
// their pids.
func killExportWriters(file string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmd), "\x00")
		if slices.Contains(args, "convert") && slices.Contains(args, file) && syscall.Kill(pid, syscall.SIGKILL) == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// fileKind names what a file that is not a regular one is.
func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m&os.ModeDevice != 0:
		return "a block device"
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeSocket != 0:
		return "a socket"
	}
	return "a " + m.Type().String()
}

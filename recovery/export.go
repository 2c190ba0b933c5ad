package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

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
	f, err := os.CreateTemp(dir, "."+filepath.Base(out)+".lifeboat-export-*")
	if err != nil {
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s: %w", vm, disk, id, out, err)
	}
	tmp := f.Name()
	f.Close()
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

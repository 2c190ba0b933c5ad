package recovery

import (
	"context"
	"fmt"
	"os"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// Export writes point id's (0 = latest) view of a disk to out as a standalone
// image in format (raw, qcow2, vmdk, vdi, vhdx: anything qemu-img writes),
// leaving zeros unallocated. A failed export removes what it wrote.
func (s *Store) Export(ctx context.Context, vm string, id uint64, disk, out, format string) error {
	unlock, err := s.lockChain(ctx, vm, false)
	if err != nil {
		return err
	}
	defer unlock()
	src, err := s.ImagePath(vm, id, disk)
	if err != nil {
		return err
	}
	if format == "" {
		format = "raw"
	}
	if err := qemu.Convert(ctx, src, "qcow2", out, format); err != nil {
		os.Remove(out)
		return fmt.Errorf("vm %q disk %q: exporting point %d to %s as %s: %w", vm, disk, id, out, format, err)
	}
	return nil
}

package daemon

import (
	"context"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// recoveryStore presents the recovery store to the wire receiver.
type recoveryStore struct{ *recovery.Store }

func (s recoveryStore) BeginPoint(ctx context.Context, p lifeboat.Point) (wire.PointWriter, error) {
	spec := recovery.BeginSpec{
		VM: p.VM, ID: p.ID, Instant: p.Instant, Consistency: p.Consistency,
		Group: p.Group, Freeze: p.Freeze, Note: p.Note,
	}
	for _, d := range p.Disks {
		spec.Disks = append(spec.Disks, recovery.DiskSpec{Name: d.Name, Size: d.Size, Resync: d.Resync})
	}
	return s.Begin(ctx, spec)
}

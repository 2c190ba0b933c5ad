package wire

import (
	"context"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// RecoveryStore presents a recovery site's store to the receiver.
func RecoveryStore(st *recovery.Store) Store { return recoveryStore{st} }

type recoveryStore struct{ *recovery.Store }

func (s recoveryStore) BeginPoint(ctx context.Context, p lifeboat.Point) (PointWriter, error) {
	spec := recovery.BeginSpec{
		VM: p.VM, ID: p.ID, Instant: p.Instant, Consistency: p.Consistency,
		Group: p.Group, Freeze: p.Freeze, Note: p.Note, Site: p.Site, Definition: p.Definition,
	}
	for _, d := range p.Disks {
		spec.Disks = append(spec.Disks, recovery.DiskSpec{Name: d.Name, Size: d.Size, Resync: d.Resync,
			Lineage: d.Lineage, Base: d.Base, BaseGeneration: d.BaseGeneration, Generation: d.Generation})
	}
	return s.Begin(ctx, spec)
}

package wire

import (
	"fmt"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

func pointToPB(p lifeboat.Point) *wirepb.Point {
	def, err := lifeboat.EncodeDefinition(p.Definition)
	if err != nil {
		def = nil // bounded at the source (protect drops an oversized one with a note)
	}
	out := &wirepb.Point{
		Definition:      def,
		Vm:              p.VM,
		Id:              p.ID,
		InstantUnixNano: p.Instant.UnixNano(),
		Consistency:     string(p.Consistency),
		Group:           p.Group,
		Stats:           statsToPB(p.Stats),
		FreezeNs:        int64(p.Freeze),
		Note:            p.Note,
		Site:            p.Site,
	}
	for _, d := range p.Disks {
		out.Disks = append(out.Disks, &wirepb.Disk{Name: d.Name, Size: d.Size, Resync: d.Resync,
			Lineage: d.Lineage, Base: d.Base, BaseGeneration: d.BaseGeneration, Generation: d.Generation})
	}
	return out
}

func pointFromPB(p *wirepb.Point) (lifeboat.Point, error) {
	if p == nil {
		return lifeboat.Point{}, fmt.Errorf("point missing from message")
	}
	c, err := lifeboat.ParseConsistency(p.Consistency)
	if err != nil {
		return lifeboat.Point{}, err
	}
	out := lifeboat.Point{
		VM:          p.Vm,
		ID:          p.Id,
		Instant:     time.Unix(0, p.InstantUnixNano).UTC(),
		Consistency: c,
		Group:       p.Group,
		Stats:       statsFromPB(p.Stats),
		Freeze:      time.Duration(p.FreezeNs),
		Note:        p.Note,
		Site:        p.Site,
	}
	if out.Definition, err = lifeboat.DecodeDefinition(p.Definition); err != nil {
		return lifeboat.Point{}, fmt.Errorf("point %d: %w", p.Id, err)
	}
	for _, d := range p.Disks {
		if d == nil {
			return lifeboat.Point{}, fmt.Errorf("point %d: disk missing from message", p.Id)
		}
		if d.Size < 0 {
			return lifeboat.Point{}, fmt.Errorf("disk %q: negative size %d", d.Name, d.Size)
		}
		out.Disks = append(out.Disks, lifeboat.PointDisk{Name: d.Name, Size: d.Size, Resync: d.Resync,
			Lineage: d.Lineage, Base: d.Base, BaseGeneration: d.BaseGeneration, Generation: d.Generation})
	}
	return out, nil
}

func statsToPB(s lifeboat.CycleStats) *wirepb.Stats {
	return &wirepb.Stats{
		BytesChanged: s.BytesChanged,
		BytesZero:    s.BytesZero,
		BytesSame:    s.BytesSame,
		BytesData:    s.BytesData,
		BytesSent:    s.BytesSent,
		DurationNs:   int64(s.Duration),
		BytesDedup:   s.BytesDedup,
	}
}

func statsFromPB(s *wirepb.Stats) lifeboat.CycleStats {
	if s == nil {
		return lifeboat.CycleStats{}
	}
	return lifeboat.CycleStats{
		BytesChanged: s.BytesChanged,
		BytesZero:    s.BytesZero,
		BytesSame:    s.BytesSame,
		BytesData:    s.BytesData,
		BytesSent:    s.BytesSent,
		Duration:     time.Duration(s.DurationNs),
		BytesDedup:   s.BytesDedup,
	}
}

func hashesToBytes(hs []lifeboat.Hash) []byte {
	out := make([]byte, 0, len(hs)*len(lifeboat.Hash{}))
	for _, h := range hs {
		out = append(out, h[:]...)
	}
	return out
}

func hashesFromBytes(b []byte) ([]lifeboat.Hash, error) {
	const n = len(lifeboat.Hash{})
	if len(b)%n != 0 {
		return nil, fmt.Errorf("hash list of %d bytes is not a multiple of %d", len(b), n)
	}
	out := make([]lifeboat.Hash, len(b)/n)
	for i := range out {
		copy(out[i][:], b[i*n:])
	}
	return out, nil
}

package daemon

import (
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// An export of a disk that the point does not hold, because the disk was
// removed from the VM (or added) since, says which point holds it and the
// command to type; a disk no point holds gets the list of the point's disks.
func TestExportOfADiskThePointLacks(t *testing.T) {
	at := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	point := func(id uint64, disks ...string) lifeboat.Point {
		p := lifeboat.Point{VM: "vm1", ID: id, Instant: at.Add(time.Duration(id) * time.Minute)}
		for _, d := range disks {
			p.Disks = append(p.Disks, lifeboat.PointDisk{Name: d})
		}
		return p
	}
	pts := []lifeboat.Point{point(1, "vda", "vdb"), point(2, "vda", "vdb"), point(3, "vda"), point(4, "vda", "vdc")}
	for _, tc := range []struct {
		point uint64
		disk  string
		want  string
	}{
		{4, "vdb", "point 2 (2026-12-07T10:02:00Z) is the last before it to hold disk \"vdb\" (the disk was removed from the VM since): `lifeboat export vm1 --point 2 --disk vdb -o /tmp/b.raw`"},
		{1, "vdc", "point 4 (2026-12-07T10:04:00Z) is the first to hold disk \"vdc\" (the disk was added to the VM later): `lifeboat export vm1 --point 4 --disk vdc -o /tmp/b.raw`"},
		{3, "vdz", `vm "vm1" point 3 has no disk "vdz"; its disks are: vda (e.g. ` + "`lifeboat export vm1 --point 3 --disk vda -o /tmp/b.raw`)"},
	} {
		pt := pts[tc.point-1]
		req := ExportRequest{Point: tc.point, Disk: tc.disk, Out: "/tmp/b.raw"}
		_, err := exportDisk("vm1", pt, req)
		if err == nil {
			t.Fatalf("point %d: export of disk %s found it", tc.point, tc.disk)
		}
		err = heldElsewhere(err, "vm1", pt, pts, req)
		if !strings.HasSuffix(err.Error(), tc.want) {
			t.Fatalf("point %d disk %s:\n%v\nwant it to end with\n%s", tc.point, tc.disk, err, tc.want)
		}
	}
}

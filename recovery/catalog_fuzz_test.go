package recovery

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// FuzzCatalogRecords feeds arbitrary bytes, as a damaged catalog would hold
// them, to the paths that read the JSON records back: committed points
// (readPoints, readPoint, pointAt), pending points (readPending) and the
// merge intent (readIntent). The block records have their own codec and
// target. Properties: no panic; a record that reads back can be written back
// and reads the same again (a merge rewrites records it read). The seeds are
// records as the store writes them (json of the real types); they run in
// every `go test`.
func FuzzCatalogRecords(f *testing.F) {
	rec := pointRecord{
		Point: lifeboat.Point{VM: "vm1", ID: 7, Instant: time.Date(2026, 12, 1, 20, 0, 0, 5, time.UTC),
			Consistency: lifeboat.Filesystem, Group: "g",
			Disks:  []lifeboat.PointDisk{{Name: "vda", Size: 48 << 20, File: "vms/vm1/vda/7.qcow2", Resync: true}, {Name: "vdb", Size: 24 << 20, File: "vms/vm1/vdb/7.qcow2"}},
			Stats:  lifeboat.CycleStats{BytesChanged: 1 << 20, BytesData: 1 << 19, BytesZero: 1 << 19, BytesSent: 1000, Duration: time.Second},
			Freeze: time.Millisecond, Note: "agent timed out"},
		Parents: map[string]uint64{"vda": 6, "vdb": 0},
	}
	pend := pendingRecord{ID: 8, Files: []string{"vms/vm1/vda/8.qcow2"}, RunDir: "run/w123"}
	intent := mergeIntent{Drop: 6, Keep: 7, Disks: []mergeDisk{{Name: "vda", Into: "vms/vm1/vda/6.qcow2", From: "vms/vm1/vda/7.qcow2", Above: []string{"vms/vm1/vda/8.qcow2"}}},
		Done: true, Remove: []string{"vms/vm1/vda/7.qcow2"}}
	mj := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	f.Add(mj(rec), mj(pend), mj(intent))
	f.Add([]byte(`{"point":{"id":7,"instant":"2026-12-01T20:00:00+01:00"},"parents":null}`), []byte(`{}`), []byte(`null`))
	f.Add([]byte(`{"point":{"id":7,"instant":"10000-01-01T00:00:00Z"}}`), []byte(`[]`), []byte(`{"drop":7,"keep":7}`))

	db, err := bolt.Open(filepath.Join(f.TempDir(), "catalog.db"), 0o600, &bolt.Options{Timeout: 2 * time.Second, NoSync: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { db.Close() })
	s := &Store{dir: "/srv/lifeboat"}
	rollback := errors.New("rollback")
	f.Fuzz(func(t *testing.T, point, pending, intent []byte) {
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := vmBucketCreate(tx, "vm1")
			if err != nil {
				t.Fatal(err)
			}
			must := func(err error) {
				if err != nil {
					t.Fatal(err)
				}
			}
			must(b.Bucket(bucketPoints).Put(idKey(7), point))
			must(b.Bucket(bucketPending).Put(idKey(8), pending))
			if len(intent) > 0 {
				must(b.Bucket(bucketMerge).Put(keyIntent, intent))
			}
			listVMs(tx)
			_, _ = readPending(tx, "vm1")
			_, _ = readIntent(tx, "vm1")
			if pts, err := readPoints(tx, "vm1"); err == nil {
				for _, r := range pts {
					s.public(r)
				}
			}
			_, _ = pointAt(tx, "vm1", 0)
			r, ok, err := readPoint(tx, "vm1", 7)
			if err != nil || !ok {
				return rollback
			}
			r.disk("vda")
			// What reads back can be written back, and reads the same.
			r.Point.ID = 9
			if err := putPoint(b, r); err != nil {
				return rollback // not writable (e.g. a time json cannot hold): refused, not a panic
			}
			again, ok, err := readPoint(tx, "vm1", 9)
			if err != nil || !ok {
				t.Fatalf("a point record written back does not read again: %v", err)
			}
			b1, _ := json.Marshal(r)
			b2, _ := json.Marshal(again)
			if string(b1) != string(b2) {
				t.Fatalf("a point record written back reads differently:\n%s\n%s", b1, b2)
			}
			return rollback
		})
		if !errors.Is(err, rollback) {
			t.Fatal(err)
		}
	})
}

package recovery

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// The catalog (dir/catalog.db) holds, under vms/<vm>/:
//
//	points/<id>        committed points (pointRecord, JSON)
//	blocks/<id><disk>  what point id wrote to disk (encodeBlockRecord)
//	pending/<id>       a point being written (pendingRecord): discarded on Open
//	merge/intent       a retention merge under way (mergeIntent): finished on Open
//
// Keys of ids are big-endian so a cursor walks points oldest first.
var (
	bucketVMs     = []byte("vms")
	bucketPoints  = []byte("points")
	bucketBlocks  = []byte("blocks")
	bucketPending = []byte("pending")
	bucketMerge   = []byte("merge")
	keyIntent     = []byte("intent")
)

// pointRecord is a committed point as the catalog keeps it. File names are
// relative to the store's directory.
type pointRecord struct {
	Point lifeboat.Point `json:"point"`
	// Parents names, per disk, the point whose image backs this point's image
	// (0: the image is a base). A disk's block map is the fold along it.
	Parents map[string]uint64 `json:"parents"`
}

func (r *pointRecord) disk(name string) (lifeboat.PointDisk, bool) {
	for _, d := range r.Point.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return lifeboat.PointDisk{}, false
}

// pendingRecord is a point being written; everything it lists is deleted when
// the store reopens without it having been committed.
type pendingRecord struct {
	ID uint64 `json:"id"`
	// Files are the images created for the point, relative to the store's directory.
	Files []string `json:"files"`
	// RunDir holds the writing daemon's sockets and pid file.
	RunDir string `json:"run_dir"`
}

// mergeIntent is a retention merge of point Drop into point Keep (the next one)
// recorded before any image is touched, so a crash at any step is finished on Open.
type mergeIntent struct {
	Drop uint64 `json:"drop"`
	Keep uint64 `json:"keep"`
	// Disks are the disks of Keep whose image is backed by Drop's: their data is
	// committed into Drop's image, which then becomes Keep's.
	Disks []mergeDisk `json:"disks"`
	// Done is set in the catalog transaction that drops the point; only the
	// file deletions remain after it.
	Done bool `json:"done"`
	// Remove are the files to delete once Done (relative to the store's directory).
	Remove []string `json:"remove"`
}

type mergeDisk struct {
	Name string `json:"name"`
	// Into is Drop's image, which receives Keep's data and becomes Keep's image.
	Into string `json:"into"`
	// From is Keep's own image, deleted at the end.
	From string `json:"from"`
	// Above are images of the point after Keep backed by From, rebased onto Into.
	Above []string `json:"above,omitempty"`
}

func idKey(id uint64) []byte { return binary.BigEndian.AppendUint64(nil, id) }

func blocksKey(id uint64, disk string) []byte { return append(idKey(id), disk...) }

// vmBucket returns the VM's bucket, or nil when the catalog has never seen it.
func vmBucket(tx *bolt.Tx, vm string) *bolt.Bucket {
	root := tx.Bucket(bucketVMs)
	if root == nil {
		return nil
	}
	return root.Bucket([]byte(vm))
}

// vmBucketCreate returns the VM's bucket with all its sub-buckets, creating them.
func vmBucketCreate(tx *bolt.Tx, vm string) (*bolt.Bucket, error) {
	root, err := tx.CreateBucketIfNotExists(bucketVMs)
	if err != nil {
		return nil, err
	}
	b, err := root.CreateBucketIfNotExists([]byte(vm))
	if err != nil {
		return nil, err
	}
	for _, name := range [][]byte{bucketPoints, bucketBlocks, bucketPending, bucketMerge} {
		if _, err := b.CreateBucketIfNotExists(name); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func sub(b *bolt.Bucket, name []byte) *bolt.Bucket {
	if b == nil {
		return nil
	}
	return b.Bucket(name)
}

// readPoints returns the VM's committed points, oldest first. A point that a
// recorded merge is dropping is left out: it no longer reads as it did.
func readPoints(tx *bolt.Tx, vm string) ([]pointRecord, error) {
	b := vmBucket(tx, vm)
	pts := sub(b, bucketPoints)
	if pts == nil {
		return nil, nil
	}
	intent, err := readIntent(tx, vm)
	if err != nil {
		return nil, err
	}
	var out []pointRecord
	err = pts.ForEach(func(k, v []byte) error {
		var r pointRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("vm %q: catalog record of point %x is corrupt: %w", vm, k, err)
		}
		if intent != nil && r.Point.ID == intent.Drop {
			return nil
		}
		out = append(out, r)
		return nil
	})
	return out, err
}

func readPoint(tx *bolt.Tx, vm string, id uint64) (pointRecord, bool, error) {
	b := sub(vmBucket(tx, vm), bucketPoints)
	if b == nil {
		return pointRecord{}, false, nil
	}
	v := b.Get(idKey(id))
	if v == nil {
		return pointRecord{}, false, nil
	}
	var r pointRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return r, false, fmt.Errorf("vm %q: catalog record of point %d is corrupt: %w", vm, id, err)
	}
	return r, true, nil
}

func putPoint(b *bolt.Bucket, r pointRecord) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return b.Bucket(bucketPoints).Put(idKey(r.Point.ID), v)
}

func readIntent(tx *bolt.Tx, vm string) (*mergeIntent, error) {
	b := sub(vmBucket(tx, vm), bucketMerge)
	if b == nil {
		return nil, nil
	}
	v := b.Get(keyIntent)
	if v == nil {
		return nil, nil
	}
	var m mergeIntent
	if err := json.Unmarshal(v, &m); err != nil {
		return nil, fmt.Errorf("vm %q: catalog merge intent is corrupt: %w", vm, err)
	}
	return &m, nil
}

func putIntent(b *bolt.Bucket, m *mergeIntent) error {
	v, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return b.Bucket(bucketMerge).Put(keyIntent, v)
}

func readPending(tx *bolt.Tx, vm string) ([]pendingRecord, error) {
	var out []pendingRecord
	b := sub(vmBucket(tx, vm), bucketPending)
	if b == nil {
		return nil, nil
	}
	err := b.ForEach(func(k, v []byte) error {
		var p pendingRecord
		if err := json.Unmarshal(v, &p); err != nil {
			return fmt.Errorf("vm %q: catalog record of pending point %x is corrupt: %w", vm, k, err)
		}
		out = append(out, p)
		return nil
	})
	return out, err
}

// listVMs returns every VM the catalog has a bucket for.
func listVMs(tx *bolt.Tx) []string {
	var out []string
	root := tx.Bucket(bucketVMs)
	if root == nil {
		return nil
	}
	_ = root.ForEach(func(k, v []byte) error {
		if v == nil {
			out = append(out, string(k))
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// foldBlocks builds the block map of disk at point id: the records from the
// disk's base up to id, later wins, dropping blocks a size change made unknown.
func foldBlocks(tx *bolt.Tx, vm, disk string, id uint64) (blockRecord, error) {
	// Walk down to the base, then apply upwards.
	type step struct {
		id   uint64
		size int64
	}
	var chain []step
	for cur := id; cur != 0; {
		r, ok, err := readPoint(tx, vm, cur)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("vm %q disk %q: point %d in the chain is missing from the catalog: %w", vm, disk, cur, errCatalog)
		}
		d, ok := r.disk(disk)
		if !ok {
			return nil, fmt.Errorf("vm %q point %d has no disk %q: %w", vm, cur, disk, ErrNoDisk)
		}
		chain = append(chain, step{cur, d.Size})
		next := r.Parents[disk]
		if next >= cur {
			return nil, fmt.Errorf("vm %q disk %q: point %d names a later parent %d: %w", vm, disk, cur, next, errCatalog)
		}
		cur = next
	}
	blocks := sub(vmBucket(tx, vm), bucketBlocks)
	if blocks == nil {
		return nil, fmt.Errorf("vm %q: no block records in the catalog: %w", vm, errCatalog)
	}
	m := blockRecord{}
	for i := len(chain) - 1; i >= 0; i-- {
		if i < len(chain)-1 {
			keepOnResize(m, chain[i+1].size, chain[i].size)
		}
		if err := decodeBlockRecord(blocks.Get(blocksKey(chain[i].id, disk)), m); err != nil {
			return nil, fmt.Errorf("vm %q disk %q point %d: %w", vm, disk, chain[i].id, err)
		}
	}
	return m, nil
}

// errCatalog marks a catalog that contradicts itself.
var errCatalog = errors.New("the catalog is inconsistent; restore it from a backup of the recovery site or re-seed the VM")

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, data)
}

package recovery

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// The catalog (dir/catalog.db) holds, under vms/<vm>/:
//
//	points/<id>        committed points (pointRecord, JSON)
//	recs/<id><disk>    block records (blockrec.go), named by pointRecord.Records
//	pending/<id>       a point being written (pendingRecord): discarded on Open
//	merge/intent       a retention merge under way (mergeIntent): finished on Open
//
// Keys of ids are big-endian so a cursor walks points oldest first. Catalogs
// of lifeboat before bounded records kept one value per record under
// blocks/<id><disk>; Open migrates them (migrate.go).
var (
	bucketVMs     = []byte("vms")
	bucketPoints  = []byte("points")
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
	// Records names, per disk, the block record (recKey) of this point's
	// image, when it is not the point's own id: a retention merge hands the
	// merged point its parent's record along with its image.
	Records map[string]uint64 `json:"records,omitempty"`
}

// recordKey is the key of the block record of disk's image in this point.
func (r *pointRecord) recordKey(disk string) []byte {
	if id, ok := r.Records[disk]; ok {
		return recKey(id, disk)
	}
	return recKey(r.Point.ID, disk)
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
	for _, name := range [][]byte{bucketPoints, bucketRecs, bucketPending, bucketMerge} {
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

// namedFiles returns every image file the catalog names for vm (relative to
// the store): its committed points' (a recorded merge's dropped one too),
// its pending points' and its recorded merge's; nil when the catalog has
// never seen the VM.
func namedFiles(tx *bolt.Tx, vm string) (map[string]bool, error) {
	b := vmBucket(tx, vm)
	if b == nil {
		return nil, nil
	}
	named := map[string]bool{}
	if pts := b.Bucket(bucketPoints); pts != nil {
		err := pts.ForEach(func(k, v []byte) error {
			var r pointRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("vm %q: catalog record of point %x is corrupt: %w", vm, k, err)
			}
			for _, d := range r.Point.Disks {
				named[d.File] = true
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	pending, err := readPending(tx, vm)
	if err != nil {
		return nil, err
	}
	for _, p := range pending {
		for _, f := range p.Files {
			named[f] = true
		}
	}
	m, err := readIntent(tx, vm)
	if err != nil {
		return nil, err
	}
	if m != nil {
		for _, f := range m.Remove {
			named[f] = true
		}
		for _, d := range m.Disks {
			named[d.Into], named[d.From] = true, true
			for _, f := range d.Above {
				named[f] = true
			}
		}
	}
	return named, nil
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

// level is one point's record in the chain of a disk's block map.
type level struct {
	id  uint64
	rec record
	// limit: blocks from here on in this record are unknown at the top of the
	// chain (a size change above made them so); maxBlock when none did.
	limit int64
}

// walkChain calls fn for each point of disk's chain at point id, the point
// itself first and its base last, with the point's record of the disk.
func walkChain(tx *bolt.Tx, vm, disk string, id uint64, fn func(r *pointRecord, d lifeboat.PointDisk) error) error {
	for cur := id; cur != 0; {
		r, ok, err := readPoint(tx, vm, cur)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("vm %q disk %q: point %d in the chain is missing from the catalog: %w", vm, disk, cur, errCatalog)
		}
		d, ok := r.disk(disk)
		if !ok {
			return fmt.Errorf("vm %q point %d has no disk %q: %w", vm, cur, disk, ErrNoDisk)
		}
		if err := fn(&r, d); err != nil {
			return err
		}
		next := r.Parents[disk]
		if next >= cur {
			return fmt.Errorf("vm %q disk %q: point %d names a later parent %d: %w", vm, disk, cur, next, errCatalog)
		}
		cur = next
	}
	return nil
}

// chainOf returns the records that make up disk's block map at point id, the
// point's own first and its base last.
func chainOf(tx *bolt.Tx, vm, disk string, id uint64) ([]level, error) {
	recs := sub(vmBucket(tx, vm), bucketRecs)
	var chain []level
	limit, above := maxBlock, int64(-1)
	err := walkChain(tx, vm, disk, id, func(r *pointRecord, d lifeboat.PointDisk) error {
		if above >= 0 {
			if w := wholeBlocks(d.Size, above); w >= 0 {
				limit = min(limit, w)
			}
		}
		above = d.Size
		rec, ok := openRecord(recs, r.recordKey(disk))
		if !ok {
			return fmt.Errorf("vm %q disk %q: the block record of point %d is missing from the catalog: %w", vm, disk, r.Point.ID, errCatalog)
		}
		chain = append(chain, level{id: r.Point.ID, rec: rec, limit: limit})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return chain, nil
}

// chainFiles returns disk's images at point id and below it, newest first
// (paths relative to the store).
func chainFiles(tx *bolt.Tx, vm, disk string, id uint64) ([]string, error) {
	var files []string
	err := walkChain(tx, vm, disk, id, func(_ *pointRecord, d lifeboat.PointDisk) error {
		files = append(files, d.File)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return files, nil
}

// readFiles returns the images that disk's view at point id reads, newest
// first: its chain down to the first image that holds the disk whole
// (PointDisk.Whole), below which nothing is read.
func readFiles(tx *bolt.Tx, vm, disk string, id uint64) ([]string, error) {
	var files []string
	errWhole := errors.New("whole")
	err := walkChain(tx, vm, disk, id, func(_ *pointRecord, d lifeboat.PointDisk) error {
		files = append(files, d.File)
		if d.Whole {
			return errWhole
		}
		return nil
	})
	if err != nil && !errors.Is(err, errWhole) {
		return nil, err
	}
	return files, nil
}

// eachFolded calls fn for every data block of the block map the chain makes
// (newest record first; within one, in block order): a record's block counts
// unless a newer record says anything of it or a size change made it unknown.
// Zero runs are not reported: like never-written blocks they read as zeros.
func eachFolded(chain []level, fn func(b int64, h lifeboat.Hash) error) error {
	errStop := errors.New("past the limit")
	for i, lv := range chain {
		err := lv.rec.eachData(0, func(b int64, h lifeboat.Hash) error {
			if b >= lv.limit {
				return errStop // blocks are in order: the rest are unknown too
			}
			for _, newer := range chain[:i] {
				if has, err := newer.rec.has(b); err != nil || has {
					return err
				}
			}
			return fn(b, h)
		})
		if err != nil && !errors.Is(err, errStop) {
			return fmt.Errorf("block record of point %d: %w", lv.id, err)
		}
	}
	return nil
}

// unknownBlocks are the blocks of disk's block map at point id whose content
// a size change altered and that no record above the change wrote: the short
// last block of the smaller size, where the disk grew or shrank. No record's
// hash holds for them (the recorded block was shorter or longer), and they
// read as whatever the image below held there, with zeros past the cut. A
// block that a smaller size above cut off whole reads as zeros: not unknown.
func unknownBlocks(tx *bolt.Tx, vm, disk string, id uint64) (map[int64]bool, error) {
	recs := sub(vmBucket(tx, vm), bucketRecs)
	out := map[int64]bool{}
	var above []record                  // the records walked, newest first
	size, least := int64(-1), int64(-1) // the size of the point walked last, the least size walked
	err := walkChain(tx, vm, disk, id, func(r *pointRecord, d lifeboat.PointDisk) error {
		if size >= 0 && d.Size != size && min(d.Size, size)%lifeboat.BlockSize != 0 {
			b := min(d.Size, size) / lifeboat.BlockSize
			written := out[b] || b*lifeboat.BlockSize >= least
			for _, rec := range above {
				if written {
					break
				}
				has, err := rec.has(b)
				if err != nil {
					return err
				}
				written = has
			}
			if !written {
				out[b] = true
			}
		}
		size = d.Size
		if least < 0 || d.Size < least {
			least = d.Size
		}
		rec, ok := openRecord(recs, r.recordKey(disk))
		if !ok {
			return fmt.Errorf("vm %q disk %q: the block record of point %d is missing from the catalog: %w", vm, disk, r.Point.ID, errCatalog)
		}
		above = append(above, rec)
		return nil
	})
	return out, err
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

// errCatalogDamaged marks a catalog file that does not read as bbolt wrote it.
var errCatalogDamaged = errors.New("the catalog is damaged")

// openCatalog opens the catalog at path and checks it whole before anything
// reads it: bbolt trusts its file, and a damaged one made it panic, or fault
// on a read past the end of a truncated file (which no recover catches),
// taking the site down at every start. The check is a walk over every page
// (tx.Check): a catalog is bounded by the change each point recorded, so
// this costs a moment at a site's start.
func openCatalog(path string) (db *bolt.DB, err error) {
	if err := checkCatalogSize(path); err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				_ = db.Close()
			}
			db, err = nil, fmt.Errorf("%w: %v", errCatalogDamaged, r)
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", errCatalogDamaged, err)
	}
	err = db.View(func(tx *bolt.Tx) error {
		var errs []error
		for err := range tx.Check() {
			if len(errs) < 5 {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
	if err == nil {
		err = db.Update(func(tx *bolt.Tx) error {
			_, err := tx.CreateBucketIfNotExists(bucketVMs)
			return err
		})
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("%w: %w", errCatalogDamaged, err)
	}
	return db, nil
}

// checkCatalogSize checks that the catalog file holds every page its newest
// valid meta page counts: bbolt maps the file and read the pages of a
// truncated one past its end, a fault that kills the process. A file that is
// missing or empty is a new catalog, for bbolt to make.
func checkCatalogSize(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return err
	}
	le := binary.LittleEndian
	// meta reads the meta page at off: its page size, high water mark and txid.
	meta := func(off int64) (pageSize uint32, pgid, txid uint64, ok bool) {
		var p [16 + 64]byte
		if _, err := f.ReadAt(p[:], off); err != nil {
			return 0, 0, 0, false
		}
		m := p[16:]
		h := fnv.New64a()
		h.Write(m[:56])
		if le.Uint32(m[0:]) != 0xED0CDAED || le.Uint32(m[4:]) != 2 || le.Uint64(m[56:]) != h.Sum64() {
			return 0, 0, 0, false
		}
		return le.Uint32(m[8:]), le.Uint64(m[40:]), le.Uint64(m[48:]), true
	}
	ps0, pg0, tx0, ok0 := meta(0)
	off1 := int64(4096)
	if ok0 {
		off1 = int64(ps0)
	}
	ps1, pg1, tx1, ok1 := meta(off1)
	ps, pgid := ps0, pg0
	switch {
	case ok1 && (!ok0 || tx1 > tx0):
		ps, pgid = ps1, pg1
	case !ok0:
		return fmt.Errorf("%w: neither meta page is valid (%d-byte file)", errCatalogDamaged, st.Size())
	}
	if need := int64(pgid) * int64(ps); need > st.Size() || ps < 512 {
		return fmt.Errorf("%w: the file is %d bytes, cut short of the %d its %d pages of %d bytes need", errCatalogDamaged, st.Size(), need, pgid, ps)
	}
	return nil
}

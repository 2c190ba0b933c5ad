package recovery

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// A block record is what points wrote to one disk, kept in the catalog as a
// bucket (recs/<record id><disk>) of two sub-buckets, so that neither memory
// nor a single value grows with the disk:
//
//	d/<block>  the 32-byte content hash of a block written with data
//	z/<first>  the block after the last of a run of blocks written as zeros
//
// Blocks are 8-byte big-endian indexes, so cursors walk them in order. The
// zero runs never overlap and never hold a block that d holds: writing a block
// takes it out of the runs, zeroing a run deletes the data blocks it covers.
// A block in neither reads as zeros, unless a resize made it unknown.
var (
	bucketRecs     = []byte("recs")
	bucketRecData  = []byte("d")
	bucketRecZeros = []byte("z")
)

// maxBlock bounds block indexes read back from the catalog: 2^47 blocks of
// 64 KiB is far past any disk QEMU can have.
const maxBlock = int64(1) << 47

func blockKey(b int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(b)) }

// decodeBlockKey reads a block index back from the catalog.
func decodeBlockKey(k []byte) (int64, error) {
	if len(k) != 8 {
		return 0, fmt.Errorf("block key of %d bytes, want 8", len(k))
	}
	b := binary.BigEndian.Uint64(k)
	if b >= uint64(maxBlock) {
		return 0, fmt.Errorf("block index %d is impossible", b)
	}
	return int64(b), nil
}

// decodeDataEntry reads a d/ entry back from the catalog.
func decodeDataEntry(k, v []byte) (int64, lifeboat.Hash, error) {
	var h lifeboat.Hash
	b, err := decodeBlockKey(k)
	if err != nil {
		return 0, h, err
	}
	if len(v) != len(h) {
		return 0, h, fmt.Errorf("block %d: hash of %d bytes, want %d", b, len(v), len(h))
	}
	copy(h[:], v)
	if h.IsZero() {
		return 0, h, fmt.Errorf("block %d: a data entry holds the zero marker", b)
	}
	return b, h, nil
}

// decodeZeroEntry reads a z/ entry back from the catalog: the run [lo, hi).
func decodeZeroEntry(k, v []byte) (lo, hi int64, err error) {
	if lo, err = decodeBlockKey(k); err != nil {
		return 0, 0, err
	}
	if hi, err = decodeBlockKey(v); err != nil {
		return 0, 0, fmt.Errorf("zero run at block %d: %w", lo, err)
	}
	if hi <= lo {
		return 0, 0, fmt.Errorf("zero run [%d, %d) is empty or reversed", lo, hi)
	}
	return lo, hi, nil
}

// recKey names a record bucket: the id of the point that started it, and the
// disk. A retention merge hands the merged point its parent's record by naming
// it (pointRecord.Records), so the key outlives the point in it.
func recKey(id uint64, disk string) []byte { return append(idKey(id), disk...) }

// record is one disk's block record in a transaction.
type record struct {
	d, z *bolt.Bucket
}

// openRecord returns the record under key, or ok false when there is none.
func openRecord(recs *bolt.Bucket, key []byte) (record, bool) {
	if recs == nil {
		return record{}, false
	}
	b := recs.Bucket(key)
	if b == nil {
		return record{}, false
	}
	r := record{d: b.Bucket(bucketRecData), z: b.Bucket(bucketRecZeros)}
	return r, r.d != nil && r.z != nil
}

// createRecord returns the record under key, creating an empty one.
func createRecord(recs *bolt.Bucket, key []byte) (record, error) {
	b, err := recs.CreateBucketIfNotExists(key)
	if err != nil {
		return record{}, err
	}
	var r record
	if r.d, err = b.CreateBucketIfNotExists(bucketRecData); err != nil {
		return r, err
	}
	r.z, err = b.CreateBucketIfNotExists(bucketRecZeros)
	return r, err
}

// deleteRecords deletes every record bucket whose key starts with prefix.
func deleteRecords(recs *bolt.Bucket, prefix []byte) error {
	if recs == nil {
		return nil
	}
	var keys [][]byte
	c := recs.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if v == nil {
			keys = append(keys, slices.Clone(k))
		}
	}
	for _, k := range keys {
		if err := recs.DeleteBucket(k); err != nil {
			return err
		}
	}
	return nil
}

// data returns block b's hash when the record holds it as data.
func (r record) data(b int64) (lifeboat.Hash, bool, error) {
	v := r.d.Get(blockKey(b))
	if v == nil {
		return lifeboat.Hash{}, false, nil
	}
	_, h, err := decodeDataEntry(blockKey(b), v)
	return h, err == nil, err
}

// zeroRun returns the zero run holding block b, if any.
func (r record) zeroRun(b int64) (lo, hi int64, ok bool, err error) {
	k, v := floor(r.z.Cursor(), blockKey(b))
	if k == nil {
		return 0, 0, false, nil
	}
	if lo, hi, err = decodeZeroEntry(k, v); err != nil {
		return 0, 0, false, err
	}
	return lo, hi, lo <= b && b < hi, nil
}

// floor positions c on the last key <= key and returns it (nil: none).
func floor(c *bolt.Cursor, key []byte) ([]byte, []byte) {
	k, v := c.Seek(key)
	if k != nil && bytes.Equal(k, key) {
		return k, v
	}
	return below(c, key)
}

// below positions c on the last key < key and returns it (nil: none).
func below(c *bolt.Cursor, key []byte) ([]byte, []byte) {
	if k, _ := c.Seek(key); k == nil {
		return c.Last()
	}
	return c.Prev()
}

// has reports whether the record says anything of block b (data or zeros).
func (r record) has(b int64) (bool, error) {
	if r.d.Get(blockKey(b)) != nil {
		return true, nil
	}
	_, _, ok, err := r.zeroRun(b)
	return ok, err
}

// putData records block b as data with hash h, taking it out of any zero run.
func (r record) putData(b int64, h lifeboat.Hash) error {
	if err := r.punch(b); err != nil {
		return err
	}
	return r.d.Put(blockKey(b), h[:])
}

// punch takes block b out of the zero run holding it.
func (r record) punch(b int64) error {
	lo, hi, ok, err := r.zeroRun(b)
	if err != nil || !ok {
		return err
	}
	if err := r.z.Delete(blockKey(lo)); err != nil {
		return err
	}
	if lo < b {
		if err := r.z.Put(blockKey(lo), blockKey(b)); err != nil {
			return err
		}
	}
	if b+1 < hi {
		return r.z.Put(blockKey(b+1), blockKey(hi))
	}
	return nil
}

// putZeros records [lo, hi) as zeros: the data blocks in it are deleted and
// the run joins the runs it overlaps or touches. The work is the entries it
// replaces, not the run's length.
func (r record) putZeros(lo, hi int64) error {
	if hi <= lo {
		return nil
	}
	if err := deleteKeys(r.d, lo, hi); err != nil {
		return err
	}
	var del [][]byte
	c := r.z.Cursor()
	if pk, pv := below(c, blockKey(lo)); pk != nil {
		plo, phi, err := decodeZeroEntry(pk, pv)
		if err != nil {
			return err
		}
		if phi >= lo {
			lo, hi = plo, max(hi, phi)
			del = append(del, slices.Clone(pk))
		}
	}
	for k, v := c.Seek(blockKey(lo)); k != nil; k, v = c.Next() {
		klo, khi, err := decodeZeroEntry(k, v)
		if err != nil {
			return err
		}
		if klo > hi {
			break
		}
		hi = max(hi, khi)
		del = append(del, slices.Clone(k))
	}
	for _, k := range del {
		if err := r.z.Delete(k); err != nil {
			return err
		}
	}
	return r.z.Put(blockKey(lo), blockKey(hi))
}

// deleteKeys deletes the block keys of b in [lo, hi).
func deleteKeys(b *bolt.Bucket, lo, hi int64) error {
	var del [][]byte
	c := b.Cursor()
	end := blockKey(hi)
	for k, _ := c.Seek(blockKey(lo)); k != nil && bytes.Compare(k, end) < 0; k, _ = c.Next() {
		del = append(del, slices.Clone(k))
	}
	for _, k := range del {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// cut forgets every block from limit on: what a size change leaves unknown.
func (r record) cut(limit int64) error {
	if err := deleteKeys(r.d, limit, maxBlock); err != nil {
		return err
	}
	lo, _, ok, err := r.zeroRun(limit)
	if err != nil {
		return err
	}
	if err := deleteKeys(r.z, limit, maxBlock); err != nil {
		return err
	}
	if ok && lo < limit {
		return r.z.Put(blockKey(lo), blockKey(limit))
	}
	return nil
}

// eachData calls fn for every data block of the record, in order, from block from on.
func (r record) eachData(from int64, fn func(b int64, h lifeboat.Hash) error) error {
	c := r.d.Cursor()
	for k, v := c.Seek(blockKey(from)); k != nil; k, v = c.Next() {
		b, h, err := decodeDataEntry(k, v)
		if err != nil {
			return err
		}
		if err := fn(b, h); err != nil {
			return err
		}
	}
	return nil
}

// eachZeros calls fn for every zero run of the record, in order.
func (r record) eachZeros(fn func(lo, hi int64) error) error {
	c := r.z.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		lo, hi, err := decodeZeroEntry(k, v)
		if err != nil {
			return err
		}
		if err := fn(lo, hi); err != nil {
			return err
		}
	}
	return nil
}

// covers reports whether the record holds every one of a disk's n blocks,
// as data or in a zero run (the two never overlap: putData punches a run,
// putZeros deletes the data in it).
func (r record) covers(n int64) (bool, error) {
	var got int64
	c := r.d.Cursor() // Stats would miss what this transaction put
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		got++
	}
	err := r.eachZeros(func(lo, hi int64) error {
		got += min(hi, n) - min(lo, n)
		return nil
	})
	return got >= n, err
}

// entries counts the record's data blocks and zero runs.
func (r record) entries() (data, zeros int) {
	return r.d.Stats().KeyN, r.z.Stats().KeyN
}

// wholeBlocks is the number of blocks whose content a size change from old to
// size leaves alone: a block survives only when it lies wholly inside both
// sizes (a short last block grows a zero tail, or loses bytes). -1: no change.
func wholeBlocks(old, size int64) int64 {
	if old == size {
		return -1
	}
	return min(old, size) / lifeboat.BlockSize
}

// blockCount is the number of grid blocks of a disk of size bytes (the last one
// may be short).
func blockCount(size int64) int64 {
	return (size + lifeboat.BlockSize - 1) / lifeboat.BlockSize
}

// pendingBatch is what a writer has recorded for one disk and not yet put in
// the catalog. Zeroing a run deletes the batch's data blocks in it, so that
// applying the zero runs first and the data after keeps the last write.
type pendingBatch struct {
	data  map[int64]lifeboat.Hash
	zeros [][2]int64
}

func (p *pendingBatch) len() int { return len(p.data) + len(p.zeros) }

func (p *pendingBatch) putData(b int64, h lifeboat.Hash) {
	if p.data == nil {
		p.data = map[int64]lifeboat.Hash{}
	}
	p.data[b] = h
}

func (p *pendingBatch) putZeros(lo, hi int64) {
	if hi-lo < int64(len(p.data)) {
		for b := lo; b < hi; b++ {
			delete(p.data, b)
		}
	} else {
		for b := range p.data {
			if lo <= b && b < hi {
				delete(p.data, b)
			}
		}
	}
	p.zeros = append(p.zeros, [2]int64{lo, hi})
}

// apply puts the batch into r and empties it.
func (p *pendingBatch) apply(r record) error {
	for _, z := range p.zeros {
		if err := r.putZeros(z[0], z[1]); err != nil {
			return err
		}
	}
	blocks := make([]int64, 0, len(p.data))
	for b := range p.data {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks) // bbolt fills pages best in key order
	for _, b := range blocks {
		if err := r.putData(b, p.data[b]); err != nil {
			return err
		}
	}
	*p = pendingBatch{}
	return nil
}

package recovery

import (
	"encoding/binary"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
)

// bucketBlocks held, before bounded records, one value per (point, disk): the
// whole record encoded as below. Open moves them into record buckets.
var bucketBlocks = []byte("blocks")

// recordVersion1 is the first byte of a record of the old format.
const recordVersion1 = 1

// decodeBlockRecordV1 unpacks an old record: sorted entries of
// uvarint((gap << 1) | zero) followed by the 32-byte hash unless zero, where
// gap is the distance to the previous index minus one. fn gets each block in
// order; h is lifeboat.ZeroHash for a block written as zeros.
func decodeBlockRecordV1(b []byte, fn func(i int64, h lifeboat.Hash) error) error {
	if len(b) == 0 {
		return nil
	}
	if b[0] != recordVersion1 {
		return fmt.Errorf("block record version %d is not known to this lifeboat (want %d): upgrade lifeboat", b[0], recordVersion1)
	}
	b = b[1:]
	prev := int64(-1)
	for len(b) > 0 {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return fmt.Errorf("block record is corrupt after block %d: bad varint", prev)
		}
		b = b[n:]
		gap := v >> 1
		if gap > 1<<40 || prev+1+int64(gap) >= maxBlock {
			return fmt.Errorf("block record is corrupt after block %d: gap %d is impossible", prev, gap)
		}
		i := prev + 1 + int64(gap)
		var h lifeboat.Hash
		if v&1 == 0 {
			if len(b) < len(h) {
				return fmt.Errorf("block record is corrupt at block %d: hash cut short", i)
			}
			copy(h[:], b)
			b = b[len(h):]
			if h.IsZero() {
				return fmt.Errorf("block record is corrupt at block %d: a data block holds the zero marker", i)
			}
		}
		if err := fn(i, h); err != nil {
			return err
		}
		prev = i
	}
	return nil
}

// migrateRecords moves every VM's old-format records into record buckets, one
// transaction per VM (a crash in between leaves the rest for the next Open).
// Each old record is read one at a time, as it was written.
func (s *Store) migrateRecords() error {
	var vms []string
	if err := s.db.View(func(tx *bolt.Tx) error { vms = listVMs(tx); return nil }); err != nil {
		return err
	}
	for _, vm := range vms {
		n := 0
		err := s.db.Update(func(tx *bolt.Tx) error {
			b := vmBucket(tx, vm)
			old := b.Bucket(bucketBlocks)
			if old == nil {
				return nil
			}
			recs, err := b.CreateBucketIfNotExists(bucketRecs)
			if err != nil {
				return err
			}
			err = old.ForEach(func(k, v []byte) error {
				if len(k) <= 8 {
					return fmt.Errorf("old block record key %x names no disk: %w", k, errCatalog)
				}
				rec, err := createRecord(recs, slices.Clone(k))
				if err != nil {
					return err
				}
				run := [2]int64{-1, -1}
				err = decodeBlockRecordV1(v, func(i int64, h lifeboat.Hash) error {
					if !h.IsZero() {
						return rec.d.Put(blockKey(i), h[:])
					}
					if i == run[1] {
						run[1]++
						return nil
					}
					if run[0] >= 0 {
						if err := rec.z.Put(blockKey(run[0]), blockKey(run[1])); err != nil {
							return err
						}
					}
					run = [2]int64{i, i + 1}
					return nil
				})
				if err != nil {
					return fmt.Errorf("old block record of point %d disk %q: %w", binary.BigEndian.Uint64(k), k[8:], err)
				}
				if run[0] >= 0 {
					if err := rec.z.Put(blockKey(run[0]), blockKey(run[1])); err != nil {
						return err
					}
				}
				n++
				return nil
			})
			if err != nil {
				return err
			}
			return b.DeleteBucket(bucketBlocks)
		})
		if err != nil {
			return fmt.Errorf("vm %q: migrating the catalog's block records to the bounded format (the old catalog is untouched; run a lifeboat of the old version, or restore catalog.db from a backup): %w", vm, err)
		}
		if n > 0 {
			s.log.Info("migrated block records to the bounded format", "vm", vm, "records", n)
		}
	}
	return nil
}

package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// BeginSpec describes a point about to be written.
type BeginSpec struct {
	VM          string
	ID          uint64 // must be > the latest point's id
	Instant     time.Time
	Consistency lifeboat.Consistency
	Group       string
	Freeze      time.Duration
	Note        string
	// Site is the protected site writing the point, as its certificate names
	// it: it must own the VM (the first site to commit a point of a VM owns it).
	Site  string
	Disks []DiskSpec // every disk of the VM in this point
	// Definition is how to start the VM as it was at this point (nil: the
	// protected site sent none).
	Definition *lifeboat.Definition
}

// DiskSpec is one disk of a point being written. A disk the previous point
// lacks starts a fresh base image; any other gets an overlay of Size over the
// previous point's image (so a grown or shrunk disk just gets an overlay of its
// new size). Resync marks a full or hash resync of the disk: still an overlay,
// and blocks not sent are unchanged.
type DiskSpec struct {
	Name   string
	Size   int64
	Resync bool
	// Lineage, Base, BaseGeneration and Generation are the disk's history
	// (lifeboat.PointDisk): the delta must continue the latest point.
	Lineage        string
	Base           uint64
	BaseGeneration string
	Generation     string
	// Seed, for Adopt only: an image (absolute path) that already holds the
	// disk's content at this point; the point's image is an overlay over it.
	Seed string
}

// HashMismatchError is returned by WriteBlocks when a block's bytes do not match
// the hash sent with them; nothing of that call was written.
type HashMismatchError struct {
	VM     string
	Disk   string
	Offset int64
}

func (e *HashMismatchError) Error() string {
	return fmt.Sprintf("vm %q disk %q: block at offset %d does not match its hash: nothing of this write was stored; the sender must resend it (data corrupted in transit or at the source)", e.VM, e.Disk, e.Offset)
}

// Writer writes one point. WriteBlocks and WriteZeroes are safe for concurrent
// use; Commit or Abort ends it.
type Writer struct {
	s    *Store
	spec BeginSpec
	rec  pendingRecord
	// began is when Begin was asked, by this site's clock: after the
	// point's instant, whatever the protected site's clock says of it.
	began time.Time
	// frequent: this point came within spareIdle of the VM's last commit,
	// so its commit makes the next point's writer ahead (see spare).
	frequent bool
	// The daemon's layout (see spare): each disk's index, the node below
	// its top, and how many points the daemon went on from.
	index   map[string]int
	below   map[string]string
	carried int
	parents map[string]uint64
	// damaged are the disks whose chain below the new image holds an image
	// cut short since it was written (qemu.CheckQcow2End): the point reads
	// zeros where it was cut unless it holds the disk whole, and is not
	// committed otherwise.
	damaged map[string]error
	disks   map[string]*writeDisk
	daemon  *qemu.Daemon

	endMu sync.Mutex // serializes Commit and Abort

	mu       sync.Mutex
	closing  bool           // Commit or Abort has begun: no new writes
	ended    bool           // committed or aborted
	failed   error          // a write failed: the point cannot be committed
	inflight sync.WaitGroup // writes between their checks and their record

	copyMu sync.Mutex
	copies map[copySource]copied // blocks read back for copies (CopyBlock)
}

// A point's copies often name one source many times (a disk full of one
// pattern, a template's repeated blocks): the blocks read back for copies
// are kept, at most copiesKept of them, so that such a source is read once.
// Each is checked against its hash again when written, as every block is.
// `make bench`'s RPO run starts with the initial sync of two 4 GiB disks
// full of one pattern: 32 s before, 27 s with it (one run each).
const copiesKept = 128

type copySource struct {
	disk   string
	off    int64
	length int
}

type copied struct {
	h    lifeboat.Hash
	data []byte // never written to once kept
}

type writeDisk struct {
	spec   DiskSpec
	file   string // relative to the store
	client *nbd.Client

	// mu guards pend, what this point recorded for the disk and not yet put
	// in the catalog (the record bucket recs/<id><disk>), and the flushes.
	mu   sync.Mutex
	pend pendingBatch

	patches atomic.Int64 // blocks written as patches: the image is not whole (lifeboat.PointDisk.Whole)
	touched atomic.Int64 // blocks written as data or zeros, a block written twice counted twice
}

// nbdOptions is how the writer and the verifier talk to their daemon:
// base:allocation lets them ask which blocks of the chain hold data.
var nbdOptions = nbd.Options{Connections: 4, MaxInFlight: 16, MetaContexts: []string{nbd.ContextBaseAllocation}}

// flushEntries is how many record entries a disk's writer holds before it
// puts them in the catalog (about 60 bytes each in memory): a point's record
// is bounded in memory whatever the disk's size.
var flushEntries = 1 << 15

// zeroProbe is the length from which WriteZeroes asks the chain which blocks
// hold data and zeroes only those: shorter runs are zeroed at once.
const zeroProbe = 16 * lifeboat.BlockSize

// Begin starts point spec.ID of spec.VM: it records the point as pending (so a
// crash is cleaned up on Open), creates an image per disk, starts a
// qemu-storage-daemon exporting them writable over NBD and connects to it. Only
// one point per VM is written at a time; Begin waits for the previous one as
// long as ctx allows.
func (s *Store) Begin(ctx context.Context, spec BeginSpec) (_ *Writer, err error) {
	if err := checkSpec(spec); err != nil {
		return nil, err
	}
	began := time.Now()
	l := s.vmLock(spec.VM)
	if err := l.lockWriter(ctx, spec.VM); err != nil {
		return nil, err
	}
	// The writer made ahead for this point, if there is one (see spare).
	sp, err := s.takeSpare(ctx, spec.VM)
	if err != nil {
		l.unlockWriter()
		return nil, err
	}
	// The shape, while the chain is read from the catalog and opened: a
	// retention merge may run beside the writer, but not rewrite what this
	// reads (see vmLock). A spare has its chain open: the catalog
	// transaction below checks it still fits, and a merge's own is atomic.
	unlockShape := func() {}
	defer func() { unlockShape() }()
	lockShape := func() error {
		unlockShape, err = l.lockShape(ctx, spec.VM)
		if err != nil {
			unlockShape = func() {}
		}
		return err
	}
	if sp == nil {
		if err := lockShape(); err != nil {
			l.unlockWriter()
			return nil, err
		}
	}
	w := &Writer{
		s:       s,
		spec:    spec,
		began:   began,
		parents: map[string]uint64{},
		disks:   map[string]*writeDisk{},
		rec:     pendingRecord{ID: spec.ID},
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.unlockWriter()
		if sp != nil {
			s.discardSpare(sp)
		}
		return nil, errors.New("recovery store is closed")
	}
	s.writers[w] = struct{}{}
	if t, ok := s.lastCommit[spec.VM]; ok && time.Since(t) < spareIdle {
		w.frequent = true
	}
	s.mu.Unlock()
	defer func() {
		if err != nil {
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			if aerr := w.Abort(actx); aerr != nil {
				err = errors.Join(err, aerr)
			}
			cancel()
		}
	}()
	// Setting up holds endMu, so that a Store.Close meanwhile (which aborts
	// every writer) waits for it instead of racing it; released before the
	// abort above runs.
	w.endMu.Lock()
	defer w.endMu.Unlock()

	if w.rec.RunDir, err = s.runDir(); err != nil {
		return nil, err
	}
	// Plan each disk's image and its backing, then record it all as pending
	// before any file exists; with the spare if it fits the chain.
	var (
		useSpare = sp != nil
		backing  map[string]string
		chains   map[string][]string // each disk's committed images below its new one, newest first
		reads    map[string][]string // those of them the new image reads through (readFiles)
		damaged  map[string]error    // checkChains of reads
		rec      pendingRecord
	)
	record := func(tx *bolt.Tx) error {
		backing, chains, rec, reads = map[string]string{}, map[string][]string{}, w.rec, map[string][]string{}
		w.disks, w.parents = map[string]*writeDisk{}, map[string]uint64{}
		var latest *pointRecord
		if pts, err := readPoints(tx, spec.VM); err != nil {
			return err
		} else if len(pts) > 0 {
			latest = &pts[len(pts)-1]
		}
		if err := s.authorize(tx, spec.VM, spec.Site); err != nil {
			return err
		}
		if latest != nil && spec.ID <= latest.Point.ID {
			return fmt.Errorf("vm %q: point id %d is not after the latest point %d: ids must grow", spec.VM, spec.ID, latest.Point.ID)
		}
		if err := checkLineage(spec, latest); err != nil {
			return err
		}
		if useSpare {
			if !sp.fits(spec, latest) {
				return errSpareUnfit
			}
			rec.RunDir = sp.runDir
		}
		for _, d := range spec.Disks {
			wd := &writeDisk{spec: d, file: imageRel(spec.VM, d.Name, spec.ID)}
			w.disks[d.Name] = wd
			rec.Files = append(rec.Files, wd.file)
			if latest != nil {
				if prev, ok := latest.disk(d.Name); ok {
					if d.Seed != "" {
						return fmt.Errorf("vm %q disk %q: point %d holds it already, so no image can be adopted for it", spec.VM, d.Name, latest.Point.ID)
					}
					backing[d.Name] = s.abs(prev.File)
					w.parents[d.Name] = latest.Point.ID
					files, err := chainFiles(tx, spec.VM, d.Name, latest.Point.ID)
					if err != nil {
						return err
					}
					for _, f := range files {
						chains[d.Name] = append(chains[d.Name], s.abs(f))
					}
					if files, err = readFiles(tx, spec.VM, d.Name, latest.Point.ID); err != nil {
						return err
					}
					for _, f := range files {
						reads[d.Name] = append(reads[d.Name], s.abs(f))
					}
				}
			}
			if d.Seed != "" {
				backing[d.Name] = d.Seed
			}
		}
		b, err := vmBucketCreate(tx, spec.VM)
		if err != nil {
			return err
		}
		// Records of an earlier attempt at this id that a crash left behind.
		recs := b.Bucket(bucketRecs)
		if err := deleteRecords(recs, idKey(spec.ID)); err != nil {
			return err
		}
		for _, d := range spec.Disks {
			if _, err := createRecord(recs, recKey(spec.ID, d.Name)); err != nil {
				return err
			}
		}
		// The images the new one reads, checked within this transaction:
		// a merge deletes an image only after its own catalog transaction
		// (a writer made ahead holds no shape).
		damaged = checkChains(reads)
		for _, d := range spec.Disks {
			if err := damaged[d.Name]; err != nil && !errors.Is(err, qemu.ErrTruncated) {
				// Deleted, or no longer a qcow2 image: no point can be
				// written above it, not even one that holds the disk whole.
				return unreadableChain{fmt.Errorf("vm %q point %d disk %q: the chain it would be written above cannot be read: %w; nothing is written. A failover or export can take an earlier point whose chain does not hold that image (`lifeboat points %s`); to replicate the VM again, `lifeboat forget %s --yes` here deletes its points, and its protected site then sends it whole", spec.VM, spec.ID, d.Name, err, spec.VM, spec.VM)}
			}
		}
		return putJSON(b.Bucket(bucketPending), idKey(spec.ID), rec)
	}
	err = s.db.Update(record)
	if errors.Is(err, errSpareUnfit) {
		s.log.Info("the writer made ahead does not fit the chain any more; making another", "vm", spec.VM, "point", spec.ID, "made_above", sp.parent)
		useSpare = false
		s.discardSpare(sp)
		if err = lockShape(); err == nil {
			err = s.db.Update(record)
		}
	}
	if err != nil {
		if useSpare {
			s.discardSpare(sp)
		}
		var uc unreadableChain
		if errors.As(err, &uc) {
			return nil, uc.error
		}
		return nil, fmt.Errorf("vm %q point %d: recording the point as pending: %w", spec.VM, spec.ID, err)
	}
	fresh := w.rec.RunDir
	w.rec = rec // only now may an abort delete the files it names
	w.damaged = damaged
	if useSpare {
		os.RemoveAll(fresh)
		err := w.adoptSpare(sp)
		s.discardSpare(sp) // what the writer did not take
		if err != nil {
			return nil, err
		}
	}

	if !useSpare {
		if err := s.openWriter(ctx, w, backing, chains); err != nil {
			return nil, err
		}
	}
	for _, d := range spec.Disks {
		c, err := dialExport(ctx, w.daemon, d.Name, d.Size)
		if err != nil {
			return nil, fmt.Errorf("vm %q point %d: %w", spec.VM, spec.ID, err)
		}
		w.disks[d.Name].client = c
	}
	s.log.Info("writing restore point", "vm", spec.VM, "point", spec.ID, "disks", len(spec.Disks),
		"made_ahead", useSpare, "took", time.Since(began).Round(time.Millisecond))
	return w, nil
}

// openWriter creates the images of w's point, each above the image that
// backing names for its disk (or an image to adopt, or nothing), and starts
// the daemon that writes them with every disk's chain open below (chains:
// the committed images, newest first). Begin without a writer made ahead.
func (s *Store) openWriter(ctx context.Context, w *Writer, backing map[string]string, chains map[string][]string) error {
	spec := w.spec
	names := make([]string, len(spec.Disks))
	files := make([]string, len(spec.Disks))
	below := make([][]string, len(spec.Disks))
	w.index, w.below = map[string]int{}, map[string]string{}
	for i, d := range spec.Disks {
		path := s.abs(w.disks[d.Name].file)
		if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
			return fmt.Errorf("vm %q disk %q: %w", spec.VM, d.Name, err)
		}
		bfmt := ""
		if backing[d.Name] != "" {
			bfmt = "qcow2"
		}
		if d.Seed != "" {
			info, err := qemu.ReadImageInfo(ctx, d.Seed)
			if err != nil {
				return fmt.Errorf("vm %q disk %q: the image to adopt: %w", spec.VM, d.Name, err)
			}
			if info.VirtualSize != d.Size {
				return fmt.Errorf("vm %q disk %q: the image to adopt, %s, is %d bytes, not the disk's %d", spec.VM, d.Name, d.Seed, info.VirtualSize, d.Size)
			}
			bfmt = info.Format
		}
		if err := s.createPointImage(ctx, path, d.Size, backing[d.Name], bfmt); err != nil {
			return fmt.Errorf("vm %q disk %q: creating the image of point %d: %w", spec.VM, d.Name, spec.ID, err)
		}
		names[i], files[i], below[i] = d.Name, path, chains[d.Name]
		w.index[d.Name] = i
		if c := chains[d.Name]; len(c) > 0 {
			w.below[d.Name] = chainNode(i, c[0])
		}
	}
	var err error
	if w.daemon, err = s.startDaemon(ctx, s.abs(w.rec.RunDir), names, files, below, true); err != nil {
		return fmt.Errorf("vm %q point %d: %w", spec.VM, spec.ID, err)
	}
	return nil
}

func checkSpec(spec BeginSpec) error {
	if err := checkName("vm", spec.VM); err != nil {
		return err
	}
	if spec.ID == 0 {
		return fmt.Errorf("vm %q: point id 0 is reserved (it means \"latest\"): number points from 1", spec.VM)
	}
	if len(spec.Disks) == 0 {
		return fmt.Errorf("vm %q point %d has no disks", spec.VM, spec.ID)
	}
	seen := map[string]bool{}
	for _, d := range spec.Disks {
		if err := checkName("disk", d.Name); err != nil {
			return fmt.Errorf("vm %q: %w", spec.VM, err)
		}
		if seen[d.Name] {
			return fmt.Errorf("vm %q point %d names disk %q twice", spec.VM, spec.ID, d.Name)
		}
		seen[d.Name] = true
		if d.Size <= 0 || d.Size%512 != 0 {
			return fmt.Errorf("vm %q disk %q: size %d is not a disk size (a positive multiple of 512 bytes)", spec.VM, d.Name, d.Size)
		}
		if d.Seed != "" && !filepath.IsAbs(d.Seed) {
			return fmt.Errorf("vm %q disk %q: the image to adopt, %s, is not an absolute path", spec.VM, d.Name, d.Seed)
		}
	}
	return nil
}

// ID is the point being written.
func (w *Writer) ID() uint64 { return w.spec.ID }

// disk returns the named disk for a write, which must call w.inflight.Done.
func (w *Writer) disk(name string) (*writeDisk, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended || w.closing {
		return nil, fmt.Errorf("vm %q point %d is already committed or aborted", w.spec.VM, w.spec.ID)
	}
	if w.failed != nil {
		return nil, fmt.Errorf("vm %q point %d: an earlier write failed, abort the point: %w", w.spec.VM, w.spec.ID, w.failed)
	}
	d, ok := w.disks[name]
	if !ok {
		return nil, fmt.Errorf("vm %q point %d has no disk %q: %w", w.spec.VM, w.spec.ID, name, ErrNoDisk)
	}
	w.inflight.Add(1)
	return d, nil
}

// drain waits, as long as ctx allows, for the writes already past their checks.
func (w *Writer) drain(ctx context.Context) error {
	done := make(chan struct{})
	go func() { w.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("vm %q point %d: writes still in flight: %w", w.spec.VM, w.spec.ID, ctx.Err())
	}
}

// fail records that a write failed: the point is now unfit to commit.
func (w *Writer) fail(err error) error {
	err = w.s.full(err)
	w.mu.Lock()
	if w.failed == nil {
		w.failed = err
	}
	w.mu.Unlock()
	return err
}

// checkRange checks that [off, off+length) is on the block grid of the disk:
// block aligned, a whole number of blocks except where it ends at the disk's end.
func (w *Writer) checkRange(d *writeDisk, off, length int64) error {
	size := d.spec.Size
	switch {
	case off < 0 || length <= 0 || off+length > size:
		return fmt.Errorf("vm %q disk %q: range [%d, %d) is outside the disk (size %d)", w.spec.VM, d.spec.Name, off, off+length, size)
	case off%lifeboat.BlockSize != 0:
		return fmt.Errorf("vm %q disk %q: offset %d is not on the %d-byte block grid", w.spec.VM, d.spec.Name, off, lifeboat.BlockSize)
	case length%lifeboat.BlockSize != 0 && off+length != size:
		return fmt.Errorf("vm %q disk %q: length %d at offset %d is not whole blocks and does not end at the disk's end (%d)", w.spec.VM, d.spec.Name, length, off, size)
	}
	return nil
}

// WriteBlocks writes data at off after checking hashes[i] == HashBlock(block i)
// for every block of it. off is block aligned and len(data) whole blocks,
// except for a range ending at the disk's end. A mismatch returns a
// *HashMismatchError and writes nothing of the call.
func (w *Writer) WriteBlocks(ctx context.Context, disk string, off int64, data []byte, hashes []lifeboat.Hash) error {
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	defer w.inflight.Done()
	if err := w.checkRange(d, off, int64(len(data))); err != nil {
		return err
	}
	if n := blockCount(int64(len(data))); int64(len(hashes)) != n {
		return fmt.Errorf("vm %q disk %q: %d hashes for %d blocks at offset %d", w.spec.VM, disk, len(hashes), n, off)
	}
	if lo := lifeboat.Mismatch(data, hashes); lo >= 0 {
		return &HashMismatchError{VM: w.spec.VM, Disk: disk, Offset: off + lo}
	}
	return w.writeChecked(ctx, d, off, data, hashes)
}

// WritePatch writes the changed parts of the block at off: the sub-blocks of
// dirty, whose bytes are data one range after another, after checking data
// against sum. The rest of the block is what the chain below holds, the
// point's base, which the delta was computed from (Begin checked its
// lineage); h is the whole block's hash, recorded as written. A mismatch
// returns a *HashMismatchError and writes nothing.
func (w *Writer) WritePatch(ctx context.Context, disk string, off int64, dirty lifeboat.Dirty, data []byte, sum, h lifeboat.Hash) error {
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	defer w.inflight.Done()
	n := min(lifeboat.BlockSize, d.spec.Size-off)
	if err := w.checkRange(d, off, n); err != nil {
		return err
	}
	parts, err := dirty.Split(int(n), data)
	if err != nil {
		return fmt.Errorf("vm %q disk %q offset %d: %w", w.spec.VM, disk, off, err)
	}
	if lifeboat.HashBlock(data) != sum {
		return &HashMismatchError{VM: w.spec.VM, Disk: disk, Offset: off}
	}
	for _, p := range parts {
		if err := d.client.Write(ctx, p.Data, off+p.Off, false); err != nil {
			return w.fail(fmt.Errorf("vm %q disk %q: writing %d bytes at offset %d: %w", w.spec.VM, disk, len(p.Data), off+p.Off, err))
		}
	}
	d.patches.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pend.putData(off/lifeboat.BlockSize, h)
	return w.flushFull(d)
}

// writeChecked writes blocks already checked against their hashes and
// records them, within the count of w.inflight that the caller took.
func (w *Writer) writeChecked(ctx context.Context, d *writeDisk, off int64, data []byte, hashes []lifeboat.Hash) error {
	disk := d.spec.Name
	if err := d.client.Write(ctx, data, off, false); err != nil {
		return w.fail(fmt.Errorf("vm %q disk %q: writing %d bytes at offset %d: %w", w.spec.VM, disk, len(data), off, err))
	}
	// Record after the write: a block is in the record only once its bytes
	// went to the image. Concurrent writes of one block are the caller's race.
	first := off / lifeboat.BlockSize
	d.touched.Add(int64(len(hashes)))
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, h := range hashes {
		d.pend.putData(first+int64(i), h)
	}
	return w.flushFull(d)
}

// flushFull puts d's pending entries in the catalog once there are enough of
// them. d.mu is held.
func (w *Writer) flushFull(d *writeDisk) error {
	if d.pend.len() < flushEntries {
		return nil
	}
	err := w.s.db.Update(func(tx *bolt.Tx) error {
		rec, ok := openRecord(sub(vmBucket(tx, w.spec.VM), bucketRecs), recKey(w.spec.ID, d.spec.Name))
		if !ok {
			return fmt.Errorf("the record of the point being written is gone: %w", errCatalog)
		}
		return d.pend.apply(rec)
	})
	if err != nil {
		return w.fail(fmt.Errorf("vm %q disk %q point %d: putting the block record in the catalog: %w", w.spec.VM, d.spec.Name, w.spec.ID, err))
	}
	return nil
}

// written returns the hash this point recorded for block b of d, if any
// (lifeboat.ZeroHash for zeros).
func (w *Writer) written(d *writeDisk, b int64) (lifeboat.Hash, bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if h, ok := d.pend.data[b]; ok {
		return h, true, nil
	}
	for _, z := range slices.Backward(d.pend.zeros) {
		if z[0] <= b && b < z[1] {
			return lifeboat.ZeroHash, true, nil
		}
	}
	var (
		h  lifeboat.Hash
		ok bool
	)
	err := w.s.db.View(func(tx *bolt.Tx) error {
		rec, found := openRecord(sub(vmBucket(tx, w.spec.VM), bucketRecs), recKey(w.spec.ID, d.spec.Name))
		if !found {
			return fmt.Errorf("the record of the point being written is gone: %w", errCatalog)
		}
		var err error
		if h, ok, err = rec.data(b); err != nil || ok {
			return err
		}
		_, _, ok, err = rec.zeroRun(b)
		return err
	})
	return h, ok, err
}

// ErrSourcePending is returned (wrapped) by CopyBlock when the source block has
// not been written in this point yet.
var ErrSourcePending = lifeboat.ErrSourcePending

// CopyBlock writes at (disk, off) one block of length bytes with the content this
// point already wrote at (srcDisk, srcOff): deduplication within a point. The
// bytes are read back from the new image and checked against h before they are
// written, like every other block.
func (w *Writer) CopyBlock(ctx context.Context, disk string, off int64, srcDisk string, srcOff int64, length int, h lifeboat.Hash) error {
	src, err := w.disk(srcDisk)
	if err != nil {
		return err
	}
	defer w.inflight.Done()
	if srcOff%lifeboat.BlockSize != 0 || length <= 0 || length > lifeboat.BlockSize || srcOff+int64(length) > src.spec.Size {
		return fmt.Errorf("vm %q disk %q: copy source %d+%d is not a block of disk %q", w.spec.VM, disk, srcOff, length, srcDisk)
	}
	have, ok, err := w.written(src, srcOff/lifeboat.BlockSize)
	if err != nil {
		return fmt.Errorf("vm %q disk %q point %d: looking up the copy source: %w", w.spec.VM, srcDisk, w.spec.ID, err)
	}
	if !ok {
		return fmt.Errorf("vm %q disk %q offset %d: %w", w.spec.VM, srcDisk, srcOff, ErrSourcePending)
	}
	if have != h {
		return &HashMismatchError{VM: w.spec.VM, Disk: srcDisk, Offset: srcOff}
	}
	key := copySource{srcDisk, srcOff, length}
	w.copyMu.Lock()
	c, ok := w.copies[key]
	w.copyMu.Unlock()
	if ok && c.h == h {
		// c.data was checked against h when it was first written, and a
		// kept buffer is never written again: hashing it once more for every
		// copy (a disk full of one pattern is thousands of copies of one
		// block) would check nothing new.
		dst, err := w.disk(disk)
		if err != nil {
			return err
		}
		defer w.inflight.Done()
		if err := w.checkRange(dst, off, int64(len(c.data))); err != nil {
			return err
		}
		return w.writeChecked(ctx, dst, off, c.data, []lifeboat.Hash{h})
	}
	bp := bufpool.Shared.Get(int(length)) // read into whole before it is hashed
	buf := *bp
	if err := src.client.Read(ctx, buf, srcOff); err != nil {
		bufpool.Shared.Put(bp)
		return w.fail(fmt.Errorf("vm %q disk %q: reading back the copy source at offset %d: %w", w.spec.VM, srcDisk, srcOff, err))
	}
	if err := w.WriteBlocks(ctx, disk, off, buf, []lifeboat.Hash{h}); err != nil {
		bufpool.Shared.Put(bp)
		return err
	}
	// Checked and written: keep it for the next copy of this source. A kept
	// buffer is not given back to the pool (a copy may be reading it when it
	// is dropped); the garbage collector takes it.
	w.copyMu.Lock()
	if w.copies == nil || len(w.copies) >= copiesKept {
		w.copies = make(map[copySource]copied, copiesKept)
	}
	w.copies[key] = copied{h, buf}
	w.copyMu.Unlock()
	return nil
}

// WriteZeroes makes [off, off+length) read as zeros (block aligned, except at
// the disk's end) and records it as one zero run. A long run asks the chain
// which of its blocks hold data and zeroes only those: the others read as
// zeros already, and zeroing them would only make qcow2 write metadata (a
// 4 TiB write-zeroes on a 16 TiB overlay writes 512 MiB of L2 tables).
func (w *Writer) WriteZeroes(ctx context.Context, disk string, off, length int64) error {
	d, err := w.disk(disk)
	if err != nil {
		return err
	}
	defer w.inflight.Done()
	if err := w.checkRange(d, off, length); err != nil {
		return err
	}
	if err := w.zeroData(ctx, d, off, length); err != nil {
		return w.fail(fmt.Errorf("vm %q disk %q: zeroing %d bytes at offset %d: %w", w.spec.VM, disk, length, off, err))
	}
	first, n := off/lifeboat.BlockSize, blockCount(length)
	d.touched.Add(n)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pend.putZeros(first, first+n)
	return w.flushFull(d)
}

// zeroData zeroes what reads as data in [off, off+length). No NO_HOLE flag:
// qcow2 may mark the clusters zero rather than write them, which also hides
// the backing image's data, as it must.
func (w *Writer) zeroData(ctx context.Context, d *writeDisk, off, length int64) error {
	if length < zeroProbe {
		return d.client.WriteZeroes(ctx, off, length, 0)
	}
	end := off + length
	return d.client.BlockStatus(ctx, nbd.ContextBaseAllocation, off, length, func(e nbd.Extent) error {
		if e.Flags&nbd.StateZero != 0 {
			return nil
		}
		lo, hi := max(e.Offset, off), min(e.Offset+e.Length, end)
		if hi <= lo {
			return nil
		}
		return d.client.WriteZeroes(ctx, lo, hi-lo, 0)
	})
}

// Commit waits for the writes already under way, flushes every disk, stops the
// writing daemon cleanly and commits the point with its stats and block
// records in one catalog transaction: only then is it listed. It then applies
// retention to the VM (synchronously) before returning; a retention failure is
// logged, not returned, since the point is committed. A Commit that fails
// leaves the writer to Abort.
func (w *Writer) Commit(ctx context.Context, stats lifeboat.CycleStats) (lifeboat.Point, error) {
	w.endMu.Lock()
	defer w.endMu.Unlock()
	vm, id := w.spec.VM, w.spec.ID
	w.mu.Lock()
	ended := w.ended
	w.closing = true
	w.mu.Unlock()
	if ended {
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d is already committed or aborted", vm, id)
	}
	start := time.Now()
	if err := w.drain(ctx); err != nil {
		return lifeboat.Point{}, err
	}
	w.mu.Lock()
	failed := w.failed
	w.mu.Unlock()
	if failed != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d cannot be committed: a write failed, abort it and send the point again: %w", vm, id, failed)
	}
	for _, d := range w.disks {
		if err := d.client.Flush(ctx); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q disk %q: flushing point %d: %w", vm, d.spec.Name, id, err)
		}
	}
	flushed := time.Now()
	for _, d := range w.disks {
		d.client.Close()
	}
	// Closing the images writes their metadata and releases their locks for
	// retention's commit: a clean quit of the daemon, or, where it goes on
	// to the next point (see maxCarry), deleting their nodes.
	carry := w.frequent && w.carried < maxCarry && w.s.roomToCarry(w)
	// A daemon that went on holds the chain of many points, and the images
	// that merges deleted meanwhile: its quit took 1.8–4 s in `make bench`'s
	// RPO run at 40 MB/s. Once the point's images are closed it holds only
	// read-only nodes, so it stops after the commit, in the background.
	stopLater := !carry && w.carried > 0
	if carry || stopLater {
		if err := w.closeTops(ctx); err != nil {
			w.s.log.Warn("closing the point's images in the writer's daemon failed; stopping it", "vm", vm, "point", id, "err", err)
			carry, stopLater = false, false
		}
	}
	if !carry && !stopLater {
		if err := w.daemon.Stop(ctx); err != nil {
			return lifeboat.Point{}, fmt.Errorf("vm %q point %d: stopping the writing daemon: %w", vm, id, err)
		}
	}
	closed := time.Now()
	if err := w.s.syncFiles(w.rec.Files); err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d: %w", vm, id, err)
	}
	if err := w.s.syncDirs(w.rec.Files); err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d: %w", vm, id, err)
	}

	r := pointRecord{
		Point: lifeboat.Point{
			VM: vm, ID: id, Instant: w.spec.Instant, LocalInstant: localInstant(w.spec.Instant, w.began, stats.Duration),
			Consistency: w.spec.Consistency, Group: w.spec.Group,
			Site: w.spec.Site, Stats: stats, Freeze: w.spec.Freeze, Note: w.spec.Note,
			Definition: w.spec.Definition,
		},
		Parents: w.parents,
	}
	if r.Point.Consistency == "" {
		r.Point.Consistency = lifeboat.Crash
	}
	for _, ds := range w.spec.Disks {
		d := w.disks[ds.Name]
		r.Point.Disks = append(r.Point.Disks, lifeboat.PointDisk{Name: ds.Name, Size: ds.Size, File: d.file, Resync: ds.Resync,
			Lineage: ds.Lineage, Base: ds.Base, BaseGeneration: ds.BaseGeneration, Generation: ds.Generation})
	}
	if testHookCatalog != nil {
		testHookCatalog()
	}
	err := w.s.db.Update(func(tx *bolt.Tx) error {
		b, err := vmBucketCreate(tx, vm)
		if err != nil {
			return err
		}
		if b.Bucket(bucketPending).Get(idKey(id)) == nil {
			return fmt.Errorf("its pending record is gone: %w", errCatalog)
		}
		if err := w.s.authorize(tx, vm, w.spec.Site); err != nil {
			return err // handed over while the point was written
		}
		if err := claim(tx, b, vm, w.spec.Site, time.Now()); err != nil {
			return err
		}
		for name, d := range w.disks {
			rec, ok := openRecord(b.Bucket(bucketRecs), recKey(id, name))
			if !ok {
				return fmt.Errorf("the block record of disk %q is gone: %w", name, errCatalog)
			}
			d.mu.Lock()
			err := d.pend.apply(rec)
			d.mu.Unlock()
			if err != nil {
				return err
			}
			// Whole only when no patch was written, and, counted exactly
			// (a cursor over the record), only when the writes' count could be.
			n := blockCount(d.spec.Size)
			whole := false
			if w.parents[name] != 0 && d.patches.Load() == 0 && d.touched.Load() >= n {
				if whole, err = rec.covers(n); err != nil {
					return err
				}
			}
			if parent, ok, err := readPoint(tx, vm, w.parents[name]); err != nil {
				return err
			} else if m := parent.Point.Damaged; ok && m != nil && m.Disk == name && m.Missing == "" {
				// The point below reads a block a verify found damaged:
				// so does this one, unless it wrote the block.
				if has, err := rec.has(m.Offset / lifeboat.BlockSize); err != nil {
					return err
				} else if !has {
					inherit := *m
					r.Point.Damaged = &inherit
				}
			}
			if derr := w.damaged[name]; derr != nil && !whole {
				return fmt.Errorf("disk %q: %w; this point would read zeros where it was cut, and every later point after it, so it is not committed: `lifeboat sync %s --whole` at its protected site sends the disk whole, which repairs the replica (a failover or export can take an earlier point whose chain does not hold that image: `lifeboat points %s`)", name, derr, vm, vm)
			}
			if !whole {
				continue
			}
			for i := range r.Point.Disks {
				if r.Point.Disks[i].Name == name {
					r.Point.Disks[i].Whole = whole
				}
			}
		}
		if err := putPoint(b, r); err != nil {
			return err
		}
		return b.Bucket(bucketPending).Delete(idKey(id))
	})
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("vm %q point %d: committing to the catalog: %w", vm, id, err)
	}
	w.end()
	var from *spare
	if carry {
		from = &spare{vm: vm, parent: id, runDir: w.rec.RunDir, daemon: w.daemon, index: w.index, below: w.below,
			carried: w.carried + 1, files: map[string]string{}}
		for name, d := range w.disks {
			from.files[name] = d.file
		}
	} else if stopLater {
		w.s.stopLater(w.daemon, vm, id, w.rec.RunDir)
	} else {
		_ = os.RemoveAll(w.s.abs(w.rec.RunDir))
	}
	w.s.log.Info("restore point committed", "vm", vm, "point", id, "bytes_data", stats.BytesData, "bytes_zero", stats.BytesZero,
		"took", time.Since(start).Round(time.Millisecond), "flush", flushed.Sub(start).Round(time.Millisecond),
		"close", closed.Sub(flushed).Round(time.Millisecond), "daemon_goes_on", carry)

	w.s.mu.Lock()
	w.s.lastCommit[vm] = time.Now()
	w.s.mu.Unlock()
	if w.frequent {
		w.s.prepareSpare(vm, from)
	}
	w.s.retainLater(vm)
	return w.s.public(r), nil
}

// Abort stops the writing daemon, deletes the point's images and removes its
// pending record. It is idempotent, and what Open does for a point left
// pending by a crash.
func (w *Writer) Abort(ctx context.Context) error {
	w.endMu.Lock()
	defer w.endMu.Unlock()
	w.mu.Lock()
	ended := w.ended
	w.closing = true
	w.mu.Unlock()
	if ended {
		return nil
	}
	// Closing the clients ends the writes in flight, which the wait then sees out.
	for _, d := range w.disks {
		if d.client != nil {
			d.client.Close()
		}
	}
	var errs []error
	if err := w.drain(ctx); err != nil {
		errs = append(errs, err)
	}
	if w.daemon != nil {
		// The point is thrown away: no need for a clean quit.
		errs = append(errs, w.daemon.Kill())
	}
	if err := w.s.discardPending(ctx, w.spec.VM, w.rec); err != nil {
		errs = append(errs, err)
	}
	w.end()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vm %q: aborting point %d: %w", w.spec.VM, w.spec.ID, err)
	}
	w.s.log.Info("restore point aborted", "vm", w.spec.VM, "point", w.spec.ID)
	return nil
}

// end marks the writer ended and releases the VM for the next writer. w.endMu is held.
func (w *Writer) end() {
	w.mu.Lock()
	w.ended = true
	w.mu.Unlock()
	w.s.vmLock(w.spec.VM).unlockWriter()
	w.s.mu.Lock()
	delete(w.s.writers, w)
	w.s.mu.Unlock()
}

// unreadableChain is Begin's error when an image the new point would read
// is gone or no qcow2 image: it says all there is to say.
type unreadableChain struct{ error }

func (e unreadableChain) Unwrap() error { return e.error }

// checkChains checks the committed images each disk's new image reads
// through (newest first) for one cut short since it was written: a few reads per image. It
// returns the first such image's error of each disk that has one.
func checkChains(chains map[string][]string) map[string]error {
	out := map[string]error{}
	for disk, files := range chains {
		for _, f := range files {
			if err := qemu.CheckQcow2End(f); err != nil {
				out[disk] = err
				break
			}
		}
	}
	return out
}

// discardPending deletes what a pending point created, files first, so a crash
// in between leaves the record to finish the job on the next Open.
func (s *Store) discardPending(ctx context.Context, vm string, p pendingRecord) error {
	if err := qemu.KillLeftover(ctx, s.abs(p.RunDir)); err != nil {
		s.log.Warn("could not stop the daemon of an interrupted point", "vm", vm, "point", p.ID, "err", err)
	}
	if err := s.removeFiles(p.Files); err != nil {
		return err
	}
	if err := os.RemoveAll(s.abs(p.RunDir)); err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := sub(vmBucket(tx, vm), bucketPending)
		if b == nil || b.Get(idKey(p.ID)) == nil {
			return nil // not pending: its id may be a committed point's
		}
		if err := deleteRecords(sub(vmBucket(tx, vm), bucketRecs), idKey(p.ID)); err != nil {
			return err
		}
		return b.Delete(idKey(p.ID))
	})
}

// testHookSync, when set (by a test), is called before each image's
// fdatasync at commit, and its error taken as the fdatasync's.
var testHookSync func(rel string) error

// testHookCatalog, when set (by a test), is called just before a point's
// commit in the catalog.
var testHookCatalog func()

// syncFiles makes the point images rels durable (fdatasync), after the
// daemon that wrote them closed them: it writes them without flushes (see
// openImage), so this is where their data and metadata reach the disk.
func (s *Store) syncFiles(rels []string) error {
	for _, rel := range rels {
		f, err := os.Open(s.abs(rel))
		if err != nil {
			return fmt.Errorf("syncing %s: %w", rel, err)
		}
		if testHookSync != nil {
			err = testHookSync(rel)
		}
		if err == nil {
			err = syscall.Fdatasync(int(f.Fd()))
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return s.full(fmt.Errorf("syncing %s: %w", rel, err))
		}
	}
	return nil
}

// syncDirs makes the directory entries of new images durable before the
// catalog names them: each image's directory, and the directories above it
// up to the store's, which a VM's or a disk's first point created (a clean
// directory's fsync costs next to nothing).
func (s *Store) syncDirs(rels []string) error {
	seen := map[string]bool{}
	for _, rel := range rels {
		for dir := filepath.Dir(s.abs(rel)); !seen[dir]; dir = filepath.Dir(dir) {
			seen[dir] = true
			f, err := os.Open(dir)
			if err != nil {
				return err
			}
			err = f.Sync()
			f.Close()
			if err != nil {
				return fmt.Errorf("syncing directory %s: %w", dir, err)
			}
			if dir == filepath.Clean(s.dir) || dir == filepath.Dir(dir) {
				break
			}
		}
	}
	return nil
}

// closeTops removes every disk's export and closes its image in the
// writer's daemon, leaving the chain below open.
func (w *Writer) closeTops(ctx context.Context) error {
	for name, i := range w.index {
		if _, ok := w.disks[name]; !ok {
			return fmt.Errorf("disk %q is in the daemon but not in the point", name)
		}
		if err := w.daemon.Monitor().ExportDelForce(ctx, "e"+strconv.Itoa(i)); err != nil {
			return err
		}
		if err := w.daemon.Monitor().BlockdevDel(ctx, "d"+strconv.Itoa(i)); err != nil {
			return err
		}
	}
	return nil
}

// stopLater stops a writer's daemon that no longer holds an image open for
// writing, in the background (see inBackground), then deletes its runtime
// directory.
func (s *Store) stopLater(d *qemu.Daemon, vm string, point uint64, runDir string) {
	s.inBackground(func() {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := d.Stop(ctx); err != nil {
			s.log.Warn("stopping the daemon that wrote the VM's last points", "vm", vm, "point", point, "err", err)
		} else {
			s.log.Info("stopped the daemon that wrote the VM's last points", "vm", vm, "point", point, "took", time.Since(start).Round(time.Millisecond))
		}
		_ = os.RemoveAll(s.abs(runDir))
	})
}

// pointImageOpts are the qcow2 options of every image the store creates for
// a point. extended_l2 splits each 64 KiB cluster into 32 subclusters of
// 2 KiB with an allocation bit each: a write of part of a cluster that is new
// in the image (a patch's 4 KiB sub-blocks, a guest's small writes) then
// writes only its own bytes, where plain qcow2 first copies the rest of the
// cluster up from the chain below (a read of the backing file through
// O_DIRECT, then a 64 KiB write). 2800 4 KiB writes at 8 in flight into a new
// overlay of a 16 GiB disk, O_DIRECT, preallocate filter (qemu-img bench):
// 0.26–0.28 s plain, 0.07–0.09 s extended; whole-cluster writes are the same
// (0.13–0.15 s). Such images need QEMU 5.2 or later to open, at the recovery
// site only (a failover's overlay above them is plain).
var pointImageOpts = []string{"extended_l2=on"}

// createPointImage creates a point's image of size bytes above backing (none
// when ""), readable by its owner only: a replica is the VM's data (qemu-img
// makes 0644; a failover under libvirt lets QEMU's user pass the directories).
// A qemu-img that does not know pointImageOpts (QEMU older than 5.2) makes
// it plain, and every later one, with a warning once.
func (s *Store) createPointImage(ctx context.Context, path string, size int64, backing, backingFormat string) error {
	opts := pointImageOpts
	if s.plainImages.Load() {
		opts = nil
	}
	err := qemu.CreateImage(ctx, path, "qcow2", size, backing, backingFormat, opts...)
	if err != nil && len(opts) > 0 && strings.Contains(err.Error(), "extended_l2") {
		if !s.plainImages.Swap(true) {
			s.log.Warn("this QEMU cannot make qcow2 subclusters (5.2 or later can): new restore points are plain qcow2, slower to write in part and to merge", "err", err)
		}
		_ = os.Remove(path)
		err = qemu.CreateImage(ctx, path, "qcow2", size, backing, backingFormat)
	}
	if err != nil {
		return err
	}
	return os.Chmod(path, 0o600)
}

// localInstant places a point's instant, stamped by the protected site's
// clock, on this site's: the instant came before the cycle's Begin (began,
// here) and after the cycle's start, at most took (its Duration) before
// that. Within those bounds the instant is kept as it is; a clock minutes
// off puts it at the nearer bound.
func localInstant(instant, began time.Time, took time.Duration) time.Time {
	began = began.Round(0).UTC() // the wall clock's reading, as instants are
	if instant.After(began) {
		return began
	}
	if from := began.Add(-took); instant.Before(from) {
		return from
	}
	return instant
}

package recovery

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
)

// Forgotten is what Forget deleted.
type Forgotten struct {
	VM     string   `json:"vm"`
	Points []uint64 `json:"points"`
	Owner  string   `json:"owner,omitempty"` // the protected site that owned it
	Bytes  int64    `json:"bytes"`           // the size of the files deleted
}

// Forget deletes every restore point of vm with its images, block records and
// owner: a VM taken out of protection for good (its protected site should
// run `lifeboat unprotect` first, or its next cycle syncs it whole again, as
// a new VM of whichever site sends it first). It waits for a point being
// written, a merge, an export or a verify of the VM, as long as ctx allows,
// and refuses while a failover or test failover reads a point (a pin), while
// the VM is failed over here, and when its images read through one outside
// the store (the production disks of a VM protected in reverse). Its files
// are set aside, the catalog forgets, then they are deleted; Open finishes
// or undoes a forget a crash cut short (sweepForgotten).
func (s *Store) Forget(ctx context.Context, vm string) (Forgotten, error) {
	f := Forgotten{VM: vm}
	if err := checkName("VM", vm); err != nil {
		return f, err
	}
	// The chain before the writer slot, as a merge into the latest point
	// takes them (see runMerge): the other way round, each waits for the
	// other.
	unlock, err := s.lockChain(ctx, vm, true)
	if err != nil {
		return f, err
	}
	defer unlock()
	l := s.vmLock(vm)
	if err := l.lockWriter(ctx, vm); err != nil {
		return f, err
	}
	defer l.unlockWriter()
	unshape, err := l.lockShape(ctx, vm)
	if err != nil {
		return f, err
	}
	defer unshape()
	dir := s.abs(filepath.Join("vms", vm))
	if err := s.checkBackingsInside(ctx, vm, dir); err != nil {
		return f, err
	}
	known := false
	err = s.db.View(func(tx *bolt.Tx) error {
		if vmBucket(tx, vm) == nil {
			return nil
		}
		known = true
		pins, err := readPins(tx, vm)
		if err != nil {
			return err
		}
		if len(pins) > 0 {
			var names []string
			for name := range pins {
				names = append(names, name)
			}
			slices.Sort(names)
			return fmt.Errorf("vm %q: a failover or test failover reads its points (%s): stop it first (`lifeboat failover %s --undo` or `--test --stop`), then forget the VM", vm, strings.Join(names, ", "), vm)
		}
		o, owned, err := readOwner(tx, vm)
		if err != nil {
			return err
		}
		if owned && o.FailedOver {
			return fmt.Errorf("vm %q was failed over here from point %d: its points are the disks it runs on; forget it only once it no longer runs here", vm, o.FromPoint)
		}
		if owned {
			f.Owner = o.Site
		}
		pts, err := readPoints(tx, vm)
		if err != nil {
			return err
		}
		for _, p := range pts {
			f.Points = append(f.Points, p.Point.ID)
		}
		return nil
	})
	if err != nil {
		return f, err
	}
	// The files go aside first, the catalog forgets, then they are deleted:
	// Open puts them back after a crash before the catalog, and deletes them
	// after it (sweepForgotten), so no point is ever listed without its
	// files, and no file of a forgotten VM is left among a new one's.
	trash := s.abs(filepath.Join("vms", forgottenPrefix+vm+"-"+fmt.Sprintf("%08x", rand.Uint32())))
	if err := os.Rename(dir, trash); err != nil && !errors.Is(err, os.ErrNotExist) {
		return f, fmt.Errorf("vm %q: setting its files aside: %w", vm, err)
	} else if err != nil {
		trash = ""
	}
	if err := fsutil.SyncDir(s.abs("vms")); err != nil {
		return f, err
	}
	if err := s.forgetHook("aside"); err != nil {
		return f, err
	}
	if known {
		err = s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketVMs).DeleteBucket([]byte(vm)) })
		if err != nil {
			if trash != "" {
				if rerr := os.Rename(trash, dir); rerr != nil {
					err = fmt.Errorf("%w; and putting its files back from %s failed: %w (the site's next start does it)", err, trash, rerr)
				}
			}
			return f, fmt.Errorf("vm %q: forgetting its points in the catalog: %w", vm, err)
		}
	}
	s.mu.Lock()
	sp := s.spares[vm]
	delete(s.spares, vm)
	delete(s.lastCommit, vm)
	delete(s.retentionFailures, vm)
	s.mu.Unlock()
	if sp != nil {
		go func() { <-sp.ready; s.discardSpare(sp) }()
	}
	if err := s.forgetHook("cataloged"); err != nil {
		return f, err
	}
	if trash != "" {
		_ = filepath.WalkDir(trash, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				if fi, err := d.Info(); err == nil {
					f.Bytes += fi.Size()
				}
			}
			return nil
		})
		if err := os.RemoveAll(trash); err != nil {
			return f, fmt.Errorf("vm %q: its points are forgotten, but its files under %s could not all be deleted: %w (the site's next start deletes them)", vm, trash, err)
		}
	}
	if !known && f.Bytes == 0 {
		return f, fmt.Errorf("vm %q has no restore point at this site: %w", vm, ErrUnknownVM)
	}
	if err := fsutil.SyncDir(s.abs("vms")); err != nil {
		return f, err
	}
	s.log.Warn("vm forgotten: every restore point deleted", "vm", vm, "points", len(f.Points), "bytes", f.Bytes, "owner", f.Owner)
	return f, nil
}

// checkBackingsInside refuses a VM whose images read through an image
// outside dir, its directory in the store: the seed of a VM protected in
// reverse onto disks on another file system (failback.Reverse renames them
// where they are), the backing of its first point's image and of the image
// merges make of it. The points' own images always lie in the store. The
// caller holds the chain, the writer slot and the shape.
func (s *Store) checkBackingsInside(ctx context.Context, vm, dir string) error {
	pts, intent, err := s.pointsAndMerge(vm)
	if err != nil {
		return err
	}
	seeds, err := s.seedsBelow(ctx, vm, pts, intent)
	if err != nil {
		return err
	}
	for _, seed := range seeds {
		if !strings.HasPrefix(seed, dir+string(filepath.Separator)) {
			return fmt.Errorf("vm %q: its points read through %s, outside the store: the VM is protected in reverse onto its own disks, which lifeboat does not delete", vm, seed)
		}
	}
	return nil
}

// ErrUnknownVM is wrapped by the error of a call about a VM the store holds
// nothing of.
var ErrUnknownVM = errors.New("unknown VM")

// forgottenPrefix starts the name under vms/ of a forgotten VM's files until
// they are deleted (no VM name starts with a dot).
const forgottenPrefix = ".forgotten-"

// sweepForgotten finishes what a Forget cut short left under vms/: files set
// aside for a VM the catalog still holds go back (the forget did not happen);
// those of a VM it forgot are deleted.
func (s *Store) sweepForgotten() {
	vms := s.abs("vms")
	ents, _ := os.ReadDir(vms)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), forgottenPrefix)
		if !ok || len(rest) < 10 || rest[len(rest)-9] != '-' {
			continue
		}
		vm, trash := rest[:len(rest)-9], filepath.Join(vms, e.Name())
		known := false
		_ = s.db.View(func(tx *bolt.Tx) error { known = vmBucket(tx, vm) != nil; return nil })
		dir := filepath.Join(vms, vm)
		if _, err := os.Stat(dir); known && errors.Is(err, os.ErrNotExist) {
			if err := os.Rename(trash, dir); err != nil {
				s.log.Error("a forget of the VM was cut short before the catalog: putting its files back failed", "vm", vm, "from", trash, "err", err)
				continue
			}
			s.log.Warn("a forget of the VM was cut short before the catalog forgot it: its files are back, nothing was forgotten", "vm", vm)
			continue
		}
		if err := os.RemoveAll(trash); err != nil {
			s.log.Error("deleting the files of a forgotten VM", "vm", vm, "dir", trash, "err", err)
			continue
		}
		s.log.Warn("deleted the files of a VM forgotten before a crash", "vm", vm)
	}
	_ = fsutil.SyncDir(vms)
}

// forgetHook runs the test hook after a step of Forget, if a test set one.
func (s *Store) forgetHook(step string) error {
	if s.testForgetHook == nil {
		return nil
	}
	return s.testForgetHook(step)
}

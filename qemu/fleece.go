package qemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// FleeceDisk is one disk of a fleece: what to freeze, where, and which bitmap
// generations turn over at the instant.
type FleeceDisk struct {
	Node       string // the disk's format node
	File       string // path for the temporary qcow2 fleece overlay (created by StartFleece, removed by Teardown)
	NewBitmap  string // generation to add, enabled: it tracks writes from the instant on
	OldBitmap  string // generation to disable at the instant and publish on the export ("" for a first sync: no bitmap published)
	Persistent bool   // make NewBitmap persistent (qcow2 v3 only; see BlockNode.PersistentBitmaps)
	// Granularity is NewBitmap's, in bytes (a power of two; 0: the block
	// grid's). Generations of different granularities merge.
	Granularity int64
	ExportName  string // NBD export name of the fleece node
	// Budget is how far the overlay may grow, in bytes: that much of its file
	// system is reserved for it as soon as it is made (so no neighbour can take
	// the space the copy-before-write needs), and once the overlay's file grows
	// past WatermarkOf(Budget) the fleece breaks itself (see Broken) before the
	// guest's writes could fail. 0: no reservation and no watch.
	Budget int64
}

// ErrFleeceFull is the cause of a fleece that broke itself because an overlay
// outgrew its budget: the instant is lost, the guest's writes went on.
var ErrFleeceFull = errors.New("fleece overlay outgrew its budget")

// WatermarkOf is the overlay size at which a fleece with this budget breaks
// itself. The half above it absorbs what the guest writes (and the filter
// copies) while the block job is being cancelled.
func WatermarkOf(budget int64) int64 { return budget / 2 }

// Fleece is a frozen view of a VM's disks at one instant, exported over NBD
// while the VM keeps writing.
type Fleece struct {
	m       *Monitor
	instant time.Time
	disks   []fleeceState

	// The watch on the overlays' write thresholds (see FleeceDisk.Budget).
	mu        sync.Mutex // guards the state flags of disks once the watch runs, and err
	err       error
	broken    chan struct{} // closed once err is set
	stopWatch context.CancelFunc
	watchDone chan struct{}
}

type fleeceState struct {
	FleeceDisk
	node, fileNode, job, export string // names of our own objects
	nodeAdded, jobStarted       bool
	exportAdded, fileMade       bool
	bitmapsTurned               bool // the transaction ran: NewBitmap exists, OldBitmap is disabled
	unreserved                  bool // the file system could not reserve the budget (no fallocate)
}

// Broken is closed when the fleece broke itself to keep the guest's writes
// from failing: an overlay outgrew its budget, so its block job was cancelled
// (the copy-before-write filter left the guest's write path) and its exports
// deleted. What was read from the fleece may then be a mix of before and after
// the instant: a point must not be committed from it. Err says why.
func (f *Fleece) Broken() <-chan struct{} { return f.broken }

// Err is why the fleece broke (wrapping ErrFleeceFull), or nil.
func (f *Fleece) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Unreserved names the overlay files whose budget the file system could not
// reserve (it has no fallocate): their write threshold still watches them,
// but a neighbour filling the file system could make a copy fail first.
func (f *Fleece) Unreserved() []string {
	var files []string
	for _, d := range f.disks {
		if d.unreserved {
			files = append(files, d.File)
		}
	}
	return files
}

// Instant is the moment the transaction returned: every write acknowledged
// before it is in the fleece, none after.
func (f *Fleece) Instant() time.Time { return f.instant }

// Exports returns the NBD export names, in the order of the disks.
func (f *Fleece) Exports() []string {
	names := make([]string, len(f.disks))
	for i, d := range f.disks {
		names[i] = d.ExportName
	}
	return names
}

// StartFleece freezes a view of the disks at one instant. It adds a fleece
// overlay node per disk (backed by the disk), then runs one transaction over
// all disks: add NewBitmap, disable OldBitmap, blockdev-backup sync=none into
// the fleece node (copy-before-write keeps the old data for the reader). Then
// it exports every fleece node read-only on the monitor's NBD server (start it
// first with NBDServerStart), publishing OldBitmap as qemu:dirty-bitmap:OLD.
// On any error it undoes what it did, bitmaps included, and returns the error.
func (m *Monitor) StartFleece(ctx context.Context, disks []FleeceDisk) (*Fleece, error) {
	f, err := m.PrepareFleece(ctx, disks)
	if err != nil {
		return nil, err
	}
	if err := f.Snapshot(ctx); err != nil {
		return nil, err
	}
	if err := f.Export(ctx); err != nil {
		return nil, err
	}
	return f, nil
}

// PrepareFleece does all of StartFleece that may come before the instant:
// checks, overlay images and nodes. Snapshot then takes the instant and Export
// publishes it, so a guest frozen for the instant is frozen only for the
// transaction. On error it undoes what it did.
func (m *Monitor) PrepareFleece(ctx context.Context, disks []FleeceDisk) (f *Fleece, err error) {
	if len(disks) == 0 {
		return nil, errors.New("fleece: no disks given")
	}
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("fleece: %w", err)
	}
	token := make([]byte, 3)
	rand.Read(token)
	tag := hex.EncodeToString(token) // tells apart fleeces of one QEMU, in names of at most 31 bytes
	f = &Fleece{m: m, broken: make(chan struct{})}
	for i, d := range disks {
		n, err := findNode(nodes, d.Node)
		if err != nil {
			return nil, fmt.Errorf("fleece disk %d: %w", i, err)
		}
		if d.File == "" || d.NewBitmap == "" {
			return nil, fmt.Errorf("fleece disk %q: File and NewBitmap are required", d.Node)
		}
		if d.Budget < 0 {
			return nil, fmt.Errorf("fleece disk %q: negative budget %d", d.Node, d.Budget)
		}
		if d.OldBitmap != "" {
			if b, ok := n.Bitmap(d.OldBitmap); ok && b.Inconsistent {
				return nil, fmt.Errorf("fleece disk %q: bitmap %q is inconsistent after an unclean QEMU exit; remove it and resynchronise by hashes", d.Node, d.OldBitmap)
			}
		}
		base := fmt.Sprintf("%sf%s-%d", OwnPrefix, tag, i)
		f.disks = append(f.disks, fleeceState{
			FleeceDisk: d, node: base, fileNode: base + "-file", job: base + "-job", export: base + "-exp",
		})
		if d.ExportName == "" {
			f.disks[i].ExportName = base
		}
	}
	defer func() {
		if err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			defer cancel()
			if uerr := f.undo(cctx); uerr != nil {
				err = errors.Join(err, fmt.Errorf("and undoing the fleece failed, QEMU may hold leftover %s* objects: %w", OwnPrefix, uerr))
			}
		}
	}()

	for i := range f.disks {
		d := &f.disks[i]
		n, _ := findNode(nodes, d.Node)
		if err := CreateImage(ctx, d.File, "qcow2", n.Size, "", ""); err != nil {
			return f, fmt.Errorf("fleece disk %q: create overlay: %w", d.Node, err)
		}
		d.fileMade = true
		if d.Budget > 0 {
			unsupported, err := Reserve(d.File, d.Budget)
			if err != nil {
				return f, fmt.Errorf("fleece disk %q: reserve %d bytes for overlay %s: %w (free space in its directory, or lower the budget)", d.Node, d.Budget, d.File, err)
			}
			d.unreserved = unsupported
		}
		err := m.BlockdevAdd(ctx, map[string]any{
			"driver": "qcow2", "node-name": d.node, "backing": d.Node,
			"file": map[string]any{"driver": "file", "node-name": d.fileNode, "filename": d.File},
		})
		if err != nil {
			return f, fmt.Errorf("fleece disk %q: %w", d.Node, err)
		}
		d.nodeAdded = true
	}
	return f, nil
}

// undoOnError undoes a fleece whose step failed, so the bitmaps are as before.
func (f *Fleece) undoOnError(ctx context.Context, err *error) {
	if *err == nil {
		return
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if uerr := f.undo(cctx); uerr != nil {
		*err = errors.Join(*err, fmt.Errorf("and undoing the fleece failed, QEMU may hold leftover %s* objects: %w", OwnPrefix, uerr))
	}
}

// Snapshot is the instant: one transaction over all disks adds the new
// generations, disables the old ones and starts copy-before-write into the
// fleece nodes. On error the fleece is undone.
func (f *Fleece) Snapshot(ctx context.Context) (err error) {
	defer f.undoOnError(ctx, &err)
	m := f.m
	// Watch before the instant, so no write after it goes unwatched.
	if err := f.watch(ctx); err != nil {
		return err
	}
	var actions []Action
	for _, d := range f.disks {
		actions = append(actions, Action{"block-dirty-bitmap-add", addBitmapArgs(d.Node, d.NewBitmap, d.Persistent, false, d.Granularity)})
		if d.OldBitmap != "" {
			actions = append(actions, DisableBitmapAction(d.Node, d.OldBitmap))
		}
		actions = append(actions, Action{"blockdev-backup", map[string]any{
			"device": d.Node, "target": d.node, "sync": "none", "job-id": d.job,
		}})
	}
	// Under mu, so that a threshold that fires at once finds the jobs started.
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := m.Transaction(ctx, actions...); err != nil {
		if qe := (*QMPError)(nil); errors.As(err, &qe) {
			return fmt.Errorf("fleece transaction: %w", err) // refused: none of it happened
		}
		// Sent, but no reply (ctx ended, the connection broke): QEMU may
		// have run it. ctx may be over: ask on a fresh one.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
		return fmt.Errorf("fleece transaction: %w (%w); %s", ErrOutcomeUnknown, err, f.learn(cctx))
	}
	f.instant = time.Now()
	for i := range f.disks {
		f.disks[i].jobStarted = true
		f.disks[i].bitmapsTurned = true
	}
	return nil
}

// ErrOutcomeUnknown is in the error of a Snapshot whose transaction was sent
// but got no reply: QEMU may have run it. Snapshot then asked QEMU what it did,
// says so in the error, and undid whatever it found.
var ErrOutcomeUnknown = errors.New("its outcome is unknown")

// learn finds out what QEMU did with a transaction whose reply was lost, and
// marks it for undo; it says what it found. QMP answers a monitor's commands
// in order, so its queries are answered only once the transaction is over;
// and the transaction is atomic, so its jobs and new generations are all
// there or none. The jobs are cancelled by their ids in any case (one that
// does not exist is no error), so a job that went unseen is not left in the
// guest's write path. Called with f.mu held.
func (f *Fleece) learn(ctx context.Context) string {
	for i := range f.disks {
		f.disks[i].jobStarted = true
	}
	jobs, err := f.m.Jobs(ctx)
	var nodes []BlockNode
	if err == nil {
		nodes, err = f.m.Nodes(ctx)
	}
	if err != nil {
		return fmt.Sprintf("QEMU could not be asked what it did (%v): its backup jobs are cancelled by id; any generation it added stays for the next cycle's reconcile to merge back", err)
	}
	var found []string
	for i := range f.disks {
		d := &f.disks[i]
		var what []string
		if slices.ContainsFunc(jobs, func(j BlockJob) bool { return j.ID == d.job }) {
			what = append(what, fmt.Sprintf("backup job %q", d.job))
		}
		if n, err := findNode(nodes, d.Node); err == nil {
			if _, ok := n.Bitmap(d.NewBitmap); ok {
				d.bitmapsTurned = true
				what = append(what, fmt.Sprintf("new generation %q", d.NewBitmap))
			}
		}
		if len(what) > 0 {
			found = append(found, fmt.Sprintf("disk %q: %s", d.Node, strings.Join(what, " and ")))
		}
	}
	if len(found) == 0 {
		return "QEMU, asked afterwards, had not run it: nothing of it to undo"
	}
	return fmt.Sprintf("QEMU, asked afterwards, had run it (%s): its jobs are cancelled, its nodes deleted and the new generations merged back into the old ones, as for any failed instant", strings.Join(found, "; "))
}

// Export publishes every fleece node read-only on the monitor's NBD server,
// with the old generation as qemu:dirty-bitmap:OLD. On error the fleece is
// undone, bitmaps included.
func (f *Fleece) Export(ctx context.Context) (err error) {
	defer f.undoOnError(ctx, &err)
	m := f.m
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return f.err // broken before it was published
	}
	for i := range f.disks {
		d := &f.disks[i]
		e := Export{ID: d.export, Node: d.node, Name: d.ExportName}
		if d.OldBitmap != "" {
			e.Bitmaps = []string{d.OldBitmap}
		}
		if err := m.ExportAdd(ctx, e); err != nil {
			return fmt.Errorf("fleece disk %q: %w", d.Node, err)
		}
		d.exportAdded = true
	}
	return nil
}

// undo tears the fleece down and turns the bitmaps back: writes since the
// instant are in NewBitmap only, so merge them into OldBitmap, re-enable it
// and drop NewBitmap — as if the fleece had never been.
func (f *Fleece) undo(ctx context.Context) error {
	err := f.Teardown(ctx)
	var actions []Action
	for _, d := range f.disks {
		if !d.bitmapsTurned {
			continue // the transaction did not happen: bitmaps untouched
		}
		if d.OldBitmap != "" {
			actions = append(actions, MergeBitmapsAction(d.Node, d.OldBitmap, d.NewBitmap), EnableBitmapAction(d.Node, d.OldBitmap))
		}
		actions = append(actions, RemoveBitmapAction(d.Node, d.NewBitmap))
	}
	if terr := f.m.Transaction(ctx, actions...); terr != nil {
		err = errors.Join(err, fmt.Errorf("restore bitmaps: %w", terr))
	}
	return err
}

// Teardown deletes the exports (dropping any client still connected), cancels
// the backup jobs, deletes the fleece nodes and removes their files. It does
// not touch bitmaps: the caller decides (drop OldBitmap once the point is
// committed; otherwise enable OldBitmap, merge NewBitmap into it and remove
// NewBitmap). It goes on past errors and may be called again.
func (f *Fleece) Teardown(ctx context.Context) error {
	f.endWatch()
	var errs []error
	errs = append(errs, f.removeExports(ctx)...)
	errs = append(errs, f.cancelJobs(ctx)...)
	for i := range f.disks {
		d := &f.disks[i]
		if d.nodeAdded {
			if err := f.m.BlockdevDel(ctx, d.node); err != nil {
				errs = append(errs, err)
			} else {
				d.nodeAdded = false
			}
		}
		if d.fileMade && !d.nodeAdded {
			if err := os.Remove(d.File); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove fleece overlay: %w", err))
			} else {
				d.fileMade = false
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("fleece teardown: %w", errors.Join(errs...))
	}
	return nil
}

// Reserve allocates size bytes for the file past its end without changing its
// size (FALLOC_FL_KEEP_SIZE): the overlay's growth lands in blocks that are
// already its own, and cannot fail for want of space. unsupported reports a
// file system without fallocate.
func Reserve(path string, size int64) (unsupported bool, err error) {
	const keepSize = 0x01 // FALLOC_FL_KEEP_SIZE
	fh, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return false, err
	}
	defer fh.Close()
	for {
		err = syscall.Fallocate(int(fh.Fd()), keepSize, 0, size)
		if err != syscall.EINTR {
			break
		}
	}
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return false, nil
}

// watch sets a write threshold on each budgeted overlay's file node and, until
// Teardown, breaks the fleece when one fires.
func (f *Fleece) watch(ctx context.Context) error {
	// The watcher reads only this copy: the disks' flags are f.mu's.
	type watched struct {
		node, file string
		budget     int64
	}
	byNode := map[string]watched{}
	for _, d := range f.disks {
		if d.Budget > 0 {
			byNode[d.fileNode] = watched{d.Node, d.File, d.Budget}
		}
	}
	if len(byNode) == 0 {
		return nil
	}
	sub := f.m.Subscribe("BLOCK_WRITE_THRESHOLD")
	for node, w := range byNode {
		err := f.m.Execute(ctx, "block-set-write-threshold", map[string]any{"node-name": node, "write-threshold": WatermarkOf(w.budget)}, nil)
		if err != nil {
			sub.Close()
			return fmt.Errorf("fleece disk %q: watch overlay %s: %w", w.node, w.file, err)
		}
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	f.stopWatch, f.watchDone = stop, make(chan struct{})
	go func() {
		defer close(f.watchDone)
		defer sub.Close()
		ev, err := sub.Wait(wctx, func(ev Event) bool {
			var d struct {
				Node string `json:"node-name"`
			}
			json.Unmarshal(ev.Data, &d)
			_, ok := byNode[d.Node]
			return ok
		})
		if err != nil {
			return // Teardown, or QEMU went away (and the filter with it)
		}
		var d struct {
			Node     string `json:"node-name"`
			Exceeded int64  `json:"amount-exceeded"`
		}
		json.Unmarshal(ev.Data, &d)
		w := byNode[d.Node]
		f.breakOff(w.file, fmt.Errorf("%w: disk %q: overlay %s grew past %d bytes, half of the %d bytes set aside for it, so the copy-before-write filter was removed before a copy could fail the guest's write, and the view of the instant is gone",
			ErrFleeceFull, w.node, w.file, WatermarkOf(w.budget), w.budget))
	}()
	return nil
}

// breakOff takes the fleece out of the guest's write path at once: first the
// block jobs (each holds the copy-before-write filter), then the exports, whose
// readers would now see writes from after the instant.
func (f *Fleece) breakOff(file string, cause error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = cause
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	var errs []error
	errs = append(errs, f.cancelJobs(ctx)...)
	// How far it got while the job was cancelled: what the half above the
	// watermark has to absorb.
	if st, err := os.Stat(file); err == nil {
		cause = fmt.Errorf("%w (it reached %d bytes)", cause, st.Size())
		f.err = cause
	}
	errs = append(errs, f.removeExports(ctx)...)
	if len(errs) > 0 {
		f.err = fmt.Errorf("%w; and removing the fleece failed (Teardown retries): %w", cause, errors.Join(errs...))
	}
	close(f.broken)
}

// endWatch stops the watch and waits for a break in progress to finish.
func (f *Fleece) endWatch() {
	if f.stopWatch != nil {
		f.stopWatch()
		<-f.watchDone
	}
}

// fleeceNode matches the names StartFleece gives its overlay nodes.
var fleeceNode = regexp.MustCompile(`^` + OwnPrefix + `f[0-9a-f]{6}-[0-9]+$`)

// RemoveStale removes what a lifeboat that died mid-cycle left in QEMU: its
// exports, block jobs and fleece nodes (named OwnPrefix...), the fleece
// overlay files, and the NBD server it started on one of ownNBDSockets,
// which would keep anyone else from starting one. A server elsewhere, or on
// such a socket but in another process, is not lifeboat's and is left alone
// (see ServesNBD). A fleece whose overlay file live (non-nil) reports as a
// cycle's still under way (another lifeboat's protecting the same VM) is
// left alone too, its export and job with it. A stale fleece keeps its
// published generation busy, so the next cycle's transaction would fail:
// call this before it. Bitmaps are left alone, as by Teardown. It returns
// what it removed.
func (m *Monitor) RemoveStale(ctx context.Context, live func(overlay string) bool, ownNBDSockets ...string) (removed []string, err error) {
	var errs []error
	note := func(what string, err error) {
		if err != nil {
			errs = append(errs, err)
		} else {
			removed = append(removed, what)
		}
	}
	// Exports and jobs first: a fleece's node is added before them, so each
	// listed here has its node in the list below.
	exports, err := m.Exports(ctx)
	if err != nil {
		return nil, fmt.Errorf("remove stale lifeboat objects: %w", err)
	}
	jobs, err := m.Jobs(ctx)
	if err != nil {
		return nil, fmt.Errorf("remove stale lifeboat objects: %w", err)
	}
	nodes, err := m.Nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("remove stale lifeboat objects: %w", err)
	}
	files := make(map[string]string, len(nodes))
	for _, n := range nodes {
		files[n.NodeName] = n.Filename
	}
	// The fleeces of cycles under way, by their overlay node's name, which
	// starts their export's and job's.
	kept := map[string]bool{}
	for _, n := range nodes {
		// The overlay node's own filename is a json: pseudo-name (its backing
		// is overridden); its protocol child names the file.
		if file, ok := files[n.NodeName+"-file"]; ok && live != nil && fleeceNode.MatchString(n.NodeName) && live(file) {
			kept[n.NodeName] = true
		}
	}
	for _, e := range exports {
		if strings.HasPrefix(e.ID, OwnPrefix) && !e.ShuttingDown && !kept[strings.TrimSuffix(e.ID, "-exp")] {
			note("export "+e.ID, m.ExportDelForce(ctx, e.ID))
		}
	}
	for _, j := range jobs {
		if strings.HasPrefix(j.ID, OwnPrefix) && !kept[strings.TrimSuffix(j.ID, "-job")] {
			note("block job "+j.ID, m.CancelJob(ctx, j.ID))
		}
	}
	for _, n := range nodes {
		if !fleeceNode.MatchString(n.NodeName) || kept[n.NodeName] {
			continue
		}
		if err := m.BlockdevDel(ctx, n.NodeName); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, "fleece node "+n.NodeName)
		file, ok := files[n.NodeName+"-file"]
		if !ok {
			continue
		}
		if err := os.Remove(file); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove stale fleece overlay: %w", err))
		}
	}
	for _, sock := range ownNBDSockets {
		switch ours, err := m.ServesNBD(ctx, sock); {
		case err != nil:
			errs = append(errs, err)
		case ours:
			note("NBD server on "+sock, m.NBDServerStop(ctx))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("remove stale lifeboat objects: %w", err)
	}
	return removed, nil
}

// removeExports deletes the fleece's exports still up; the ones that fail stay
// marked for the next try.
func (f *Fleece) removeExports(ctx context.Context) []error {
	var errs []error
	for i := range f.disks {
		d := &f.disks[i]
		if d.exportAdded {
			if err := f.m.ExportDelForce(ctx, d.export); err != nil {
				errs = append(errs, err)
			} else {
				d.exportAdded = false
			}
		}
	}
	return errs
}

// cancelJobs cancels the fleece's backup jobs, which takes their
// copy-before-write filters out of the guest's write path.
func (f *Fleece) cancelJobs(ctx context.Context) []error {
	var errs []error
	for i := range f.disks {
		d := &f.disks[i]
		if d.jobStarted {
			if err := f.m.CancelJob(ctx, d.job); err != nil {
				errs = append(errs, err)
			} else {
				d.jobStarted = false
			}
		}
	}
	return errs
}

package protect

// The libvirt path. A libvirt domain is reached through libvirtd only, as
// libvirt's own tools reach it: its disks come from its live XML and are
// named by target (vda), a generation is a libvirt checkpoint, the instant is
// a pull-mode backup begun together with the next checkpoint, and the backup's
// NBD export is what the cycle reads.
//
// Between cycles lifeboat's checkpoints are hidden: their libvirt metadata
// is deleted and kept in WorkDir/checkpoints, while their bitmaps go on
// recording in the images (libvirt 9.0 keeps every checkpoint's bitmap
// recording, and carries every bitmap through external snapshots and block
// commits). virtnbdbackup refuses to run beside any checkpoint not its own,
// and a user's `virsh checkpoint-list` shows only theirs. A cycle redefines
// its base checkpoint (libvirt then checks its bitmaps are there and
// consistent), begins the backup with the next one, and hides them again
// when the backup ends. Nothing edits the
// domain's XML, nothing uses the QEMU pass-through (no taint), and what the
// backup starts in QEMU (its NBD server, exports, scratch files) libvirt stops
// when the cycle ends the job.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// DefaultBusyWait bounds how long a cycle waits for another tool's libvirt
// job (a backup, a migration) to end before it gives up; the next cycle
// tries again.
const DefaultBusyWait = 10 * time.Minute

// virtCycle is a cycle's libvirt state.
type virtCycle struct {
	uri     string       // the connection's, to redial it
	log     *slog.Logger // nil outside a cycle
	connMu  sync.Mutex   // guards conn and dom once the scratch watcher runs
	conn    *virt.Conn   // see do: replaced when it breaks
	dom     *virt.Domain // on conn
	desc    *virt.Description
	run     string  // scratch files and the NBD socket, QEMU's to write
	budgets []int64 // each disk's scratch budget (see Safety)
	sock    string
	cp      string // the checkpoint this cycle's instant makes ("" = none)
	made    bool   // cp exists (the backup began)
	others  []string
	saved   string               // where hidden checkpoints are kept
	ours    []virt.Checkpoint    // our hidden checkpoints when the cycle began
	images  map[string][]imageID // each disk's images as the cycle resolved it
	shown   []string             // those redefined in libvirt for this cycle
	started bool                 // our backup job runs

	mu     sync.Mutex
	broken error // why the backup was ended before the cycle was done

	unwatch func() // stops the scratch watcher (see settle); nil when none runs
}

// cpMeta is what lifeboat writes in a checkpoint's description: whose it
// is and the lineage of each disk it tracks.
type cpMeta struct {
	Peer     string            `json:"peer"`
	Point    uint64            `json:"point"`
	Lineages map[string]string `json:"lineages"`
	// Images are the images each disk read at the checkpoint's instant
	// (virt.Disk.Chain, with each file's inode). libvirt gives a
	// checkpoint's bitmaps one name on every disk it tracks, so another
	// disk's image put under a target (the domain defined again with its
	// disks' sources swapped, a disk detached and another attached in its
	// place) carries a bitmap libvirt takes as the checkpoint's; only this
	// tells the disk's own image from it. Absent in checkpoints made
	// before it was recorded, and in those a failover or failback starts.
	Images map[string][]imageID `json:"images,omitempty"`
}

// imageID is an image of a disk's chain: its path and, for a local file,
// its inode, which goes with the file when images are renamed into each
// other's place. The device number is left out: it may change at a reboot.
type imageID struct {
	Path string `json:"path"`
	Ino  uint64 `json:"ino,omitempty"`
}

// identify is the identity of the images of chain.
func identify(chain []string) []imageID {
	ids := make([]imageID, len(chain))
	for i, path := range chain {
		ids[i].Path = path
		var st syscall.Stat_t
		if path != "" && syscall.Stat(path, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFREG {
			ids[i].Ino = st.Ino
		}
	}
	return ids
}

func (a imageID) same(b imageID) bool {
	return a.Path != "" && a.Path == b.Path && (a.Ino == 0 || b.Ino == 0 || a.Ino == b.Ino)
}

func containsImage(chain []imageID, id imageID) bool {
	return slices.ContainsFunc(chain, id.same)
}

// carriesHistory reports whether a disk that reads chain now still reads
// the images it read at a checkpoint (was): the same active layer, or one
// put above it since (an external snapshot: libvirt copies the bitmaps up),
// or one below it that the layers above were committed into (a block
// commit: libvirt merges them down). An image new to the disk (another
// disk's, a copy, a block copy's destination) proves nothing.
func carriesHistory(was, now []imageID) bool {
	if len(was) == 0 || len(now) == 0 {
		return false
	}
	return containsImage(now, was[0]) || containsImage(was, now[0])
}

// chainString names a chain's images for a message.
func chainString(chain []imageID) string {
	var names []string
	for _, id := range chain {
		names = append(names, cmpStr(id.Path, "(a source that is no file)"))
	}
	return strings.Join(names, " over ")
}

const cpDescPrefix = "lifeboat restore point: "

// ourCheckpoint reads a checkpoint's meta when it is one of lifeboat's kept
// for peer.
func ourCheckpoint(cp virt.Checkpoint, peer string) (cpMeta, bool) {
	var m cpMeta
	rest, ok := strings.CutPrefix(cp.Description, cpDescPrefix)
	if !ok || !strings.HasPrefix(cp.Name, genPrefix) || json.Unmarshal([]byte(rest), &m) != nil {
		return m, false
	}
	return m, m.Peer == peer
}

// cpNameUnsafe is what libvirt does not allow in a checkpoint name.
var cpNameUnsafe = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// newCheckpointName names the checkpoint of point id. The exact site is in
// the description; the name only has to be unique and readable.
func newCheckpointName(peer string, id uint64) string {
	return genPrefix + strconv.FormatUint(id, 10) + "." + randomHex(4) + "." + cpNameUnsafe.ReplaceAllString(peer, "_")
}

func (c *cycle) runLibvirt(ctx context.Context) (lifeboat.Point, error) {
	defer c.close(ctx)
	if err := c.prepareLibvirt(ctx); err != nil {
		return lifeboat.Point{}, err
	}
	c.report("snapshot", 0)
	// Until transfer takes over, a failure here ends what was begun: the
	// backup, the new checkpoint, the bases shown to libvirt.
	handed := false
	defer func() {
		if !handed {
			c.settleFailed(ctx)
		}
	}()
	if err := c.prepareScratch(ctx); err != nil {
		return lifeboat.Point{}, err
	}
	busyWait := cmp0(c.p.BusyWait, DefaultBusyWait)
	for attempt := 1; ; attempt++ {
		if err := c.lv.waitIdle(ctx, c.log, busyWait); err != nil {
			return lifeboat.Point{}, err
		}
		// The bases are shown to libvirt only now, for as short a time as
		// possible: another tool may refuse to start beside them.
		if err := c.showBases(ctx); err != nil {
			return lifeboat.Point{}, err
		}
		q := c.p.Quiescer
		if c.quiet {
			q = nil // the guest is paused: nothing to freeze
		}
		frz, err := freeze(ctx, q)
		if err != nil {
			return lifeboat.Point{}, err
		}
		err = c.beginLibvirt(ctx)
		frz.thaw(ctx, c.log)
		if err == nil {
			if err := c.describePoint(ctx); err != nil {
				return lifeboat.Point{}, err
			}
			c.setLevel(frz)
			if c.quiet {
				c.point.Consistency, c.point.Note = c.quietLevel, c.note
			}
			break
		}
		if !virt.IsBusy(err) || attempt == 3 {
			return lifeboat.Point{}, err
		}
		c.log.Info("another libvirt job began as the instant was taken: waiting for it again", "err", err)
	}
	handed = true
	return c.transfer(ctx)
}

func cmp0(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// prepareLibvirt finds the domain and its disks, and each disk's base.
func (c *cycle) prepareLibvirt(ctx context.Context) error {
	p := c.p
	lv := p.VM.Libvirt
	c.start = time.Now()
	conn, err := virt.Dial(ctx, lv.URI)
	if err != nil {
		return err
	}
	c.lv = &virtCycle{uri: lv.URI, log: c.log, conn: conn}
	if c.lv.dom, err = conn.Domain(ctx, lv.Domain); err != nil {
		return err
	}
	if c.lv.desc, err = c.lv.dom.Describe(ctx); err != nil {
		return err
	}
	c.lv.saved = filepath.Join(p.VM.WorkDir, "checkpoints")
	if err := c.lv.prepareRunDir(p, c.log); err != nil {
		return err
	}
	// A lifeboat that died mid-cycle left its backup running.
	if running, sock, err := c.lv.dom.BackupRunning(ctx); err != nil {
		return err
	} else if running && sock == c.lv.sock {
		c.log.Warn("ending the backup job a previous lifeboat left running", "domain", lv.Domain)
		if err := c.lv.endBackup(ctx); err != nil {
			return err
		}
	}
	disks, err := c.libvirtDisks()
	if err != nil {
		return err
	}
	c.images = libvirtImages(disks)
	c.lv.images = map[string][]imageID{}
	for _, dk := range disks {
		c.lv.images[dk.Target] = identify(dk.Chain)
	}
	if err := c.learnLatest(ctx); err != nil {
		return err
	}
	targets := make([]string, len(disks))
	for i, d := range disks {
		targets[i] = d.Target
	}
	c.readDefinition(ctx, func(ctx context.Context) (lifeboat.Definition, error) {
		return c.lv.dom.Definition(ctx, targets, c.lv.desc.XML)
	})
	peer := p.Target.Peer()
	if err := c.lv.hideLeftovers(ctx, peer, c.log); err != nil {
		return err
	}
	metas := map[string]cpMeta{}
	records, err := c.lv.hidden()
	if err != nil {
		return err
	}
	for _, cp := range records {
		// Records kept for another recovery site are not this cycle's.
		if m, ok := ourCheckpoint(cp, peer); ok {
			c.lv.ours = append(c.lv.ours, cp)
			metas[cp.Name] = m
		}
	}
	tracked := false
	for _, dk := range disks {
		d := &diskState{name: dk.Target, node: dk.Target, export: dk.Target, persistent: dk.Format == "qcow2"}
		h := c.history(dk.Target)
		d.lineage, d.base = h.lineage, h.latest
		d.why = checkpointBase(dk, h, c.lv.ours, metas, c.lv.images[dk.Target])
		if d.why == "" && c.p.Whole {
			d.why = c.wholeWhy()
		}
		d.whole = c.p.Whole
		if d.why == "" {
			d.old = h.gen
			d.dirty = virt.ExportBitmap(dk.Target)
		} else {
			c.log.Info("disk will be sent whole", "disk", d.name, "why", d.why)
		}
		if d.persistent {
			tracked = true
		}
		c.disks = append(c.disks, d)
	}
	if tracked {
		c.lv.cp = newCheckpointName(peer, c.id)
		for _, d := range c.disks {
			if d.persistent {
				d.new = c.lv.cp
			}
		}
	}
	return nil
}

// libvirtImages is the images of a domain's disks that a failback can
// write into (each disk's active layer, a local qcow2 or raw file), or nil
// when some disk has none.
func libvirtImages(disks []virt.Disk) []DiskImage {
	var images []DiskImage
	for _, d := range disks {
		if d.File == "" || (d.Format != "qcow2" && d.Format != "raw") {
			return nil
		}
		images = append(images, DiskImage{Name: d.Target, File: d.File, Format: d.Format})
	}
	return images
}

// HomeCheckpoint names the checkpoint, and so the bitmaps, that a
// failback's finalize starts on a libvirt domain's disks at production for
// the recovery site peer at its point id: the generation the domain's next
// cycle continues from.
func HomeCheckpoint(peer string, id uint64) string { return newCheckpointName(peer, id) }

// KeepCheckpoint records checkpoint name among the hidden checkpoints of the
// VM whose protector works in workDir: it tracks disks (target -> lineage)
// for the recovery site peer from its point id, its bitmaps named name and
// started in the images by the caller. The VM's next cycle redefines it as
// its base, and libvirt then checks that the bitmaps are there.
func KeepCheckpoint(workDir, name, peer string, id uint64, lineages map[string]string) error {
	doc, err := checkpointDoc(name, peer, id, lineages)
	if err != nil {
		return err
	}
	dir := filepath.Join(workDir, "checkpoints")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("lifeboat's checkpoint records: %w", err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, name+".xml"), []byte(doc), 0o600); err != nil {
		return fmt.Errorf("record checkpoint %q: %w", name, err)
	}
	return nil
}

// StartCheckpoint makes checkpoint name on a running or paused domain (its
// bitmaps start now), as KeepCheckpoint describes it, and hides it among
// the checkpoints of the VM whose protector works in workDir: the
// generation a failover starts on the recovered domain's overlays, from
// which that VM's cycles to peer continue.
func StartCheckpoint(ctx context.Context, dom *virt.Domain, workDir, name, peer string, id uint64, lineages map[string]string) error {
	doc, err := checkpointDoc(name, peer, id, lineages)
	if err != nil {
		return err
	}
	if err := dom.CreateCheckpointXML(ctx, doc); err != nil {
		return err
	}
	lv := &virtCycle{dom: dom, saved: filepath.Join(workDir, "checkpoints")}
	if err := os.MkdirAll(lv.saved, 0o700); err != nil {
		return fmt.Errorf("lifeboat's checkpoint records: %w", err)
	}
	return lv.hide(ctx, name)
}

// checkpointDoc is the XML of a checkpoint of lifeboat's (see KeepCheckpoint).
func checkpointDoc(name, peer string, id uint64, lineages map[string]string) (string, error) {
	meta, err := json.Marshal(cpMeta{Peer: peer, Point: id, Lineages: lineages})
	if err != nil {
		return "", err
	}
	return virt.CheckpointDoc(name, cpDescPrefix+string(meta), time.Now(), slices.Sorted(maps.Keys(lineages)))
}

// checkpointBase says why disk dk, reading images now, has no base (""
// when the checkpoint its latest point recorded is there, ours, tracking the
// disk, of its lineage, made while it read the images it reads now).
func checkpointBase(dk virt.Disk, h history, ours []virt.Checkpoint, metas map[string]cpMeta, now []imageID) string {
	switch {
	case dk.Format != "qcow2":
		return fmt.Sprintf("disk is %s, which cannot hold libvirt's checkpoints: it is compared by hashes at every cycle (convert it to qcow2 for change tracking)", cmpStr(dk.Format, "not a file image"))
	case h.latest == 0:
		return "initial sync: the recovery site has no point of this disk"
	case h.gen == "":
		return fmt.Sprintf("point %d records no checkpoint: a hash resync will run", h.latest)
	}
	i := slices.IndexFunc(ours, func(cp virt.Checkpoint) bool { return cp.Name == h.gen })
	switch {
	case i < 0:
		return fmt.Sprintf("checkpoint %q that point %d made is not among lifeboat's (its record in state_dir is gone): a hash resync will run", h.gen, h.latest)
	case !slices.Contains(ours[i].Disks, dk.Target):
		return fmt.Sprintf("checkpoint %q does not track disk %s: a hash resync will run", h.gen, dk.Target)
	case metas[h.gen].Lineages[dk.Target] != h.lineage:
		return fmt.Sprintf("checkpoint %q tracks another disk history at %s (it was replaced): a hash resync will run", h.gen, dk.Target)
	}
	if was, ok := metas[h.gen].Images[dk.Target]; metas[h.gen].Images != nil && !carriesHistory(was, now) {
		if !ok {
			return fmt.Sprintf("checkpoint %q records no image of disk %s: a hash resync will run", h.gen, dk.Target)
		}
		return fmt.Sprintf("disk %s reads %s, not the image it read at point %d (%s): another disk's image put under its target, or a block copy's, carries a bitmap under the checkpoint's name that says nothing of this disk, so a hash resync will run",
			dk.Target, chainString(now), h.latest, chainString(was))
	}
	return ""
}

func cmpStr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// libvirtDisks is the domain's disks to protect: those of `disks:` by target,
// or every writable one.
func (c *cycle) libvirtDisks() ([]virt.Disk, error) {
	all := c.lv.desc.Disks
	var targets []string
	for _, d := range all {
		targets = append(targets, d.Target)
	}
	if len(c.p.VM.Disks) == 0 {
		if len(all) == 0 {
			return nil, fmt.Errorf("libvirt domain %q has no writable disk", c.lv.dom.Name)
		}
		return all, nil
	}
	var out []virt.Disk
	for _, name := range c.p.VM.Disks {
		i := slices.IndexFunc(all, func(d virt.Disk) bool { return d.Target == name })
		if i < 0 {
			return nil, fmt.Errorf("libvirt domain %q has no writable disk %q: its disks are %s (name them by target under `disks:` of vm %q)", c.lv.dom.Name, name, strings.Join(targets, ", "), c.p.VM.Name)
		}
		out = append(out, all[i])
	}
	for _, d := range all {
		if !slices.Contains(c.p.VM.Disks, d.Target) {
			c.lv.others = append(c.lv.others, d.Target)
		}
	}
	return out, nil
}

// prepareRunDir makes the directory of the backup's scratch files and
// socket: QEMU, running as the domain's DAC user (libvirt-qemu), creates
// both, so the directory is that user's, and every directory above it must
// let that user pass. lifeboat grants that on its own directories (StateDir
// down to WorkDir: search only, not read) and says what to do about others.
func (lv *virtCycle) prepareRunDir(p *Protector, log *slog.Logger) error {
	lv.run = filepath.Join(p.VM.WorkDir, "libvirt")
	lv.sock = filepath.Join(lv.run, "nbd.sock")
	if err := os.MkdirAll(lv.run, 0o700); err != nil {
		return fmt.Errorf("libvirt work directory: %w", err)
	}
	uid, gid := lv.desc.UID, lv.desc.GID
	if uid < 0 {
		return nil // QEMU runs as whoever runs libvirtd's session: us
	}
	if err := os.Chown(lv.run, uid, gid); err != nil {
		return fmt.Errorf("libvirt work directory %s: give it to QEMU's user %d:%d: %w", lv.run, uid, gid, err)
	}
	own := filepath.Clean(cmpStr(p.VM.StateDir, p.VM.WorkDir))
	for dir := filepath.Dir(lv.run); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return fmt.Errorf("libvirt work directory: %w", err)
		}
		if !searchable(fi, uid, gid) {
			if !strings.HasPrefix(dir+"/", own+"/") {
				return fmt.Errorf("QEMU of libvirt domain %q runs as user %d and cannot pass directory %s (mode %v) to reach its scratch files under %s: let it (chmod o+x %s) or put state_dir elsewhere",
					lv.dom.Name, uid, dir, fi.Mode().Perm(), lv.run, dir)
			}
			if err := os.Chmod(dir, fi.Mode().Perm()|0o001); err != nil {
				return fmt.Errorf("libvirt work directory: let QEMU's user pass %s: %w", dir, err)
			}
			log.Info("let QEMU's user pass lifeboat's directory (search permission only) to reach the backup's scratch files", "dir", dir, "uid", uid)
		}
		if dir == "/" || dir == filepath.Dir(dir) {
			return nil
		}
	}
}

// searchable reports whether user uid (group gid) may pass directory fi.
func searchable(fi os.FileInfo, uid, gid int) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	m := fi.Mode().Perm()
	switch {
	case int(st.Uid) == uid:
		return m&0o100 != 0
	case int(st.Gid) == gid:
		return m&0o010 != 0
	}
	return m&0o001 != 0
}

// waitIdle waits, bounded, until the domain runs no job: libvirt runs one at a
// time, and another tool's backup is not lifeboat's to end.
func (lv *virtCycle) waitIdle(ctx context.Context, log *slog.Logger, limit time.Duration) error {
	start := time.Now()
	logged := false
	for {
		job, err := lv.dom.Job(ctx)
		if err != nil {
			return err
		}
		if job == "" {
			if logged {
				log.Info("the other libvirt job ended: going on", "waited", time.Since(start).Round(time.Second))
			}
			return nil
		}
		if !logged {
			log.Info("libvirt domain runs another job (another tool's backup, a migration?): waiting for it to end", "domain", lv.dom.Name, "job", job, "limit", limit)
			logged = true
		}
		if time.Since(start) > limit {
			return fmt.Errorf("libvirt domain %q ran a %s job for more than %v: no point taken; the next cycle tries again (a stuck job of another tool? see `virsh domjobinfo %s`)", lv.dom.Name, job, limit, lv.dom.Name)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for libvirt domain %q's %s job to end: %w", lv.dom.Name, job, context.Cause(ctx))
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// beginLibvirt is the instant: the pull backup of every disk, with the next
// checkpoint made in the same transaction. A base checkpoint libvirt finds
// broken (QEMU was killed and its bitmaps not saved) makes the disks whole
// syncs, and the backup is begun again at once.
func (c *cycle) beginLibvirt(ctx context.Context) error {
	lv := c.lv
	// A disk resized since its scratch file was made: QEMU refuses the
	// begin (an incremental one: "Bitmaps are of different sizes"), and
	// libvirt 9.0 crashes on its way out of that failure (libvirtd's
	// segfault, seen here). Each disk's size is asked right before the
	// begin, which leaves only the milliseconds between the two calls.
	for _, d := range c.disks {
		n, err := lv.dom.Capacity(ctx, d.name)
		if err != nil {
			return err
		}
		if n != d.size {
			c.log.Warn("disk resized during the cycle, before its instant: the backup is not begun", "disk", d.name, "size", n, "was", d.size)
			return fmt.Errorf("libvirt domain %q: disk %q was resized from %d to %d bytes while the cycle prepared its instant: no point is taken of it at its old size; the next cycle resyncs it at its new size",
				lv.dom.Name, d.name, d.size, n)
		}
	}
	b := virt.Backup{Socket: lv.sock, Checkpoint: lv.cp, Others: lv.others, ReuseScratch: true}
	if lv.cp != "" {
		m := cpMeta{Peer: c.p.Target.Peer(), Point: c.id, Lineages: map[string]string{}, Images: map[string][]imageID{}}
		for _, d := range c.disks {
			if d.persistent {
				m.Lineages[d.name] = d.lineage
				m.Images[d.name] = lv.images[d.name]
			}
		}
		j, _ := json.Marshal(m)
		b.Description = cpDescPrefix + string(j)
	}
	build := func() {
		b.Disks = b.Disks[:0]
		for _, d := range c.disks {
			b.Disks = append(b.Disks, virt.BackupDisk{Target: d.name, Incremental: d.old, Scratch: lv.scratch(d), Track: d.persistent})
		}
	}
	build()
	if err := lv.dom.BeginBackup(ctx, b); err != nil {
		if virt.NoAnswer(err) {
			return c.learnBegin(ctx, err)
		}
		return err
	}
	lv.made = lv.cp != ""
	lv.started = true
	c.sock = lv.sock
	c.point = lifeboat.Point{VM: c.p.VM.Name, ID: c.id, Instant: time.Now().UTC(), Consistency: lifeboat.Crash, Definition: c.def}
	return nil
}

// learnBegin finds out what libvirt did with a backup-begin that got no
// answer (the cycle's context ended, the connection broke): it may have begun
// the backup, and made the new checkpoint with it. Until that is known the
// backup counts as begun, so that settle leaves the scratch files QEMU may
// have open (the next cycle ends a backup of lifeboat's left running before
// it removes them). The call's connection is closed by then: libvirt is asked
// on a new one, bounded, and what it says is marked for settle to end and
// delete as after any failed cycle. It returns cause with what was found.
func (c *cycle) learnBegin(ctx context.Context, cause error) error {
	lv := c.lv
	lv.started, lv.made = true, lv.cp != ""
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
	defer cancel()
	began, err := lv.askBegun(cctx)
	if err != nil {
		c.log.Error("the backup's begin got no answer and libvirt could not be asked whether it began: the next cycle ends a backup of lifeboat's left running, and hides its checkpoint", "domain", lv.dom.Name, "err", err)
		return fmt.Errorf("%w; libvirt could not be asked afterwards whether the backup began: %w", cause, err)
	}
	lv.started = began
	if lv.cp != "" {
		cps, err := lv.dom.Checkpoints(cctx)
		if err == nil {
			lv.made = slices.ContainsFunc(cps, func(cp virt.Checkpoint) bool { return cp.Name == lv.cp })
		}
	}
	c.log.Warn("the backup's begin got no answer; libvirt, asked afterwards, says what it did, and that is ended as after a failed cycle",
		"domain", lv.dom.Name, "backup_began", began, "checkpoint", lv.cp, "checkpoint_made", lv.made)
	if !began && !lv.made {
		return fmt.Errorf("%w; libvirt, asked afterwards, had not begun the backup", cause)
	}
	return fmt.Errorf("%w; libvirt, asked afterwards, had begun the backup (checkpoint %q made: %v): it is ended and the checkpoint deleted, as after any failed cycle", cause, lv.cp, lv.made)
}

// askBegun reconnects to libvirt and waits, bounded by ctx, until a
// backup-begin cut off mid-call is over: lifeboat's backup runs (true), or
// the domain runs no job (false). A begin still in progress holds the
// domain's job before its backup shows.
func (lv *virtCycle) askBegun(ctx context.Context) (bool, error) {
	if err := lv.redial(ctx, lv.domain()); err != nil {
		return false, err
	}
	dom := lv.domain()
	for {
		running, sock, err := dom.BackupRunning(ctx)
		if err != nil {
			return false, err
		}
		if running {
			return sock == lv.sock, nil // one backup at a time: another tool's means ours did not begin
		}
		job, err := dom.Job(ctx)
		if err != nil {
			return false, err
		}
		if job == "" {
			return false, nil
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("libvirt domain %q still runs a %s job: %w", dom.Name, job, context.Cause(ctx))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// describePoint completes the point from the backup's exports (each disk's
// size), once the guest is thawed. Each disk must still be the images, of
// the size, that the cycle resolved before the instant (from the backup on,
// libvirt refuses to detach the disk or start another block job on it):
// otherwise the checks of its base were of other images, the scratch and
// the record of another size, and no point is taken.
func (c *cycle) describePoint(ctx context.Context) error {
	lv := c.lv
	desc, err := lv.dom.Describe(ctx)
	if err != nil {
		return err
	}
	for _, d := range c.disks {
		i := slices.IndexFunc(desc.Disks, func(dk virt.Disk) bool { return dk.Target == d.name })
		if i < 0 {
			return fmt.Errorf("libvirt domain %q: disk %q went while the cycle prepared its instant: no point is taken; the next cycle takes the domain's disks as they are then", lv.dom.Name, d.name)
		}
		was, now := lv.images[d.name], identify(desc.Disks[i].Chain)
		if !slices.EqualFunc(was, now, imageID.same) {
			c.log.Warn("disk replaced during the cycle, before its instant: the point is not taken", "disk", d.name, "images", chainString(now), "was_images", chainString(was))
			return fmt.Errorf("libvirt domain %q: disk %q was replaced while the cycle prepared its instant (it reads %s instead of %s): no point is taken; the next cycle takes the disk as it is then",
				lv.dom.Name, d.name, chainString(now), chainString(was))
		}
		cl, err := nbd.Dial(ctx, "unix:"+lv.sock, d.export, nbd.Options{})
		if err != nil {
			return fmt.Errorf("disk %q: the backup's NBD export: %w", d.name, err)
		}
		size := cl.Size()
		cl.Close()
		if size != d.size {
			c.log.Warn("disk resized during the cycle, before its instant: the point is not taken", "disk", d.name, "size", size, "was", d.size)
			return fmt.Errorf("libvirt domain %q: disk %q was resized from %d to %d bytes while the cycle prepared its instant: no point is taken of it at its old size; the next cycle resyncs it at its new size",
				lv.dom.Name, d.name, d.size, size)
		}
		c.point.Disks = append(c.point.Disks, lifeboat.PointDisk{Name: d.name, Size: d.size, Resync: d.old == "",
			Lineage: d.lineage, Base: d.base, BaseGeneration: d.old, Generation: d.new})
	}
	c.log = c.log.With("point", c.id)
	return nil
}

// prepareScratch makes each disk's scratch file before the instant, as the
// QMP path makes its fleece overlays: the budgets of Safety (a cycle without
// room is refused before anything starts), a qcow2 of the disk's size
// reserved up to its budget past its end (the copy-before-write lands in
// blocks that are already its own and cannot fail for want of space), owned
// by QEMU's user. The backup reuses it; settle removes it.
func (c *cycle) prepareScratch(ctx context.Context) error {
	lv := c.lv
	for _, d := range c.disks {
		n, err := lv.dom.Capacity(ctx, d.name)
		if err != nil {
			return err
		}
		d.size = n
		if why := resizedWhy(c.history(d.name), n); why != "" && d.old != "" {
			d.why = why
			c.log.Info("disk will be sent whole", "disk", d.name, "why", d.why)
			d.old, d.dirty = "", ""
		}
	}
	budgets, err := c.fleeceBudgets()
	if err != nil {
		return err
	}
	lv.budgets = budgets
	for i, d := range c.disks {
		f := lv.scratch(d)
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the scratch file a previous cycle left: %w", err)
		}
		if err := qemu.CreateImage(ctx, f, "qcow2", d.size, "", ""); err != nil {
			return fmt.Errorf("disk %q: scratch file: %w", d.name, err)
		}
		if lv.desc.UID >= 0 {
			if err := os.Chown(f, lv.desc.UID, lv.desc.GID); err != nil {
				return fmt.Errorf("disk %q: give the scratch file to QEMU's user: %w", d.name, err)
			}
		}
		unsupported, err := qemu.Reserve(f, budgets[i])
		if err != nil {
			return fmt.Errorf("disk %q: reserve %s for the scratch file: %w", d.name, mib(budgets[i]), err)
		}
		if unsupported {
			c.p.warnOnce("unreserved:"+f, "the scratch directory's file system cannot reserve space (no fallocate): the scratch is watched, but a neighbour filling the file system could still make a copy fail the VM's write; put state_dir on ext4, xfs or tmpfs", "scratch", f)
		}
	}
	return nil
}

// removeScratch removes the scratch files (reused, so libvirt leaves them).
func (lv *virtCycle) removeScratch(disks []*diskState) error {
	var errs []error
	for _, d := range disks {
		if err := os.Remove(lv.scratch(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// scratch is where QEMU keeps, during the cycle, what the guest overwrites of disk d.
func (lv *virtCycle) scratch(d *diskState) string {
	return filepath.Join(lv.run, d.name+".scratch.qcow2")
}

// watchScratch ends the backup when a scratch file outgrows half its budget
// (see Safety): ending the job takes the copy-before-write filter out of the
// guest's write path before the file system fills, so a copy can never fail
// the guest's write. The cycle then fails with ErrScratchFull as its cause.
// The watch goes on, past the cycle's reads and its commit, until settle has
// ended the backup (the guest's writes are copied into the scratch until
// then); settled waits only for a break in progress to be said.
func (c *cycle) watchScratch(ctx context.Context) (_ context.Context, settled func(), _ error) {
	budgets := c.lv.budgets
	ctx, cancel := context.WithCancelCause(ctx)
	stop := make(chan struct{})
	done := make(chan struct{})
	var breaking sync.Mutex // held from a break's first word to its last
	go func() {
		defer close(done)
		// A stat of each scratch file every 10 ms; the other half of the
		// budget covers what the guest writes until the backup has ended.
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			for i, d := range c.disks {
				var st syscall.Stat_t
				if syscall.Stat(c.lv.scratch(d), &st) != nil {
					continue
				}
				// The file's size, not its blocks: the reservation's
				// blocks are allocated from the start.
				if used := st.Size; used > budgets[i]/2 {
					breaking.Lock()
					defer breaking.Unlock()
					seen := time.Now()
					// Said before the backup ends: the cycle's reads fail from then on.
					first := fmt.Errorf("disk %q: the backup's scratch file passed half its budget of %s (%s): %w", d.name, mib(budgets[i]), mib(used), ErrScratchFull)
					c.lv.setBroken(first)
					cancel(first)
					ectx, ecancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
					eerr := c.lv.endBackup(ectx)
					ecancel()
					if eerr != nil {
						c.log.Error("ending the backup whose scratch outgrew its budget failed", "err", eerr)
					}
					peak := used
					if syscall.Stat(c.lv.scratch(d), &st) == nil {
						peak = st.Size
					}
					err := fmt.Errorf("disk %q: the backup's scratch file passed half its budget of %s (%s); the backup was ended %v later, the scratch then holding %s: %w",
						d.name, mib(budgets[i]), mib(used), time.Since(seen).Round(time.Millisecond), mib(peak), ErrScratchFull)
					c.lv.mu.Lock()
					c.lv.broken = err // the same, with how the ending went
					c.lv.mu.Unlock()
					return
				}
			}
		}
	}()
	var once sync.Once
	c.lv.unwatch = func() { once.Do(func() { close(stop); <-done; cancel(nil) }) }
	return ctx, func() { breaking.Lock(); breaking.Unlock() }, nil
}

// ErrScratchFull is the cause of a cycle whose backup was ended because a
// scratch file outgrew its budget.
var ErrScratchFull = errors.New("backup scratch outgrew its budget")

func (lv *virtCycle) setBroken(err error) {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	if lv.broken == nil {
		lv.broken = err
	}
}

func (lv *virtCycle) err() error {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	return lv.broken
}

// endBackup ends lifeboat's backup job and waits, bounded by ctx, until
// libvirt has confirmed it stopped.
func (lv *virtCycle) endBackup(ctx context.Context) error {
	if err := lv.do(ctx, func(d *virt.Domain) error { return d.AbortBackup(ctx) }); err != nil {
		return err
	}
	for {
		var running bool
		err := lv.do(ctx, func(d *virt.Domain) (err error) {
			running, _, err = d.BackupRunning(ctx)
			return err
		})
		if err != nil || !running {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("libvirt domain %q: the backup job did not end: %w", lv.domain().Name, context.Cause(ctx))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// domain is the domain on the cycle's current connection.
func (lv *virtCycle) domain() *virt.Domain {
	lv.connMu.Lock()
	defer lv.connMu.Unlock()
	return lv.dom
}

// redialTries bounds how often do reconnects for one call.
const redialTries = 5

// do runs a call on the domain. When it gets no answer because the
// connection broke (libvirtd restarted, as a package upgrade does; a
// network blip on a remote URI) and ctx allows, do connects again and
// repeats it: libvirtd keeps the domain's jobs across its restart, so the
// cleanup must reach them. Only idempotent calls go through do.
func (lv *virtCycle) do(ctx context.Context, f func(d *virt.Domain) error) error {
	for try := 1; ; try++ {
		d := lv.domain()
		err := f(d)
		if !virt.NoAnswer(err) || try == redialTries || ctx.Err() != nil {
			return err
		}
		if rerr := lv.redial(ctx, d); rerr != nil {
			return fmt.Errorf("%w; connecting to libvirt again: %w", err, rerr)
		}
		if lv.log != nil {
			lv.log.Warn("the connection to libvirt broke (libvirtd restarted?): connected again to end what this cycle began", "uri", cmpStr(lv.uri, virt.DefaultURI), "err", err)
		}
	}
}

// redial replaces the connection that old's call broke on with a new one,
// bounded by ctx; a connection another caller made since is kept.
func (lv *virtCycle) redial(ctx context.Context, old *virt.Domain) error {
	lv.connMu.Lock()
	defer lv.connMu.Unlock()
	if lv.dom != old {
		return nil
	}
	if lv.conn == nil {
		return errors.New("no connection of this cycle's to make again")
	}
	for {
		conn, err := virt.Dial(ctx, lv.uri)
		if err == nil {
			var dom *virt.Domain
			if dom, err = conn.Domain(ctx, old.Name); err == nil {
				lv.conn.Close()
				lv.conn, lv.dom = conn, dom
				return nil
			}
			conn.Close()
		}
		select {
		case <-ctx.Done(): // libvirtd restarting takes a moment: wait, bounded
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// settle ends the backup and keeps the checkpoints that prove a base:
// after a commit only this cycle's; after a failure only the base; when the
// commit's outcome is unknown both, for the next cycle to choose. Those kept
// are hidden again; the others are deleted with their bitmaps. libvirt keeps
// every checkpoint's bitmap recording, so deleting one never loses
// another's writes.
//
// Every call reconnects when the connection broke (see do). What still could
// not be done is in the error, which says what was left in libvirt: the
// next cycle ends a backup of lifeboat's left running and hides its
// checkpoints before anything else.
func (lv *virtCycle) settle(ctx context.Context, c *cycle, committed, unknown bool) error {
	var errs []error
	if lv.started {
		if err := lv.endBackup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("lifeboat's backup job still runs in libvirt domain %q (its NBD server at %s, the copy-before-write of the guest's writes into the scratch files in %s, no longer watched once this cycle returns; `virsh domjobabort %s` ends it): %w",
				lv.domain().Name, lv.sock, lv.run, lv.domain().Name, err))
		} else {
			lv.started = false
		}
	}
	if lv.unwatch != nil {
		lv.unwatch() // the backup is over, or this cycle can do no more
	}
	if !lv.started {
		// The backup is over (or never began): QEMU holds no scratch file.
		if err := lv.removeScratch(c.disks); err != nil {
			errs = append(errs, fmt.Errorf("remove the scratch files: %w", err))
		}
	}
	fail := func(what, name string, err error) {
		// The next cycle keeps only what proves its base; nothing is lost.
		c.log.Error("checkpoint bookkeeping failed; the next cycle repairs it", "checkpoint", name, "what", what, "err", err)
	}
	hide := func(name string) {
		if err := lv.hide(ctx, name); err != nil {
			fail("hide", name, err)
			errs = append(errs, fmt.Errorf("lifeboat's checkpoint %q stays visible in libvirt (other backup tools may refuse to run beside it): %w", name, err))
		}
	}
	if lv.made {
		if committed || unknown {
			hide(lv.cp)
		} else if err := lv.do(ctx, func(d *virt.Domain) error { return d.DeleteCheckpoint(ctx, lv.cp) }); err != nil {
			fail("delete", lv.cp, err)
		}
	}
	for _, name := range lv.shown {
		hide(name)
	}
	if committed {
		for _, cp := range lv.ours {
			c.warnDetached(cp)
			if err := lv.drop(ctx, cp.Name); err != nil {
				fail("delete", cp.Name, err)
			}
		}
	}
	return errors.Join(errs...)
}

// warnDetached says which disks checkpoint cp tracked that are no longer
// the domain's (virsh detach-disk): deleting cp leaves their bitmap in their
// image, beyond libvirt's reach, recording whenever a VM opens it (and in the way of an
// internal snapshot's revert once the image is attached again).
func (c *cycle) warnDetached(cp virt.Checkpoint) {
	m, _ := ourCheckpoint(cp, c.p.Target.Peer())
	for _, disk := range cp.Disks {
		if slices.ContainsFunc(c.lv.desc.Disks, func(d virt.Disk) bool { return d.Target == disk }) {
			continue
		}
		image := "IMAGE"
		if ch := m.Images[disk]; len(ch) > 0 && ch[0].Path != "" {
			image = ch[0].Path
		}
		c.log.Warn("a disk left the domain with a bitmap of lifeboat's in its image, which libvirt cannot reach and which records every write whenever a VM opens the image: remove it while no VM has the image open",
			"domain", c.lv.dom.Name, "disk", disk, "image", image, "bitmap", cp.Name, "command", "qemu-img bitmap --remove "+image+" "+cp.Name)
	}
}

// hideLeftovers hides checkpoints of ours that a cycle interrupted before
// its end left in libvirt, keeping their records.
func (lv *virtCycle) hideLeftovers(ctx context.Context, peer string, log *slog.Logger) error {
	if err := os.MkdirAll(lv.saved, 0o700); err != nil {
		return fmt.Errorf("lifeboat's checkpoint records: %w", err)
	}
	cps, err := lv.dom.Checkpoints(ctx)
	if err != nil {
		return err
	}
	for _, cp := range cps {
		if _, ok := ourCheckpoint(cp, peer); ok {
			log.Info("hiding a checkpoint of lifeboat's that an interrupted cycle left in libvirt", "checkpoint", cp.Name)
			if err := lv.hide(ctx, cp.Name); err != nil {
				return err
			}
		}
	}
	return nil
}

// hide records a checkpoint's XML in state_dir and deletes its libvirt
// metadata; its bitmaps go on recording.
func (lv *virtCycle) hide(ctx context.Context, name string) error {
	var doc string
	err := lv.do(ctx, func(d *virt.Domain) (err error) {
		doc, err = d.CheckpointXML(ctx, name)
		return err
	})
	if err != nil {
		return err
	}
	if doc, err = virt.Orphan(doc); err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(lv.record(name), []byte(doc), 0o600); err != nil {
		return fmt.Errorf("record checkpoint %q: %w", name, err)
	}
	return lv.do(ctx, func(d *virt.Domain) error { return d.HideCheckpoint(ctx, name) })
}

// drop deletes a hidden checkpoint with its bitmaps: libvirt is given it
// back to delete it. One whose bitmaps are gone only loses its record.
func (lv *virtCycle) drop(ctx context.Context, name string) error {
	doc, err := os.ReadFile(lv.record(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	err = lv.do(ctx, func(d *virt.Domain) error { return d.RedefineCheckpoint(ctx, string(doc)) })
	if err != nil && !virt.IsBrokenCheckpoint(err) {
		return err
	} else if err == nil {
		if err := lv.do(ctx, func(d *virt.Domain) error { return d.DeleteCheckpoint(ctx, name) }); err != nil {
			return err
		}
	}
	return os.Remove(lv.record(name))
}

func (lv *virtCycle) record(name string) string { return filepath.Join(lv.saved, name+".xml") }

// hidden reads the records of lifeboat's hidden checkpoints.
func (lv *virtCycle) hidden() ([]virt.Checkpoint, error) {
	ents, err := os.ReadDir(lv.saved)
	if err != nil {
		return nil, fmt.Errorf("lifeboat's checkpoint records: %w", err)
	}
	var out []virt.Checkpoint
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".xml")
		if !ok {
			continue
		}
		doc, err := os.ReadFile(filepath.Join(lv.saved, e.Name()))
		if err != nil {
			return nil, err
		}
		cp, err := virt.ParseCheckpoint(string(doc))
		if err != nil || cp.Name != name {
			return nil, fmt.Errorf("lifeboat's checkpoint record %s is damaged (%v): remove it (its disk is then resynchronised)", filepath.Join(lv.saved, e.Name()), err)
		}
		out = append(out, cp)
	}
	return out, nil
}

// showBases gives libvirt back the base checkpoint of the disks that have
// one; a base libvirt refuses (its bitmaps missing or inconsistent: a disk
// restored from a copy, QEMU killed) makes its disks whole syncs.
func (c *cycle) showBases(ctx context.Context) error {
	lv := c.lv
	for _, d := range c.disks {
		if d.old == "" || slices.Contains(lv.shown, d.old) {
			continue
		}
		doc, err := os.ReadFile(lv.record(d.old))
		if err == nil {
			err = lv.dom.RedefineCheckpoint(ctx, string(doc))
		}
		if err == nil {
			lv.shown = append(lv.shown, d.old)
			continue
		}
		if !virt.IsBrokenCheckpoint(err) && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		base := d.old
		for _, o := range c.disks {
			if o.old == base {
				o.why = fmt.Sprintf("libvirt refuses checkpoint %q (%v): a hash resync will run", base, err)
				c.log.Warn("disk will be sent whole", "disk", o.name, "why", o.why)
				o.old, o.dirty = "", ""
			}
		}
	}
	return nil
}

func (lv *virtCycle) close() {
	lv.connMu.Lock()
	defer lv.connMu.Unlock()
	if lv.conn != nil {
		lv.conn.Close()
	}
}

package protect

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/nbd"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// boundedCleanup is how long teardown and rollback may take after a failure.
const boundedCleanup = 30 * time.Second

type cycle struct {
	p      *Protector
	log    *slog.Logger
	mon    *qemu.Monitor
	fleece *qemu.Fleece
	sock   string
	id     uint64
	disks  []*diskState
	point  lifeboat.Point
	latest lifeboat.Point
	stream lifeboat.PointSink
	lv     *virtCycle // the libvirt path's state (nil on the QMP path)
	def    *lifeboat.Definition
	// quiet is a cycle of a guest that cannot write (shut down, or its CPUs
	// stopped): no freeze, and the point is as consistent as the guest left it.
	quiet      bool
	quietLevel lifeboat.Consistency // what the guest's state makes the point
	note       string               // says why, in the point

	changed, zero, same, dedup, data, sent, done atomic.Int64
	// sentBlocks is where each block content sent in this point went: a block
	// seen again is sent as a reference to it (deduplication within a point).
	sentMu     sync.Mutex
	sentBlocks map[lifeboat.Hash]blockRef
	total      int64
	start      time.Time
	// sendAt and commitAt are when the cycle began sending and committing:
	// its phases' times, for the log.
	sendAt, commitAt time.Time
	// nbdStarted: the cycle started the NBD server on sock, and close stops it.
	nbdStarted bool
	// unlock gives back the work dir's cycle lock (lockWorkDir).
	unlock func()
	// images are the disks' images, recorded once the point is committed.
	images []DiskImage
	// detached: a group member's step on its unanswering QEMU went on in
	// the background, which cleans up and unlocks the member (bounded).
	detached bool
}

func (c *cycle) run(ctx context.Context) (lifeboat.Point, error) {
	if c.p.VM.Libvirt != nil {
		return c.runLibvirt(ctx)
	}
	if err := c.prepareAll(ctx); err != nil {
		if !c.detached {
			c.close(ctx)
		}
		return lifeboat.Point{}, err
	}
	defer func() {
		if !c.detached {
			c.close(ctx)
		}
	}()
	q := c.p.Quiescer
	if c.quiet {
		q = nil // the guest is shut down or paused: nothing to freeze
	}
	frz, err := freeze(ctx, q)
	if err != nil {
		c.fleece.Teardown(context.WithoutCancel(ctx))
		return lifeboat.Point{}, err
	}
	log := c.log // a snapshot left running in the background (watched) may change c.log
	err = c.watched(ctx, "in the fleece transaction (the instant)", c.snapshot, c.undoInstant)
	frz.thaw(ctx, log)
	if err != nil {
		return lifeboat.Point{}, err
	}
	c.setLevel(frz)
	if c.quiet {
		c.point.Consistency, c.point.Note = c.quietLevel, c.note
	}
	if err := c.watched(ctx, "while its fleece was exported", c.export, c.undoInstant); err != nil {
		return lifeboat.Point{}, err
	}
	return c.transfer(ctx)
}

// prepareAll connects to the VM's QEMU and does all of the cycle that may
// come before the instant (prepare, prepareFleece). A QEMU that does not
// greet, or leaves a QMP command unanswered, for StallLimit fails it (see
// watched); whatever else takes long (another tool's NBD server to wait
// for, a slow recovery site) does not.
func (c *cycle) prepareAll(ctx context.Context) error {
	c.start = time.Now()
	stall := c.p.stallLimit()
	dctx, cancel := context.WithTimeoutCause(ctx, stall, fmt.Errorf("its QEMU did not greet within %v (hung or stopped?)", stall))
	m, err := qemu.Dial(dctx, c.p.VM.QMPSocket)
	cancel()
	if err != nil {
		return fmt.Errorf("connect to QMP %s: %w (is the VM running? check `qmp:` in the config)", c.p.VM.QMPSocket, err)
	}
	c.mon = m
	return c.watched(ctx, "while the cycle prepared (disks, generations, fleece nodes)", func(ctx context.Context) error {
		if err := c.prepare(ctx); err != nil {
			return err
		}
		c.report("snapshot", 0)
		if h := c.p.Hooks.BeforeFleece; h != nil {
			if err := h(ctx); err != nil {
				return err
			}
		}
		return c.prepareFleece(ctx)
	}, c.undoPrepare)
}

// prepare resolves the VM's disks and their generations on c.mon, and
// learns the recovery site's latest point.
func (c *cycle) prepare(ctx context.Context) error {
	p := c.p
	m := c.mon
	var err error
	// The work dir's lock, held until the cycle's NBD server is stopped, tells
	// another lifeboat that what this cycle adds to the VM's QEMU is a live
	// cycle's; and whatever the lock's previous holder left is a dead one's.
	if c.unlock, err = p.lockWorkDir(ctx); err != nil {
		return err
	}
	// A lifeboat that died mid-cycle may have left its fleece behind, keeping
	// the published generation busy, and its NBD server: clear them before
	// touching generations.
	removed, err := m.RemoveStale(ctx, p.liveElsewhere, p.ownNBDSockets()...)
	if len(removed) > 0 {
		c.log.Warn("removed from the VM's QEMU what a lifeboat cycle that is over left (killed mid-cycle?); the generations stay for this cycle to reconcile", "removed", strings.Join(removed, ", "))
	}
	if err != nil {
		return err
	}
	if c.sock, c.nbdStarted, err = p.nbdServer(ctx, m); err != nil {
		return err
	}
	nodes, err := p.disks(ctx, m)
	if err != nil {
		return err
	}
	// The record at the commit holds the images a failback can open, the
	// others left out: one left as an earlier commit had it would name an
	// image a disk no longer reads (a failback would write there), and its
	// files would not be those the next cycle compares (movedWhy).
	images, ok := imagesOf(nodes)
	if !ok {
		c.log.Debug("some disk is not a local qcow2 or raw image: the record of the images for a failback leaves it out")
	}
	c.images = images
	was := recordedFiles(p.VM.WorkDir)
	if err := c.learnLatest(ctx); err != nil {
		return err
	}
	names := make([]string, len(nodes))
	for i, n := range nodes {
		names[i] = n.Name
	}
	c.readDefinition(ctx, func(ctx context.Context) (lifeboat.Definition, error) { return m.Definition(ctx, names) })
	peer := p.Target.Peer()
	for _, n := range nodes {
		d := &diskState{name: n.Name, node: n.NodeName, file: n.Filename, size: n.Size, persistent: persistentBitmaps(n),
			export: "lifeboat-fleece-" + n.NodeName}
		h := c.history(n.Name)
		d.lineage, d.base = h.lineage, h.latest
		d.new = newGeneration(peer, h.lineage, c.id)
		d.whole = p.Whole
		d.old, d.why, err = reconcile(ctx, m, n.NodeName, n.Bitmaps, h, cmp.Or(c.wholeWhy(), resizedWhy(h, n.Size), movedWhy(h, n, was[n.Name])))
		if err != nil {
			return fmt.Errorf("disk %q: %w", n.Name, err)
		}
		if d.old == "" {
			c.log.Info("disk will be sent whole", "disk", d.name, "why", d.why)
		}
		c.disks = append(c.disks, d)
	}
	c.checkRunState(ctx)
	return nil
}

// checkRunState makes the cycle of a guest whose CPUs are stopped (paused by
// an admin, or by QEMU on a disk's I/O error; suspended; powered off with
// QEMU kept) a quiet one: its agent cannot answer, and the point is as
// consistent as the guest was when it stopped. Before, every such cycle
// waited the whole freeze limit for the agent and then fell back. A
// qemu-storage-daemon has no run state: its guest is another process.
func (c *cycle) checkRunState(ctx context.Context) {
	if c.quiet {
		return // a planned migration's: it knows how the guest stopped
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := c.mon.Execute(ctx, "query-status", nil, &st); err != nil || st.Status == "running" || st.Status == "" {
		return
	}
	c.quiet, c.quietLevel = true, lifeboat.Crash
	c.note = fmt.Sprintf("the guest's CPUs were stopped (QEMU's run state %q): nothing to freeze; the point is as consistent as the guest was when it stopped", st.Status)
	c.log.Info("the guest is not running: no freeze this cycle", "run_state", st.Status)
}

// wholeWhy is why every disk is sent whole, "" when it is not (Protector.Whole).
func (c *cycle) wholeWhy() string {
	if !c.p.Whole {
		return ""
	}
	return "asked to send the disk whole (`lifeboat sync --whole`): every block is read and sent again, whatever the recovery site holds"
}

// learnLatest asks the recovery site for the VM's latest point: this cycle's
// is the next.
func (c *cycle) learnLatest(ctx context.Context) error {
	latest, found, err := c.p.Target.Latest(ctx, c.p.VM.Name)
	if err != nil {
		return err
	}
	c.id = 1
	if found {
		c.latest = latest
		c.id = latest.ID + 1
	}
	return nil
}

// history is what the latest point says of disk name (a new lineage for a
// disk it does not hold: the disk's first sync here, or its first since
// lineages exist).
func (c *cycle) history(name string) history {
	h := history{peer: c.p.Target.Peer()}
	if ld, ok := diskOf(c.latest, name); c.latest.ID != 0 && ok {
		h.lineage, h.latest, h.gen, h.size = ld.Lineage, c.latest.ID, ld.Generation, ld.Size
	}
	if h.lineage == "" {
		h.lineage = newLineage()
	}
	return h
}

// prepareFleece readies the fleece of every disk, all but the instant itself,
// so that a guest is frozen only for the transaction.
func (c *cycle) prepareFleece(ctx context.Context) error {
	budgets, err := c.fleeceBudgets()
	if err != nil {
		return err
	}
	var fdisks []qemu.FleeceDisk
	for i, d := range c.disks {
		fdisks = append(fdisks, qemu.FleeceDisk{
			Node: d.node, File: c.fleeceFile(d),
			NewBitmap: d.new, OldBitmap: d.old, Persistent: d.persistent, ExportName: d.export,
			Granularity: qemu.TrackGranularity(d.size), Budget: budgets[i],
		})
	}
	fl, err := c.mon.PrepareFleece(ctx, fdisks)
	if err != nil {
		// The error names the disks by node: say which disks they are.
		return fmt.Errorf("fleece of disks %s: %w", c.diskNodes(), err)
	}
	c.fleece = fl
	return nil
}

// snapshot is the instant: one transaction over every disk of the VM (new
// generation, old one disabled, copy-before-write into the fleece).
func (c *cycle) snapshot(ctx context.Context) error {
	if err := c.fleece.Snapshot(ctx); err != nil {
		if errors.Is(err, qemu.ErrOutcomeUnknown) {
			// The error names the disks by node: say which disks they are.
			c.log.Warn("the fleece transaction got no reply; QEMU was asked what it did and that was undone", "disks", c.diskNodes(), "err", err)
		}
		return err
	}
	c.point = lifeboat.Point{VM: c.p.VM.Name, ID: c.id, Instant: c.fleece.Instant().UTC(), Consistency: lifeboat.Crash, Definition: c.def}
	for _, d := range c.disks {
		c.point.Disks = append(c.point.Disks, lifeboat.PointDisk{Name: d.name, Size: d.size, Resync: d.old == "",
			Lineage: d.lineage, Base: d.base, BaseGeneration: d.old, Generation: d.new})
	}
	c.log = c.log.With("point", c.id)
	return nil
}

// diskNodes names the cycle's disks with their nodes ("vda=node0,vdb=node1").
func (c *cycle) diskNodes() string {
	var disks []string
	for _, d := range c.disks {
		disks = append(disks, d.name+"="+d.node)
	}
	return strings.Join(disks, ",")
}

// export publishes the instant of every disk over NBD, once it is known to
// be of the disks the VM has: otherwise the fleece is rolled back.
func (c *cycle) export(ctx context.Context) error {
	if err := c.sameDisks(ctx); err != nil {
		c.rollback(ctx)
		return err
	}
	if err := c.fleece.Export(ctx); err != nil {
		return c.fleeceFailure(fmt.Errorf("fleece export: %w", err))
	}
	return nil
}

// sameDisks checks, after the instant, that each disk is still the node and
// image, of the size, that the cycle resolved before it: a disk replaced
// (its device's or export's node moved to another image) or resized in
// between would make a point of what the VM no longer had at the instant,
// under the size it had before. From the fleece's nodes on, QEMU refuses a
// resize (they take it away from the disk's node) until the cycle ends, so
// what this sees held at the instant. A disk removed (no device or export
// serves its node any more) is left: its node kept its last content, which
// the point holds.
func (c *cycle) sameDisks(ctx context.Context) error {
	all, err := c.mon.Disks(ctx)
	if err != nil {
		return fmt.Errorf("list disks after the instant: %w", err)
	}
	for _, d := range c.disks {
		n, byNode, err := qemu.FindDisk(all, d.name)
		if err != nil || byNode {
			// Removed, or a node no device or export uses, named in the
			// config: the node itself is the disk.
			if n, err = c.mon.Node(ctx, d.node); err != nil {
				return fmt.Errorf("disk %q: its node %q went before the instant: %w; the next cycle takes the VM's disks as they are then", d.name, d.node, err)
			}
		}
		switch {
		case n.NodeName != d.node || n.Filename != d.file:
			c.log.Warn("disk replaced during the cycle, before its instant: the point is not taken", "disk", d.name, "node", n.NodeName, "image", n.Filename, "was_node", d.node, "was_image", d.file)
			return fmt.Errorf("disk %q was replaced while the cycle prepared its instant (node %q, image %s, instead of node %q, image %s): the instant is of an image the VM no longer uses, so no point is taken; the next cycle takes the disk as it is then",
				d.name, n.NodeName, n.Filename, d.node, d.file)
		case n.Size != d.size:
			c.log.Warn("disk resized during the cycle, before its instant: the point is not taken", "disk", d.name, "size", n.Size, "was", d.size)
			return fmt.Errorf("disk %q was resized from %d to %d bytes while the cycle prepared its instant: no point is taken of it at its old size; the next cycle resyncs it at its new size",
				d.name, d.size, n.Size)
		}
	}
	return nil
}

// sameImages checks, once every block is read, that each disk's node still
// reads the image it read at the instant. QEMU lets a node be reopened onto
// another file (blockdev-reopen) under the fleece: the fleece then reads what
// the guest did not overwrite since the instant from that file, not from the
// instant's image.
func (c *cycle) sameImages(ctx context.Context) error {
	nodes, err := c.mon.Nodes(ctx)
	if err != nil {
		return fmt.Errorf("list block nodes after reading the instant: %w", err)
	}
	for _, d := range c.disks {
		i := slices.IndexFunc(nodes, func(n qemu.BlockNode) bool { return n.NodeName == d.node })
		if i < 0 {
			return fmt.Errorf("disk %q: its node %q went while its blocks were read: no point is taken", d.name, d.node)
		}
		if f := nodes[i].Filename; f != d.file {
			c.log.Warn("disk's node reopened onto another image while its blocks were read: the point is not taken", "disk", d.name, "node", d.node, "image", f, "was_image", d.file)
			return fmt.Errorf("disk %q: its node %q was reopened onto image %s while its blocks were read from %s: what was read since is not of the instant, so no point is taken; the next cycle resyncs the disk",
				d.name, d.node, f, d.file)
		}
	}
	return nil
}

// transfer sends the point and, whatever happens, tears the fleece down and
// settles the generations: the old one is dropped only after the commit.
func (c *cycle) transfer(ctx context.Context) (pt lifeboat.Point, err error) {
	p := c.p
	// committed: the recovery site holds the point. unknown: the commit may
	// or may not have landed and the site cannot be asked (it went away).
	committed, unknown := false, false
	defer func() {
		if c.stream != nil && !committed {
			c.stream.Abort()
		}
		if c.lv != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
			defer cancel()
			if serr := c.lv.settle(cctx, c, committed, unknown); serr != nil {
				c.log.Error("ending the libvirt backup failed; the next cycle ends and hides what was left", "err", serr)
				if err == nil {
					err = fmt.Errorf("point %d committed, but lifeboat could not clean up after it in libvirt: %w; the next cycle ends and hides what was left first", c.id, serr)
				}
			}
			return
		}
		if errors.Is(err, nbd.ErrStalled) && !committed && !unknown {
			// Its NBD server left a read unanswered: its QMP likely will
			// too. The fleece goes, and the generations are turned back,
			// as soon as QEMU answers; the cycle fails now.
			stall := p.stallLimit()
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hungWait)
			now := time.Now()
			n := &hangNote{what: fmt.Sprintf("the reads of its fleece (NBD) for %v while point %d was sent", stall, c.id), since: now.Add(-stall), until: now.Add(hungWait)}
			err = fmt.Errorf("%w: %w", c.detach(c.log, n, func() {
				defer cancel()
				c.settle(sctx, false, false)
			}), err)
			return
		}
		// Bounded by QEMU's answers, not by a total: a QEMU that stops
		// answering here has its fleece taken down in the background as
		// soon as it answers again, not left in its guest's write path.
		terr := c.watched(context.WithoutCancel(ctx), "while its fleece was taken down", func(ctx context.Context) error {
			return c.settle(ctx, committed, unknown)
		}, func(context.Context, error) {})
		if terr != nil && err == nil {
			err = fmt.Errorf("point %d committed, but fleece teardown failed: %w", c.id, terr)
		}
	}()
	var unwatch func()
	if c.lv != nil {
		// unwatch only waits for a break in progress: the scratch watch
		// goes on until settle has ended the backup.
		ctx, unwatch, err = c.watchScratch(ctx)
		if err != nil {
			return pt, err
		}
	} else {
		ctx, unwatch = c.watchFleece(ctx)
	}
	// fleeceFailure runs after unwatch: the watcher has said why by then.
	defer func() { err = c.fleeceFailure(err) }()
	defer unwatch()
	if h := p.Hooks.AfterInstant; h != nil {
		if err := h(ctx); err != nil {
			return pt, err
		}
	}
	pt, err = c.send(ctx, c.sock)
	if errors.Is(err, errCommitUnknown) {
		// The commit may have landed with its reply lost: ask.
		l, ok, lerr := p.Target.Latest(ctx, p.VM.Name)
		switch {
		case lerr == nil && ok && l.ID == c.id:
			c.log.Warn("commit reply lost but the point is committed", "err", err)
			pt, err = l, nil
		case lerr != nil:
			unknown = true
			c.log.Warn("the commit's outcome is unknown (the recovery site does not answer): both generations are kept until the next cycle learns it", "err", lerr)
		}
	}
	if err != nil {
		return pt, fmt.Errorf("point %d: %w", c.id, err)
	}
	committed = true
	return pt, nil
}

// bookkeepingFailed logs that settling disk d's generations after the
// cycle failed. The next cycle's reconcile folds whatever is left; nothing is
// lost. A node that is gone is a disk removed during the cycle (a -drive's
// node goes with its device once the fleece lets it go): its generations
// went with it, into its image where they persist, and the next cycle that
// finds the disk again reconciles them.
func (c *cycle) bookkeepingFailed(ctx context.Context, d *diskState, err error) {
	nodes, nerr := c.mon.Nodes(ctx)
	if nerr == nil && !slices.ContainsFunc(nodes, func(n qemu.BlockNode) bool { return n.NodeName == d.node }) {
		c.log.Info("the disk's node is gone (the disk was removed during the cycle): its generations went with it", "disk", d.name, "node", d.node)
		return
	}
	c.log.Error("generation bookkeeping failed; the next cycle repairs it", "disk", d.name, "err", err)
}

// settle tears the fleece down and settles the generations by the
// point's outcome: the old one is dropped only once the point is
// committed. It returns the teardown's failure.
func (c *cycle) settle(ctx context.Context, committed, unknown bool) error {
	terr := c.fleece.Teardown(ctx)
	if terr != nil {
		c.log.Error("fleece teardown failed", "err", terr)
	}
	m := c.mon
	for _, d := range c.disks {
		var berr error
		switch {
		case committed:
			if d.old != "" {
				berr = m.RemoveBitmap(ctx, d.node, d.old)
			}
		case unknown:
			// Both generations stay: the next cycle's reconcile takes the
			// new one if the point landed, and merges it into the old one
			// if not. Either way the cycle after is incremental.
		default:
			berr = rollback(ctx, m, d.node, d.old, d.new)
		}
		if berr != nil {
			c.bookkeepingFailed(ctx, d, berr)
		}
	}
	return terr
}

// close ends the cycle's hold on QEMU, on every path once its fleece is down
// (exports removed): it stops the NBD server the cycle started, bounded, and
// logs a failure (the next cycle's RemoveStale stops it), then leaves QMP.
func (c *cycle) close(ctx context.Context) {
	if c.nbdStarted {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), boundedCleanup)
		if err := c.mon.NBDServerStop(cctx); err != nil {
			c.log.Error("could not stop the NBD server lifeboat started in the VM's QEMU; the next cycle stops it", "socket", c.sock, "err", err)
		}
		cancel()
		c.nbdStarted = false
	}
	if c.unlock != nil {
		c.unlock()
		c.unlock = nil
	}
	if c.mon != nil {
		c.mon.Close()
	}
	if c.lv != nil {
		c.lv.close()
	}
}

// instantErr says why what was read since the instant may not be of the
// instant (the fleece or the backup broke), or nil.
func (c *cycle) instantErr() error {
	if c.lv != nil {
		return c.lv.err()
	}
	return c.fleece.Err()
}

// report sends progress, at most a few times a second.
func (c *cycle) report(phase string, sent int64) {
	if c.p.Progress == nil {
		return
	}
	c.p.Progress(Progress{VM: c.p.VM.Name, Point: c.point.ID, Phase: phase, Done: c.done.Load(), Total: c.total, Sent: sent})
}

// hasDisk reports whether the point holds a disk of that name.
func hasDisk(p lifeboat.Point, name string) bool {
	_, ok := diskOf(p, name)
	return ok
}

// diskOf returns the point's disk of that name.
func diskOf(p lifeboat.Point, name string) (lifeboat.PointDisk, bool) {
	for _, d := range p.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return lifeboat.PointDisk{}, false
}

func (c *cycle) send(ctx context.Context, sock string) (lifeboat.Point, error) {
	p := c.p
	readers := cmp.Or(p.Readers, DefaultReaders)
	chunk := max(cmp.Or(p.ChunkSize, DefaultChunkSize)/lifeboat.BlockSize, 1)
	conns := cmp.Or(p.Connections, DefaultConnections)

	// Plan every disk before sending anything, so progress knows the total.
	var plans []*diskPlan
	for _, d := range c.disks {
		ctxs := []string{"base:allocation"}
		if d.old != "" {
			ctxs = append(ctxs, d.dirtyContext())
		}
		cl, err := nbd.Dial(ctx, "unix:"+sock, d.export, nbd.Options{MetaContexts: ctxs, Connections: conns, MaxInFlight: readers * 2, Stall: p.stallLimit()})
		if err != nil {
			return lifeboat.Point{}, fmt.Errorf("disk %q: read fleece export %q: %w", d.name, d.export, err)
		}
		defer cl.Close()
		var known map[int64]lifeboat.Hash
		if d.old == "" && hasDisk(c.latest, d.name) && !d.whole {
			if known, err = p.Target.BlockMap(ctx, p.VM.Name, d.name); err != nil {
				return lifeboat.Point{}, err
			}
		}
		var more func(*diskPlan) error
		if ct, ok := p.Target.(ChangedTarget); ok && d.old != "" {
			// A resync compares every allocated block's hash already.
			more = func(pl *diskPlan) error { return pl.addTargetChanges(ctx, p.VM.Name, ct) }
		}
		pl, err := planDisk(ctx, cl, d, known, more)
		if err != nil {
			return lifeboat.Point{}, fmt.Errorf("disk %q: %w", d.name, err)
		}
		pl.known0 = d.old == "" && !d.whole // on a resync, a block the replica never got is zero there
		plans = append(plans, pl)
		c.total += pl.changed
	}
	if h := p.Hooks.AfterPlan; h != nil {
		if err := h(ctx); err != nil {
			return lifeboat.Point{}, err
		}
	}
	st, err := p.Target.Begin(ctx, c.point)
	if err != nil {
		return lifeboat.Point{}, err
	}
	c.stream = st
	c.sendAt = time.Now()
	c.report("send", 0)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		work     = make(chan job, readers*2)
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(err error) { errOnce.Do(func() { firstErr = err; cancel() }) }
	for range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk*lifeboat.BlockSize)
			hashes := make([]lifeboat.Hash, 0, chunk)
			for j := range work {
				if ctx.Err() != nil {
					continue
				}
				if err := c.readAndSend(ctx, j, buf, hashes); err != nil {
					fail(err)
				}
			}
		}()
	}
	ticker := time.NewTicker(250 * time.Millisecond)
	defer ticker.Stop()
produce:
	for _, pl := range plans {
		for _, r := range pl.runs(chunk) {
			if r.zero {
				if err := c.sendZeroes(pl, r); err != nil {
					fail(err)
					break produce
				}
				continue
			}
			select {
			case work <- job{plan: pl, run: r}:
			case <-ctx.Done():
				break produce
			}
			select {
			case <-ticker.C:
				c.report("send", c.sent.Load())
			default:
			}
		}
	}
	close(work)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return lifeboat.Point{}, firstErr
	}
	if h := p.Hooks.BeforeCommit; h != nil {
		if err := h(ctx); err != nil {
			return lifeboat.Point{}, err
		}
	}
	if err := c.instantErr(); err != nil {
		return lifeboat.Point{}, err // what was read may be from after the instant
	}
	if c.lv == nil {
		if err := c.sameImages(ctx); err != nil {
			return lifeboat.Point{}, err
		}
	}
	if c.lv == nil {
		// Every block is read: the copy-before-write leaves the guest's write
		// path now rather than after the recovery site's commit (the bitmaps
		// stay as they are until the commit's outcome decides).
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), min(boundedCleanup, p.stallLimit()))
		if err := c.fleece.Teardown(cctx); err != nil {
			c.log.Warn("fleece teardown before the commit failed; it is tried again after", "err", err)
		}
		cancel()
	}
	c.commitAt = time.Now()
	c.report("commit", c.sent.Load())
	stats := lifeboat.CycleStats{
		BytesChanged: c.changed.Load(), BytesZero: c.zero.Load(), BytesSame: c.same.Load(), BytesDedup: c.dedup.Load(),
		BytesData: c.data.Load(), BytesSent: c.sent.Load(), Duration: time.Since(c.start),
	}
	pt, err := st.Commit(stats)
	if err != nil {
		return lifeboat.Point{}, fmt.Errorf("%w: %w", errCommitUnknown, err)
	}
	return pt, nil
}

// maxDedupBlocks bounds the deduplication index of one point (about 80 MiB):
// past 64 GiB of distinct data in one point, later blocks are not indexed.
const maxDedupBlocks = 1 << 20

// blockRef is a block of a disk.
type blockRef struct {
	disk string
	off  int64
}

// dupOf returns where a block of this content was already sent in this point.
func (c *cycle) dupOf(h lifeboat.Hash) (blockRef, bool) {
	c.sentMu.Lock()
	defer c.sentMu.Unlock()
	r, ok := c.sentBlocks[h]
	return r, ok
}

// remember records blocks that were sent, once their message is on its way:
// a reference never overtakes the data it refers to.
func (c *cycle) remember(disk string, off int64, hashes []lifeboat.Hash) {
	c.sentMu.Lock()
	defer c.sentMu.Unlock()
	if c.sentBlocks == nil {
		c.sentBlocks = make(map[lifeboat.Hash]blockRef)
	}
	for i, h := range hashes {
		if len(c.sentBlocks) >= maxDedupBlocks {
			return
		}
		if _, ok := c.sentBlocks[h]; !ok {
			c.sentBlocks[h] = blockRef{disk, off + int64(i)*lifeboat.BlockSize}
		}
	}
}

type job struct {
	plan *diskPlan
	run  run
}

func (c *cycle) sendZeroes(pl *diskPlan, r run) error {
	off, n := pl.span(r)
	c.changed.Add(n)
	c.done.Add(n)
	if pl.known0 && pl.allKnownZero(r) {
		c.same.Add(n)
		return nil
	}
	c.zero.Add(n)
	return c.stream.SendZeroes(pl.disk.name, off, n)
}

// readAndSend reads one run of changed blocks from the fleece, hashes every block,
// and sends the data blocks and the zero blocks among them, skipping on a resync
// the blocks the recovery site already holds.
func (c *cycle) readAndSend(ctx context.Context, j job, buf []byte, hashes []lifeboat.Hash) error {
	pl := j.plan
	off, n := pl.span(j.run)
	data := buf[:n]
	if err := pl.client.Read(ctx, data, off); err != nil {
		return fmt.Errorf("disk %q: read offset %d length %d from the fleece: %w", pl.disk.name, off, n, err)
	}
	c.changed.Add(n)
	defer c.done.Add(n)

	// Split the run into sub-runs of blocks to send, zeros, and blocks already there.
	type kind int
	const (
		send kind = iota
		zero
		skip
		dup
		patch // one block changed in part (pl.partial): its changed parts
	)
	var (
		runStart int64 = -1
		runKind  kind
		refs     []blockRef
	)
	hashes = hashes[:0]
	flush := func(end int64) error {
		if runStart < 0 {
			return nil
		}
		o, l := off+runStart, end-runStart
		switch runKind {
		case send:
			sent, err := c.stream.SendBlocks(pl.disk.name, o, data[runStart:end], hashes)
			if err != nil {
				return err
			}
			c.data.Add(l)
			c.sent.Add(sent)
			c.remember(pl.disk.name, o, hashes)
		case dup:
			for i, r := range refs {
				bo := o + int64(i)*lifeboat.BlockSize
				n := min(lifeboat.BlockSize, o+l-bo)
				if err := c.stream.SendCopy(pl.disk.name, bo, r.disk, r.off, int(n), hashes[i]); err != nil {
					return err
				}
				c.sent.Add(int64(len(r.disk)) + 64) // the reference's size on the wire, roughly
			}
			c.dedup.Add(l)
		case zero:
			c.zero.Add(l)
			if err := c.stream.SendZeroes(pl.disk.name, o, l); err != nil {
				return err
			}
		case skip:
			c.same.Add(l)
		case patch:
			sent, err := c.stream.SendPatch(pl.disk.name, o, data[runStart:end], hashes[0], pl.partial[o/lifeboat.BlockSize])
			if err != nil {
				return err
			}
			c.data.Add(l)
			c.sent.Add(sent)
			// Not a deduplication source: the receiver has only its changed
			// parts from this point.
		}
		runStart = -1
		hashes = hashes[:0]
		refs = refs[:0]
		return nil
	}
	for b := int64(0); b < n; b += lifeboat.BlockSize {
		e := min(b+lifeboat.BlockSize, n)
		blk := data[b:e]
		idx := (off + b) / lifeboat.BlockSize
		k := send
		var h lifeboat.Hash
		if lifeboat.AllZero(blk) {
			k = zero
			if pl.known0 && pl.knownZero(idx) {
				k = skip
			}
		} else {
			h = lifeboat.HashBlock(blk)
			if pl.known != nil && pl.known[idx] == h {
				k = skip
			} else if _, ok := c.dupOf(h); ok {
				k = dup
			} else if _, ok := pl.partial[idx]; ok {
				k = patch
			}
		}
		if runStart >= 0 && (k != runKind || k == patch) {
			if err := flush(b); err != nil {
				return err
			}
		}
		if runStart < 0 {
			runStart, runKind = b, k
		}
		switch k {
		case send, patch:
			hashes = append(hashes, h)
		case dup:
			r, _ := c.dupOf(h)
			hashes = append(hashes, h)
			refs = append(refs, r)
		}
	}
	return flush(n)
}

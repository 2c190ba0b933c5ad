package daemon

import (
	"context"
	"errors"
	"fmt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// Daemon is one running site.
type Daemon struct {
	cfg *Config
	log *slog.Logger
	ctx context.Context // Run's: work the daemon starts in the background ends with it

	store    *recovery.Store
	runs     *failover.Manager // at a recovery site: VMs started from their points
	failback *failback.Store   // at a site with `listen:`: failbacks of its own VMs taken from their recovery site
	server   *wire.Server
	rev      *pki.Revocations // the CA's revocation list as this site holds it (nil: no checks)
	vmsMu    sync.RWMutex
	vms      map[string]*vm // the VMs it protects: its config's, and those protected in reverse (reverse.go)
	groups   map[string]*group
	metrics  *metrics

	bg       sync.WaitGroup // schedules started after Run began (reverse.go): Run waits for them
	bgClosed bool           // Run is ending: no more of them (guarded by vmsMu)

	mu      sync.Mutex
	peers   map[string]*wire.Client
	backs   map[string]*FailingBack // at a recovery site: failbacks of the VMs it runs, by VM (guarded by mu)
	undoing map[string]bool         // at a recovery site: VMs whose failover is being undone (guarded by mu)
}

// New prepares a site from its config; Run starts it.
func New(cfg *Config, log *slog.Logger) *Daemon {
	if log == nil {
		log = slog.Default()
	}
	d := &Daemon{cfg: cfg, log: log.With("site", cfg.Site), vms: map[string]*vm{}, groups: map[string]*group{}, peers: map[string]*wire.Client{}, backs: map[string]*FailingBack{}, undoing: map[string]bool{}}
	for _, vc := range cfg.VMs {
		d.vms[vc.Name] = newVM(d, vc)
	}
	for _, gc := range cfg.Groups {
		d.groups[gc.Name] = newGroup(d, gc)
	}
	d.metrics = newMetrics(d)
	return d
}

// Run serves the site until ctx ends: the recovery service if `listen` is set, the
// protected VMs' schedules, and the local API.
func (d *Daemon) Run(ctx context.Context) error {
	if err := d.checkOwnCertificate(); err != nil {
		return err
	}
	// The state dir first: it records the newest revocation list accepted.
	if err := os.MkdirAll(d.cfg.StateDir, 0o750); err != nil {
		return fmt.Errorf("state_dir %s: %w", d.cfg.StateDir, err)
	}
	rev, err := d.revocations()
	if err != nil {
		return err
	}
	d.rev = rev
	unlock, err := d.lockStateDir()
	if err != nil {
		return err
	}
	defer unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	d.ctx = ctx
	errc := make(chan error, 4)
	if c := d.certificateStatus(time.Now()); c != nil && c.Warning != "" {
		d.log.Warn("site certificate "+c.Warning, "file", c.File)
	}
	go d.watchRevocationList(ctx)
	// A guest this site left frozen when it died is thawed before its VM's
	// next freeze: in the background by the VM's quiescer, which falls back
	// meanwhile; a VM no longer configured here delays the start a minute at
	// most, and not at all when its QEMU is gone.
	protect.ThawLeftovers(d.frozenDir(), d.vmQuiescer, d.log)

	if d.cfg.Listen == "" {
		if err := d.checkNoRuns(); err != nil {
			return err
		}
	}
	if d.cfg.Listen != "" {
		st, err := recovery.Open(ctx, filepath.Join(d.cfg.StateDir, "recovery"), recovery.Options{Keep: d.cfg.Keep, Owners: d.cfg.Owners, Logger: d.log})
		if err != nil {
			return err
		}
		d.store = st
		defer st.Close()
		d.runs = &failover.Manager{Store: st, Dir: filepath.Join(d.cfg.StateDir, "failover"), Site: d.cfg.Site,
			Networks: d.cfg.Networks, Libvirt: d.cfg.Libvirt, CommitAfter: time.Duration(d.cfg.CommitAfter), Overrides: d.cfg.overrides(), Log: d.log}
		// Before any failover can start: a start this site's stop cut short
		// left a pin that would hold retention for good.
		if err := d.runs.ReleaseCrashedStarts(ctx); err != nil {
			d.log.Error("failover starts cut short by a stop of this site", "err", err)
		}
		tlsConf, err := pki.ServerTLS(d.tlsFiles())
		if err != nil {
			return fmt.Errorf("config %s: tls: %w", d.cfg.Path(), err)
		}
		l, err := net.Listen("tcp", d.cfg.Listen)
		if err != nil {
			return fmt.Errorf("config %s: listen %s: %w", d.cfg.Path(), d.cfg.Listen, err)
		}
		fb, err := failback.NewStore(filepath.Join(d.cfg.StateDir, "failback"), d.log)
		if err != nil {
			return err
		}
		defer fb.Close(context.WithoutCancel(ctx))
		d.failback = fb
		// A failback finished before this site stopped, its VM not
		// replicating from here since: bring it home (home.go).
		for vm, fold := range fb.HomePending() {
			if v, ok := d.vmOf(vm); ok {
				v.comeHome(ctx, fold)
			}
		}
		// A VM failed over from here comes home through the same listener.
		fbSite := &failback.Site{Store: fb, RunDir: filepath.Join(d.cfg.StateDir, "failback", "run"), Log: d.log, VM: d.failbackVM, Recovery: st}
		d.server = &wire.Server{Site: d.cfg.Site, Store: failback.Routed{Failback: fb, Other: wire.RecoveryStore(st)}, Log: d.log, Revocations: rev,
			StartVM: d.startForOwner, TakeFailback: fbSite.Take, EndFailback: d.endFailback(fbSite.Finish),
			ReverseVM: fbSite.Reverse, ContactFile: filepath.Join(d.cfg.StateDir, "contacts.json")}
		d.runs.LastContact = d.server.LastContact
		go func() { errc <- d.server.Serve(l, tlsConf) }()
		defer d.server.Stop()
		if d.runs.CommitAfter > 0 {
			go d.commitPolicy(ctx)
		}
		d.log.Info("recovery service listening", "addr", l.Addr().String())
	}

	configured := d.vmNames() // before the API can add VMs protected in reverse
	api, err := d.listenAPI()
	if err != nil {
		return err
	}
	go func() { errc <- api.Serve() }()
	defer api.Close()

	var wg sync.WaitGroup
	for _, name := range configured {
		v, _ := d.vmOf(name)
		wg.Add(1)
		go func() { defer wg.Done(); v.schedule(ctx) }()
	}
	for _, g := range d.groups {
		wg.Add(1)
		go func() { defer wg.Done(); g.schedule(ctx) }()
	}
	defer d.bg.Wait()
	defer wg.Wait()
	defer func() {
		d.vmsMu.Lock()
		d.bgClosed = true
		d.vmsMu.Unlock()
	}()
	defer cancel()
	if d.runs != nil {
		d.protectReversed()
	}

	d.log.Info("site running", "api", d.cfg.API, "vms", len(d.vmNames()))
	select {
	case <-ctx.Done():
		d.log.Info("site stopping")
		return nil
	case err := <-errc:
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		return err
	}
}

// checkNoRuns refuses to start a site without `listen:` whose state_dir
// holds VMs started from restore points here: without the recovery service
// nothing would commit, undo, stop or fail them back, and their pins would
// hold retention when it comes back.
func (d *Daemon) checkNoRuns() error {
	runs, err := (&failover.Manager{Dir: filepath.Join(d.cfg.StateDir, "failover")}).Runs("")
	if err != nil || len(runs) == 0 {
		return err
	}
	var names []string
	for _, r := range runs {
		names = append(names, fmt.Sprintf("vm %s: %s %s from point %d", r.VM, r.Kind(), r.ID, r.Point))
	}
	return fmt.Errorf("config %s: no `listen:`, but this site was a recovery site and runs VMs started from its restore points (%s): without the recovery service nothing could commit, undo, stop or fail them back. Put `listen:` back and end them first (`lifeboat failover VM --test --stop`, `--undo`, or `lifeboat failback VM --finalize`)",
		d.cfg.Path(), strings.Join(names, "; "))
}

// checkOwnCertificate refuses to start a site whose certificate names
// another site: every peer would refuse it, or take it for that site.
func (d *Daemon) checkOwnCertificate() error {
	if d.cfg.TLS.Cert == "" {
		return nil
	}
	c, err := pki.LoadCert(d.cfg.TLS.Cert)
	if err != nil {
		return nil // the TLS setup says what is wrong with the file
	}
	site, err := pki.CertSite(c)
	if err != nil || site == d.cfg.Site {
		return nil
	}
	return fmt.Errorf("config %s: this is site %q, but its certificate %s is site %q's: peers would refuse this site, or take it for %q; set `site: %s`, or issue this site a certificate of its own (`lifeboat cert site %s`)",
		d.cfg.Path(), d.cfg.Site, d.cfg.TLS.Cert, site, site, site, d.cfg.Site)
}

// CRLSeenFile, in a site's state_dir, records the newest revocation list the
// site accepted: an older one is refused, across restarts too.
const CRLSeenFile = "crl-seen.json"

func (d *Daemon) tlsFiles() pki.Files {
	crl := d.cfg.TLS.CRL
	if crl == "" && d.cfg.TLS.CA != "" {
		crl = filepath.Join(filepath.Dir(d.cfg.TLS.CA), pki.CRLFile)
	}
	return pki.Files{CA: d.cfg.TLS.CA, Cert: d.cfg.TLS.Cert, Key: d.cfg.TLS.Key, CRL: crl, CRLSeen: filepath.Join(d.cfg.StateDir, CRLSeenFile)}
}

// revocations reads the CA's revocation list as the site starts: one that
// does not read or check stops the start (never ignored: a revoked peer
// would be served), as does a `crl:` named but missing. The wire server
// checks its peers against it, and each dial reads it likewise (ClientTLS).
func (d *Daemon) revocations() (*pki.Revocations, error) {
	if d.cfg.TLS.CA == "" {
		return nil, nil
	}
	f := d.tlsFiles()
	if d.cfg.TLS.CRL != "" {
		if _, err := os.Stat(f.CRL); err != nil {
			return nil, fmt.Errorf("config %s: tls: crl: %w; copy %s from the CA's directory (`lifeboat cert revoke` writes it there), or remove `crl:` while nothing is revoked", d.cfg.Path(), err, pki.CRLFile)
		}
	}
	rev, err := pki.LoadRevocations(f)
	if err != nil {
		return nil, fmt.Errorf("config %s: tls: %w; the site does not start without a revocation list it can read", d.cfg.Path(), err)
	}
	return rev, nil
}

// peer returns a connection to a recovery site, dialling it on first use.
func (d *Daemon) peer(ctx context.Context, name string) (*wire.Client, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c, ok := d.peers[name]; ok {
		return c, nil
	}
	pc, ok := d.cfg.Peer(name)
	if !ok {
		return nil, fmt.Errorf("peer %q is not in the config", name)
	}
	host, _, err := net.SplitHostPort(pc.Address)
	if err != nil {
		return nil, fmt.Errorf("config %s: peer %q address %q: %w", d.cfg.Path(), name, pc.Address, err)
	}
	tlsConf, err := pki.ClientTLS(d.tlsFiles(), host)
	if err != nil {
		return nil, fmt.Errorf("config %s: tls: %w", d.cfg.Path(), err)
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c, err := wire.Dial(dctx, pc.Address, tlsConf, d.cfg.Site, pc.Name, wire.Compression(pc.Compression))
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", name, err)
	}
	d.peers[name] = c
	return c, nil
}

// dropPeer forgets the cached client c of peer name when err says the peer
// could not be reached (a restarted peer): the next call dials it afresh
// instead of failing at once while gRPC backs off.
func (d *Daemon) dropPeer(name string, c *wire.Client, err error) {
	if status.Code(err) != codes.Unavailable {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.peers[name] == c {
		delete(d.peers, name)
		c.Close()
	}
}

// vmOf is the VM of that name this site protects.
func (d *Daemon) vmOf(name string) (*vm, bool) {
	d.vmsMu.RLock()
	defer d.vmsMu.RUnlock()
	v, ok := d.vms[name]
	return v, ok
}

func (d *Daemon) vmNames() []string {
	d.vmsMu.RLock()
	defer d.vmsMu.RUnlock()
	names := make([]string, 0, len(d.vms))
	for n := range d.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// startForOwner starts a VM from point for its owner's planned migration.
func (d *Daemon) startForOwner(ctx context.Context, vm string, point uint64) (wire.FailoverResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	r, err := d.runs.Start(ctx, vm, failover.Options{Point: point, Planned: true})
	if err != nil {
		return wire.FailoverResult{}, err
	}
	res := wire.FailoverResult{Run: r.ID, Point: r.Point, ToRunning: r.ToRunning}
	if r.Owner != nil {
		res.Epoch = r.Owner.Epoch
	}
	return res, nil
}

// commitPolicy commits, every 15 s, the failovers left undecided for the
// config's commit_after.
func (d *Daemon) commitPolicy(ctx context.Context) {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if _, err := d.runs.CommitDue(now); err != nil {
				d.log.Error("commit policy", "err", err)
			}
		}
	}
}

package daemon

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// The local API is HTTP with JSON over a unix socket: nothing listens
// unauthenticated on a network, and file permissions say who may use it.
// Long operations answer with newline-delimited JSON events.

// Event is one line of a streamed answer: progress, then a result or an error.
type Event struct {
	Progress any                    `json:"progress,omitempty"`
	Point    *lifeboat.Point        `json:"point,omitempty"`
	Points   []lifeboat.Point       `json:"points,omitempty"`
	Verify   *recovery.VerifyReport `json:"verify,omitempty"`
	Plan     []failover.PlanVM      `json:"plan,omitempty"` // a plan run's summary
	// Finalized is what a failback's finalize did.
	Finalized *failback.Finalized `json:"finalized,omitempty"`
	Error     string              `json:"error,omitempty"`
}

// ExportRequest asks for a point's disk as an image file on this site.
type ExportRequest struct {
	Point  uint64 `json:"point"` // 0 = latest
	Disk   string `json:"disk"`
	Out    string `json:"out"`
	Format string `json:"format"`
}

type apiServer struct {
	d   *Daemon
	srv *http.Server
	l   net.Listener
}

func (d *Daemon) listenAPI() (*apiServer, error) {
	if err := os.MkdirAll(filepath.Dir(d.cfg.API), 0o750); err != nil {
		return nil, fmt.Errorf("api_socket %s: %w", d.cfg.API, err)
	}
	if c, err := net.DialTimeout("unix", d.cfg.API, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("api_socket %s: another lifeboat serves this site already; stop it first", d.cfg.API)
	}
	os.Remove(d.cfg.API) // a stale socket of a stopped daemon
	l, err := net.Listen("unix", d.cfg.API)
	if err != nil {
		return nil, fmt.Errorf("api_socket %s: %w", d.cfg.API, err)
	}
	os.Chmod(d.cfg.API, 0o600)
	a := &apiServer{d: d, l: l}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", a.status)
	mux.Handle("GET /metrics", d.metrics.handler())
	mux.HandleFunc("POST /v1/vms/{vm}/sync", a.sync)
	mux.HandleFunc("GET /v1/vms/{vm}/points", a.points)
	mux.HandleFunc("POST /v1/vms/{vm}/export", a.export)
	mux.HandleFunc("POST /v1/vms/{vm}/verify", a.verify)
	mux.HandleFunc("POST /v1/vms/{vm}/handover", a.handover)
	mux.HandleFunc("POST /v1/vms/{vm}/failover", a.failover)
	mux.HandleFunc("POST /v1/vms/{vm}/migrate", a.migrate)
	mux.HandleFunc("POST /v1/vms/{vm}/failback", a.failback)
	mux.HandleFunc("POST /v1/vms/{vm}/reverse", a.reverse)
	mux.HandleFunc("POST /v1/vms/{vm}/unprotect", a.unprotect)
	mux.HandleFunc("POST /v1/vms/{vm}/forget", a.forget)
	mux.HandleFunc("POST /v1/plans/{name}/run", a.planRun)
	mux.HandleFunc("POST /v1/plans/{name}/stop", a.planStop)
	mux.HandleFunc("GET /v1/runs", a.runs)
	mux.HandleFunc("POST /v1/runs/{id}", a.runAction)
	// A request's work (a sync, a failback cycle) ends with the site: when
	// the site stops, its context is cancelled, the work cleans up (the
	// fleece and exports it added to the VM's QEMU, the point it was
	// sending) and Close waits for that.
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context { return cmp.Or(d.ctx, context.Background()) }}
	return a, nil
}

func (a *apiServer) Serve() error {
	err := a.srv.Serve(a.l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// apiStopBound bounds the wait at a site's stop for the API's requests,
// cancelled by then, to clean up and end.
const apiStopBound = 30 * time.Second

func (a *apiServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), apiStopBound)
	defer cancel()
	return a.srv.Shutdown(ctx)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, Event{Error: err.Error()})
}

// stream answers with NDJSON events as they come.
type stream struct {
	w   http.ResponseWriter
	enc *json.Encoder
}

func newStream(w http.ResponseWriter) *stream {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	return &stream{w: w, enc: json.NewEncoder(w)}
}

func (s *stream) send(e Event) {
	s.enc.Encode(e)
	if f, ok := s.w.(http.Flusher); ok {
		f.Flush()
	}
}

// StatusReply is `lifeboat status`.
type StatusReply struct {
	Site string    `json:"site"`
	Time time.Time `json:"time"`
	// Certificate is the site certificate's end of validity: when it
	// passes, every peer refuses this site and replication stops.
	Certificate *CertificateStatus `json:"certificate,omitempty"`
	// RevocationList is the CA's revocation list this site holds: its
	// number, when its next update is due, and a warning when that is near
	// or past, or when the list is refused (every peer is refused then).
	RevocationList *RevocationListStatus `json:"revocation_list,omitempty"`
	VMs            []VMStatus            `json:"vms"`
}

// CertificateStatus is when the site's own certificate ends (tls.cert).
type CertificateStatus struct {
	File     string    `json:"file"`
	NotAfter time.Time `json:"not_after"`
	DaysLeft float64   `json:"days_left"`
	Warning  string    `json:"warning,omitempty"` // within certWarnDays, or expired: what to do
}

// certWarnDays is how long before its end a site certificate is shown as due.
const certWarnDays = 30

// certificateStatus reads the site certificate's dates (nil without one).
func (d *Daemon) certificateStatus(now time.Time) *CertificateStatus {
	if d.cfg.TLS.Cert == "" {
		return nil
	}
	c, err := pki.LoadCert(d.cfg.TLS.Cert)
	if err != nil {
		return &CertificateStatus{File: d.cfg.TLS.Cert, Warning: err.Error()}
	}
	s := &CertificateStatus{File: d.cfg.TLS.Cert, NotAfter: c.NotAfter.UTC(), DaysLeft: c.NotAfter.Sub(now).Hours() / 24}
	switch {
	case s.DaysLeft <= 0:
		s.Warning = fmt.Sprintf("expired on %s: every peer refuses this site; issue it again (`lifeboat cert site %s`), taken at the next connection", s.NotAfter.Format(time.DateOnly), d.cfg.Site)
	case s.DaysLeft <= certWarnDays:
		s.Warning = fmt.Sprintf("expires on %s, in %.0f days: issue it again (`lifeboat cert site %s`), taken at the next connection without a restart", s.NotAfter.Format(time.DateOnly), s.DaysLeft, d.cfg.Site)
	}
	return s
}

// RevocationListStatus is the revocation list a site holds (tls.crl).
type RevocationListStatus struct {
	File       string    `json:"file"`
	Number     string    `json:"number,omitempty"`
	NextUpdate time.Time `json:"next_update,omitzero"`
	DaysLeft   float64   `json:"days_left"`
	Warning    string    `json:"warning,omitempty"` // refused, or its next update within certWarnDays or past: what to do
}

// revocationListStatus says which list rev holds and whether it needs the
// operator (nil: no list, or no revocation checks). A list past its next
// update is still enforced: see pki.Revocations.
func revocationListStatus(rev *pki.Revocations, now time.Time) *RevocationListStatus {
	st := rev.Status()
	if st == nil {
		return nil
	}
	s := &RevocationListStatus{File: st.File, Number: st.Number}
	renew := fmt.Sprintf("sign it again (`lifeboat cert crl --ca DIR`, where `lifeboat cert ca` made the CA) and copy %s to every site, taken without a restart", pki.CRLFile)
	switch {
	case st.Err != nil:
		s.Warning = "refused, so every peer is refused: " + st.Err.Error()
	case st.NextUpdate.IsZero():
	default:
		s.NextUpdate = st.NextUpdate.UTC()
		s.DaysLeft = st.NextUpdate.Sub(now).Hours() / 24
		switch {
		case s.DaysLeft <= 0:
			s.Warning = fmt.Sprintf("its next update was due on %s: %s; until then this site goes on enforcing it, and refuses no peer for its age", s.NextUpdate.Format(time.DateOnly), renew)
		case s.DaysLeft <= certWarnDays:
			s.Warning = fmt.Sprintf("its next update is due on %s, in %.0f days: %s", s.NextUpdate.Format(time.DateOnly), s.DaysLeft, renew)
		}
	}
	return s
}

// revocationListWarnEvery is how often a running site logs that its
// revocation list needs the operator.
const revocationListWarnEvery = 24 * time.Hour

// watchRevocationList logs, at start and then daily, a revocation list
// whose next update is near or past, or that is refused.
func (d *Daemon) watchRevocationList(ctx context.Context) {
	t := time.NewTicker(revocationListWarnEvery)
	defer t.Stop()
	for {
		if s := revocationListStatus(d.rev, time.Now()); s != nil && s.Warning != "" {
			d.log.Warn("revocation list "+s.Warning, "file", s.File, "number", s.Number)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (a *apiServer) status(w http.ResponseWriter, r *http.Request) {
	now := time.Now().UTC()
	out := StatusReply{Site: a.d.cfg.Site, Time: now, Certificate: a.d.certificateStatus(now), RevocationList: revocationListStatus(a.d.rev, now), VMs: []VMStatus{}}
	for _, name := range a.d.vmNames() {
		v, _ := a.d.vmOf(name)
		v.reversedHere() // its state says so, whether or not its schedule ran since
		s := v.status(now)
		if a.d.failback != nil {
			if fb, ok := a.d.failback.Status(name); ok {
				s.Failback, s.State = &fb, "failing-back"
			}
		}
		out.VMs = append(out.VMs, s)
	}
	if a.d.store != nil {
		names, err := a.d.store.VMs()
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err)
			return
		}
		for _, name := range names {
			pts, err := a.d.store.Points(name)
			if err != nil {
				writeErr(w, http.StatusInternalServerError, err)
				return
			}
			s := VMStatus{VM: name, Role: "replica", State: "replica", Points: len(pts)}
			if o, ok, err := a.d.store.Owner(name); err == nil && ok {
				s.Owner, s.Epoch = o.Site, o.Epoch
				switch {
				case o.FailedOver:
					s.State = stateFailedOverHere
					s.Detail = fmt.Sprintf("failed over here from point %d at %s, but no run of it is recorded here", o.FromPoint, o.Since.UTC().Format(time.RFC3339))
				case o.Epoch > 1:
					s.Detail = fmt.Sprintf("replica, handed to %s at %s (epoch %d)", o.Site, o.Since.UTC().Format(time.RFC3339), o.Epoch)
				}
			}
			if why, ok := a.d.store.RetentionHeld(name); ok {
				// Up to twice keep points, for good if the VM sends no more.
				s.Detail = cmp.Or(s.Detail, s.State) + fmt.Sprintf("; %d points, keep %d: retention waits: %s", len(pts), a.d.store.Keep(), why)
			}
			if f, ok := a.d.store.RetentionFailure(name); ok {
				// A merge that failed holds the VM's oldest points until it finishes.
				s.LastError, s.ErrorAt = "retention: "+f.Err, &f.At
			}
			s.FailingBack = a.d.backStatus(name)
			if err := a.runStatus(&s); err != nil {
				writeErr(w, http.StatusInternalServerError, err)
				return
			}
			if len(pts) > 0 {
				last := pts[len(pts)-1]
				s.LastPoint = &last
				s.RPO = last.Age(now).Seconds()
				if m := last.Damaged; m != nil && m.Missing != "" && s.LastError == "" {
					s.LastError, s.ErrorAt = fmt.Sprintf("the latest point %d reads the image %s of disk %s, which is gone: put it back and restart the site, or `lifeboat forget %s --yes` and let its protected site send it whole", last.ID, m.Missing, m.Disk, name), &m.At
				} else if m != nil && s.LastError == "" {
					// Every point after it reads the damage too, until a whole send.
					s.LastError, s.ErrorAt = fmt.Sprintf("the latest point %d reads a damaged block of disk %s at offset %d (found by the verify of point %d): `lifeboat sync %s --whole` at its protected site repairs the replica", last.ID, m.Disk, m.Offset, m.Point, name), &m.At
				}
			}
			out.VMs = append(out.VMs, s)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *apiServer) sync(w http.ResponseWriter, r *http.Request) {
	if g, ok := a.d.groups[r.PathValue("vm")]; ok {
		a.syncGroup(w, r, g)
		return
	}
	v, ok := a.d.vmOf(r.PathValue("vm"))
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q is not protected by site %q (see `vms:` in %s)", r.PathValue("vm"), a.d.cfg.Site, a.d.cfg.Path()))
		return
	}
	ch, stop := v.watch()
	defer stop()
	streamCycle(newStream(w), ch, func() (lifeboat.Point, error) { return v.sync(r.Context(), wantWhole(r), true) })
}

// wantWhole reports whether a sync asks for every disk sent whole (?whole=1).
func wantWhole(r *http.Request) bool { return r.URL.Query().Get("whole") == "1" }

// streamCycle runs cycle and streams the progress it reports on ch, then its
// point or its error.
func streamCycle(st *stream, ch <-chan protect.Progress, cycle func() (lifeboat.Point, error), more ...func(*Event)) {
	type result struct {
		pt  lifeboat.Point
		err error
	}
	done := make(chan result, 1)
	go func() {
		pt, err := cycle()
		done <- result{pt, err}
	}()
	for {
		select {
		case p := <-ch:
			st.send(Event{Progress: p})
		case res := <-done:
			if res.err != nil {
				st.send(Event{Error: res.err.Error()})
				return
			}
			e := Event{Point: &res.pt}
			for _, f := range more {
				f(&e)
			}
			st.send(e)
			return
		}
	}
}

// syncGroup runs a group cycle; progress events come from every member.
func (a *apiServer) syncGroup(w http.ResponseWriter, r *http.Request, g *group) {
	st := newStream(w)
	merged := make(chan protect.Progress, 16)
	for _, v := range g.members {
		ch, stop := v.watch()
		defer stop()
		go func() {
			for p := range ch {
				select {
				case merged <- p:
				default:
				}
			}
		}()
	}
	type result struct {
		pts []lifeboat.Point
		err error
	}
	done := make(chan result, 1)
	go func() {
		pts, err := g.sync(r.Context(), wantWhole(r), true)
		done <- result{pts, err}
	}()
	for {
		select {
		case p := <-merged:
			st.send(Event{Progress: p})
		case res := <-done:
			e := Event{Points: res.pts}
			if res.err != nil {
				e.Error = res.err.Error()
			}
			st.send(e)
			return
		}
	}
}

func (a *apiServer) points(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if a.d.store != nil {
		pts, err := a.d.store.Points(name)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err)
			return
		}
		if _, protected := a.d.vmOf(name); len(pts) > 0 || !protected {
			writeJSON(w, http.StatusOK, pointList(pts))
			return
		}
	}
	v, ok := a.d.vmOf(name)
	if !ok {
		writeErr(w, http.StatusNotFound, fmt.Errorf("vm %q: site %q neither protects it nor holds its points", name, a.d.cfg.Site))
		return
	}
	peer, err := a.d.peer(r.Context(), v.cfg.Peer)
	if err != nil {
		writeErr(w, http.StatusBadGateway, err)
		return
	}
	pts, err := peer.Points(r.Context(), name)
	if err != nil {
		writeErr(w, http.StatusBadGateway, err)
		return
	}
	writeJSON(w, http.StatusOK, pointList(pts))
}

// pointList is pts, or an empty list for none: a list in JSON either way,
// never null.
func pointList(pts []lifeboat.Point) []lifeboat.Point {
	if pts == nil {
		return []lifeboat.Point{}
	}
	return pts
}

func (a *apiServer) needStore(w http.ResponseWriter, vm string) bool {
	if a.d.store == nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("vm %q: site %q is not a recovery site (no `listen:`) and holds no points: run this on the recovery site", vm, a.d.cfg.Site))
		return false
	}
	return true
}

func (a *apiServer) export(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if !a.needStore(w, name) {
		return
	}
	var req ExportRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("export request: %w", err))
		return
	}
	if err := a.d.exportOut(name, req.Out); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	pt, err := a.d.store.Point(name, req.Point)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	disk, err := exportDisk(name, pt, req)
	if err != nil {
		if pts, perr := a.d.store.Points(name); perr == nil {
			err = heldElsewhere(err, name, pt, pts, req)
		}
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	// pt.ID, not req.Point: "latest" must not move between the lookup and the export.
	if err := a.d.store.Export(r.Context(), name, pt.ID, disk, req.Out, req.Format); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, Event{Point: &pt})
}

// exportOut refuses an export's out that is not an absolute path (the site
// would read it against its own working directory), or that lies in the
// site's state_dir, symbolic links followed: the export's rename would
// replace a file of the site's own (a point's image, the catalog, a
// failover's overlay) with the exported image.
func (d *Daemon) exportOut(vm, out string) error {
	if !filepath.IsAbs(out) {
		return fmt.Errorf("vm %q: export to %q: give the image's absolute path on this site (`lifeboat export` makes -o absolute)", vm, out)
	}
	resolved := func(p string) string {
		// The directory: out itself may not exist yet.
		dir, err := filepath.EvalSymlinks(filepath.Dir(p))
		if err != nil {
			return filepath.Clean(p)
		}
		return filepath.Join(dir, filepath.Base(p))
	}
	state, err := filepath.EvalSymlinks(d.cfg.StateDir)
	if err != nil {
		state = d.cfg.StateDir
	}
	for _, p := range []string{filepath.Clean(out), resolved(out)} {
		if rel, err := filepath.Rel(state, p); err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return fmt.Errorf("vm %q: export to %s: that is inside this site's state_dir %s, whose files are its points and records, and an export there could replace one: give a path outside it", vm, out, d.cfg.StateDir)
		}
	}
	return nil
}

// exportDisk is the disk an export request means: the one it names, or the
// point's only disk when it names none. Otherwise the error lists the disks
// and shows the command to type.
func exportDisk(vm string, pt lifeboat.Point, req ExportRequest) (string, error) {
	names := make([]string, len(pt.Disks))
	for i, d := range pt.Disks {
		if d.Name == req.Disk {
			return d.Name, nil
		}
		names[i] = d.Name
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "", fmt.Errorf("vm %q point %d holds no disk", vm, pt.ID)
	}
	if req.Disk == "" && len(names) == 1 {
		return names[0], nil
	}
	point := "latest"
	if req.Point != 0 {
		point = strconv.FormatUint(pt.ID, 10)
	}
	example := exportCommand(vm, point, names[0], req)
	if req.Disk == "" {
		return "", fmt.Errorf("vm %q point %d has %d disks (%s): say which one to export with --disk, e.g. `%s`",
			vm, pt.ID, len(names), strings.Join(names, ", "), example)
	}
	return "", fmt.Errorf("vm %q point %d has no disk %q; its disks are: %s (e.g. `%s`)",
		vm, pt.ID, req.Disk, strings.Join(names, ", "), example)
}

// heldElsewhere adds to err, exportDisk's for a disk point pt lacks, the
// point nearest before it that holds the disk (one removed from the VM since:
// its data is in the points from before), else the nearest after it (one
// added since), with the command to type.
func heldElsewhere(err error, vm string, pt lifeboat.Point, pts []lifeboat.Point, req ExportRequest) error {
	if req.Disk == "" {
		return err
	}
	var before, after *lifeboat.Point
	for i := range pts {
		p := &pts[i]
		if p.ID == pt.ID || !slices.ContainsFunc(p.Disks, func(d lifeboat.PointDisk) bool { return d.Name == req.Disk }) {
			continue
		}
		if p.ID < pt.ID {
			before = p
		} else if after == nil {
			after = p
		}
	}
	held, which := before, "the last before it to hold disk %q (the disk was removed from the VM since)"
	if held == nil {
		held, which = after, "the first to hold disk %q (the disk was added to the VM later)"
	}
	if held == nil {
		return err
	}
	return fmt.Errorf("%w; point %d (%s) is "+which+": `%s`",
		err, held.ID, held.Instant.Format(time.RFC3339), req.Disk, exportCommand(vm, strconv.FormatUint(held.ID, 10), req.Disk, req))
}

// exportCommand is the export to type for disk of point (an id or "latest"),
// to req's file and format.
func exportCommand(vm, point, disk string, req ExportRequest) string {
	format := ""
	if req.Format != "" && req.Format != "raw" {
		format = " --format " + req.Format
	}
	return fmt.Sprintf("lifeboat export %s --point %s --disk %s -o %s%s", vm, point, disk, cmp.Or(req.Out, "FILE"), format)
}

// VerifyProgress is a verify's progress event.
type VerifyProgress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

func (a *apiServer) verify(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if !a.needStore(w, name) {
		return
	}
	var id uint64 // 0: the latest
	if q := r.URL.Query().Get("point"); q != "" && q != "latest" {
		var err error
		if id, err = strconv.ParseUint(q, 10, 64); err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("vm %q: point %q is not a point ID: give one from `lifeboat points %s`, or latest", name, q, name))
			return
		}
	}
	st := newStream(w)
	last := time.Time{}
	rep, err := a.d.store.Verify(r.Context(), name, id, func(done, total int64) {
		if time.Since(last) > 250*time.Millisecond || done == total {
			last = time.Now()
			st.send(Event{Progress: VerifyProgress{Done: done, Total: total}})
		}
	})
	if err != nil {
		st.send(Event{Verify: &rep, Error: err.Error()})
		return
	}
	st.send(Event{Verify: &rep})
}

// runStatus adds a replica's runs from its points to its status, and says
// in its state whether it is failed over here or being tested.
func (a *apiServer) runStatus(s *VMStatus) error {
	runs, err := a.d.runs.Runs(s.VM)
	if err != nil {
		return err
	}
	tests := 0
	for _, r := range runs {
		s.Runs = append(s.Runs, RunStatus{ID: r.ID, Kind: r.Kind(), Point: r.Point, Started: r.Started, Running: r.Alive(), Committed: r.Committed})
		if !r.Test {
			s.State = stateFailedOverHere
		}
		switch {
		case r.Test:
			tests++
		case !r.Alive():
			s.Detail = fmt.Sprintf("failed over from point %d, QEMU gone: `lifeboat failover %s --undo` cleans up", r.Point, s.VM)
		case r.Committed:
			s.Detail = fmt.Sprintf("failed over from point %d, committed", r.Point)
		case !r.CommitBy.IsZero():
			s.Detail = fmt.Sprintf("failed over from point %d, waiting for --commit or --undo (commit_after commits it at %s)", r.Point, r.CommitBy.UTC().Format(time.RFC3339))
		default:
			s.Detail = fmt.Sprintf("failed over from point %d, waiting for --commit or --undo", r.Point)
		}
	}
	if tests > 0 {
		s.Detail = cmp.Or(s.Detail, s.State) + fmt.Sprintf(", %d test failover(s) running", tests)
	}
	return nil
}

package protect

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/qemu"
)

// What a cycle leaves in its work dir tells its leftovers in the VM's QEMU
// from another lifeboat's live cycle, without trusting the state_dir: the
// state_dir may have been moved, or the VM renamed, since a lifeboat was
// killed mid-cycle, and two deployments (each its own recovery site) may
// protect one VM.
const (
	// nbdSocketName is the NBD server socket a cycle starts in its work dir
	// when the VM names none (`nbd_socket:`).
	nbdSocketName = "lifeboat-nbd.sock"
	// legacyNBDSocketName is the socket's name before nbdSocketName: too
	// common a name (libvirt users give it to their backups' sockets) to
	// tell lifeboat's from another's without a cycle lock beside it.
	legacyNBDSocketName = "nbd.sock"
	// cycleLockName is the file whose flock a cycle holds from before it
	// touches the VM's QEMU (stale objects, its NBD server) until it has
	// stopped its server: the kernel drops it with the process, so a free
	// lock beside a socket or a fleece overlay means its cycle is over.
	cycleLockName = "lifeboat-cycle.lock"
	// lockWait bounds how long a cycle waits for its own work dir's lock,
	// which another lifeboat holds only for a moment to check it.
	lockWait = 5 * time.Second
)

// lockWorkDir takes the work dir's cycle lock for a cycle, recording who
// holds it. It fails when another process's cycle holds it beyond lockWait.
func (p *Protector) lockWorkDir(ctx context.Context) (unlock func(), err error) {
	dir := p.VM.WorkDir
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	path := filepath.Join(dir, cycleLockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cycle lock: %w", err)
	}
	deadline := time.Now().Add(lockWait)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("work dir %s: another lifeboat runs a cycle from it (%s): two lifeboats on one work dir would undo each other's work", dir, cmp.Or(strings.TrimSpace(string(holder)), "it did not say who it is"))
		}
		return nil, fmt.Errorf("cycle lock %s: %w", path, err)
	}
	f.Truncate(0)
	fmt.Fprintf(f, "pid %d, vm %q\n", os.Getpid(), p.VM.Name)
	return func() { f.Close() }, nil
}

// lockState is what the cycle lock of a work dir says.
type lockState int

const (
	lockAbsent lockState = iota // no lock there: no cycle of this lifeboat's ran from there, or the dir is gone
	lockHeld                    // a cycle under way holds it
	lockFree                    // its cycles are over: claimed, until release
)

// claimWorkDir takes the cycle lock of another work dir when no cycle holds
// it, so that none starts there until release; held is the holder's record.
func claimWorkDir(dir string) (st lockState, held string, release func()) {
	path := filepath.Join(dir, cycleLockName)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return lockAbsent, "", nil
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		return lockHeld, cmp.Or(strings.TrimSpace(string(b)), "no record"), nil
	}
	return lockFree, "", func() { f.Close() }
}

// liveElsewhere reports whether a fleece overlay belongs to a cycle under way
// from another work dir than this VM's (another lifeboat's, protecting the
// same VM): RemoveStale leaves such a fleece alone. The VM's own work dir's
// lock is this cycle's, so a fleece there is a dead one's.
func (p *Protector) liveElsewhere(overlay string) bool {
	dir := filepath.Dir(overlay)
	if dir == filepath.Clean(p.VM.WorkDir) {
		return false
	}
	st, held, release := claimWorkDir(dir)
	if release != nil {
		release()
	}
	if st == lockHeld {
		p.log().Info("a fleece in the VM's QEMU belongs to another lifeboat's cycle under way: left alone", "overlay", overlay, "holder", held)
	}
	return st == lockHeld
}

// runningServer is what lifeboat can tell of an NBD server running in the
// VM's QEMU that this cycle did not start.
type runningServer struct {
	socket string // where it listens, if it has a lifeboat socket's name
	// holder is the cycle lock's record of the lifeboat cycle under way
	// that runs it ("": none).
	holder string
	// over: a lifeboat cycle's that is over (killed): stopped by stopOver.
	over bool
	// unsure: it has a lifeboat socket's name, but whose it is cannot be
	// told (an older lifeboat's name, no lock beside it): left alone.
	unsure string
	// listens is where QEMU listens when no socket has lifeboat's name, and
	// err why that could not be learnt.
	listens []string
	err     error
	// release gives back the dead cycle's work dir claimed for stopOver.
	release func()
}

// examineServer looks where the VM's QEMU listens (QMP cannot say where its
// NBD server does) for a socket of lifeboat's name, and at the cycle lock in
// its directory. The rule for "a dead lifeboat cycle's": QEMU listens on a
// socket of lifeboat's name and either its directory's cycle lock is free (the
// kernel dropped it with the lifeboat; it is claimed until the server is
// stopped, so no cycle starts there meanwhile), or its directory is
// gone (a moved state_dir) with no client connected, so that nobody can reach
// it. A lock held is a live cycle's, whoever it is: never stopped. Anything
// else is left alone and waited for, as another tool's.
func (p *Protector) examineServer(m *qemu.Monitor) runningServer {
	ls, err := m.UnixListeners()
	if err != nil {
		return runningServer{err: err}
	}
	var s runningServer
	for _, l := range ls {
		name := filepath.Base(l.Path)
		if name != nbdSocketName && name != legacyNBDSocketName {
			if l.Path != p.VM.QMPSocket {
				s.listens = append(s.listens, l.Path)
			}
			continue
		}
		dir := filepath.Dir(l.Path)
		if dir == filepath.Clean(p.VM.WorkDir) {
			// This cycle holds the lock: a socket here is a dead cycle's.
			return runningServer{socket: l.Path, over: true}
		}
		st, held, release := claimWorkDir(dir)
		switch {
		case st == lockHeld:
			return runningServer{socket: l.Path, holder: held}
		case st == lockFree:
			return runningServer{socket: l.Path, over: true, release: release}
		case name == nbdSocketName && l.Clients == 0 && !exists(l.Path):
			return runningServer{socket: l.Path, over: true}
		case name == nbdSocketName:
			s.socket, s.unsure = l.Path, fmt.Sprintf("the socket is lifeboat's by its name, but %d clients are connected and no cycle lock says its cycle is over", l.Clients)
		default:
			s.socket, s.unsure = l.Path, "the socket has the name lifeboat gave its NBD socket before "+nbdSocketName+", with no cycle lock beside it: it may be lifeboat's own, left by a lifeboat killed mid-cycle whose state_dir was then moved or whose VM was renamed, or another tool's"
		}
	}
	return s
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, os.ErrNotExist)
}

// stopOver stops the NBD server of a lifeboat cycle that is over, once QEMU
// is seen to listen there still (the dead cycle's work dir is claimed), and
// logs what it stopped and why.
func (p *Protector) stopOver(ctx context.Context, m *qemu.Monitor, s runningServer) error {
	if s.release != nil {
		defer s.release()
	}
	ls, err := m.UnixListeners()
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(ls, func(l qemu.UnixListener) bool { return l.Path == s.socket }) {
		return nil // stopped meanwhile
	}
	why := "its work dir's cycle lock is free: the lifeboat that ran it was killed mid-cycle"
	if !exists(filepath.Dir(s.socket)) {
		why = "its work dir is gone (a state_dir moved?) and no client is connected: nobody can reach it"
	}
	if err := m.NBDServerStop(ctx); err != nil {
		return fmt.Errorf("stop the NBD server a killed lifeboat cycle left on %s: %w", s.socket, err)
	}
	p.log().Warn("stopped the NBD server of a lifeboat cycle that is over, left in the VM's QEMU (a lifeboat killed mid-cycle, its state_dir since moved or its VM renamed?)",
		"socket", s.socket, "why", why)
	return nil
}

// waiting says, once, why the cycle waits for a server it did not start.
func (s runningServer) waiting() string {
	switch {
	case s.holder != "":
		return fmt.Sprintf("the VM's QEMU runs the NBD server of another lifeboat's cycle under way (socket %s, %s): waiting for it to end", s.socket, s.holder)
	case s.unsure != "":
		return fmt.Sprintf("the VM's QEMU runs an NBD server on %s that this lifeboat did not start (%s): waiting for it to stop", s.socket, s.unsure)
	}
	return "the VM's QEMU runs an NBD server lifeboat did not start (a libvirt backup?): waiting for it to stop"
}

// busy is the error of a cycle that waited for it in vain; running names the
// other tools' block jobs.
func (s runningServer) busy(p *Protector, running string, waited time.Duration) error {
	stop := fmt.Sprintf(`QMP "nbd-server-stop" on the VM's monitor, e.g. printf '%%s' '{"execute":"qmp_capabilities"}{"execute":"nbd-server-stop"}' | socat - UNIX-CONNECT:%s`, p.VM.QMPSocket)
	switch {
	case s.holder != "":
		return fmt.Errorf("the VM's QEMU runs the NBD server of another lifeboat's cycle under way (socket %s, %s) and that cycle did not end within %v: another lifeboat deployment protects this VM too, and QEMU runs one NBD server per process, so the next cycle tries again. For both to run side by side, give the VM an NBD server of its own and set `nbd_socket:` of vm %q in both configs", s.socket, s.holder, waited, p.VM.Name)
	case s.unsure != "":
		return fmt.Errorf("the VM's QEMU runs an NBD server on %s that this lifeboat did not start, and it did not stop within %v: %s. QEMU runs one NBD server per process, so lifeboat cannot start its own: the next cycle tries again. If no backup and no other lifeboat uses it, stop it with %s", s.socket, waited, s.unsure, stop)
	}
	where := ""
	switch {
	case s.err != nil:
		where = fmt.Sprintf(" (where it listens could not be told: %v)", s.err)
	case len(s.listens) > 0:
		where = " (the VM's QEMU listens on " + strings.Join(s.listens, ", ") + ")"
	}
	return fmt.Errorf("the VM's QEMU runs an NBD server lifeboat did not start (a libvirt backup? %s)%s and it did not stop within %v; it has no sign of lifeboat's, so lifeboat leaves it alone; QEMU runs one NBD server per process, so lifeboat cannot start its own: the next cycle tries again. If that server stays (it is not a backup's), set `nbd_socket:` of vm %q in the config to its unix socket", running, where, waited, p.VM.Name)
}

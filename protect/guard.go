package protect

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/qga"
)

// A thaw guard is a small process started before each freeze. It outlives a
// lifeboat killed with -9 while a guest is frozen: its stdin (a pipe from
// lifeboat) then ends, and it thaws the guest. A lifeboat that thaws by itself
// tells the guard "ok" and the guard exits. Invariant 6: a guest is never
// left frozen, not even by a dead lifeboat.

// FrozenGuest is a guest as a freeze marker and a thaw guard name it: by its
// agent's socket (a VM reached by QMP), or by its libvirt domain (libvirt owns
// the agent's socket, and thaws through virDomainFSThaw).
type FrozenGuest struct {
	Socket  string
	Libvirt *LibvirtDomain
}

func (g FrozenGuest) String() string {
	if g.Libvirt != nil {
		return fmt.Sprintf("libvirt domain %q at %s", g.Libvirt.Domain, g.Libvirt.uri())
	}
	return "guest agent " + g.Socket
}

// guardArgs are the thaw guard's flags that name the guest.
func (g FrozenGuest) guardArgs() []string {
	if g.Libvirt != nil {
		return []string{"--uri=" + g.Libvirt.uri(), "--domain=" + g.Libvirt.Domain}
	}
	return []string{"--socket=" + g.Socket}
}

// A freeze marker holds the agent's socket, or for a libvirt domain the line
// "libvirt", its URI and its name, one a line.
const libvirtMarker = "libvirt"

func (g FrozenGuest) marker() string {
	if g.Libvirt != nil {
		return libvirtMarker + "\n" + g.Libvirt.uri() + "\n" + g.Libvirt.Domain + "\n"
	}
	return g.Socket + "\n"
}

func parseMarker(b []byte) FrozenGuest {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) == 3 && lines[0] == libvirtMarker {
		return FrozenGuest{Libvirt: &LibvirtDomain{URI: lines[1], Domain: lines[2]}}
	}
	return FrozenGuest{Socket: strings.TrimSpace(string(b))}
}

// markerPath is the freeze marker of vm in dir.
func markerPath(dir, vm string) string { return filepath.Join(dir, vm+".frozen") }

// writeMarker records that g is about to be frozen; it reports whether a
// marker was there already (a freeze of lifeboat's not confirmed thawed).
func writeMarker(dir, vm string, g FrozenGuest) (leftover bool) {
	if dir == "" {
		return false
	}
	_, err := os.Stat(markerPath(dir, vm))
	if err := os.MkdirAll(dir, 0o750); err == nil {
		os.WriteFile(markerPath(dir, vm), []byte(g.marker()), 0o600)
	}
	return err == nil
}

// thaw runs the thaw loop of g's path until the guest is confirmed thawed or
// ctx ends. A guest that cannot be frozen (no QEMU serves its socket; its
// domain is off or gone) is thawed too.
func (g FrozenGuest) thaw(ctx context.Context, a *qga.Agent, why string, log *slog.Logger) error {
	if g.Libvirt != nil {
		return thawLibvirt(ctx, *g.Libvirt, why, log)
	}
	err := qga.EnsureThawed(ctx, g.Socket, a, log)
	if errors.Is(err, qga.ErrNoGuest) {
		log.Warn("nothing to thaw: dropping the freeze marker", "socket", g.Socket, "why", err)
		return nil
	}
	return err
}

// guardProcess is the running guard of one freeze.
type guardProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// startGuard starts command as the guard of g's freeze; nil (and the error
// logged) when it cannot, and nil when there is no command.
func startGuard(command []string, g FrozenGuest, marker string, log *slog.Logger) *guardProcess {
	if len(command) == 0 {
		return nil
	}
	args := append(append(append([]string{}, command[1:]...), g.guardArgs()...), "--marker="+marker)
	cmd := exec.Command(command[0], args...)
	// Its own process group: a signal to lifeboat's group does not take it along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr // its log joins the site's
	in, err := cmd.StdinPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		log.Error("no thaw guard for this freeze", "err", fmt.Errorf("start thaw guard %s: %w", command[0], err))
		return nil
	}
	go cmd.Wait()
	return &guardProcess{cmd: cmd, stdin: in}
}

// dismiss tells the guard the guest is thawed.
func (g *guardProcess) dismiss() {
	if g == nil {
		return
	}
	io.WriteString(g.stdin, "ok\n")
	g.stdin.Close()
}

// RunThawGuard is the guard process's body: it waits for "ok" on in; if in
// ends first, lifeboat died, and it thaws g (the agent, or libvirt, may be
// busy finishing the freeze, and a paused domain is thawed only once it
// resumes: it keeps trying for up to bound), then removes marker.
func RunThawGuard(ctx context.Context, g FrozenGuest, marker string, in io.Reader, bound time.Duration, log *slog.Logger) error {
	line, _ := bufio.NewReader(in).ReadString('\n')
	if line == "ok\n" {
		return nil
	}
	log = log.With("guest", g.String())
	log.Warn("lifeboat died while the guest may be frozen: thawing it")
	if bound <= 0 {
		bound = qga.DefaultThawBound
	}
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	if err := g.thaw(ctx, nil, "lifeboat died while it was frozen", log); err != nil {
		return fmt.Errorf("thaw guard: %w; its marker %s stays for the site's next start", err, marker)
	}
	if marker != "" {
		os.Remove(marker)
	}
	log.Info("guest thawed")
	return nil
}

// leftoverWait bounds how long a site's start waits for the thaw of a guest
// it left frozen whose VM has no quiescer of its own to fall back with.
const leftoverWait = time.Minute

// leftoverThawer is a quiescer that takes over the thaw of its guest when a
// site that died left it frozen: thawLeftover starts it in the background
// (the quiescer's freezes fall back until it ends) and returns nil when g
// and dir are not its guest and marker directory.
type leftoverThawer interface {
	thawLeftover(g FrozenGuest, dir string) *thawRun
}

// quiescer is a quiescer of g for the thaw of a leftover whose VM is not
// configured here.
func (g FrozenGuest) quiescer(vm, dir string, log *slog.Logger) leftoverThawer {
	if g.Libvirt != nil {
		return &LibvirtQuiescer{VM: vm, Domain: *g.Libvirt, MarkerDir: dir, Log: log}
	}
	return &AgentQuiescer{VM: vm, Socket: g.Socket, MarkerDir: dir, Log: log}
}

// ThawLeftovers thaws every guest that a site left frozen when it died (each
// marker in dir names a VM and its agent socket or libvirt domain), all at
// once, when the site starts. A VM for which own gives its quiescer (own may
// be nil) is thawed by it in the background: its freezes fall back to crash
// until the guest is confirmed thawed, so a thaw never lands in a new
// freeze's instant. ThawLeftovers waits for the others, up to leftoverWait in
// all, then lets them go on in the background. A marker whose socket no QEMU
// serves, or whose domain is off or gone, is dropped at once: no guest runs
// there that could be frozen.
func ThawLeftovers(dir string, own func(vm string) Quiescer, log *slog.Logger) {
	entries, _ := os.ReadDir(dir)
	var wait []<-chan struct{}
	for _, e := range entries {
		vm, ok := strings.CutSuffix(e.Name(), ".frozen")
		if !ok {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		g := parseMarker(b)
		log.Warn("this site stopped while the guest was frozen: thawing it", "vm", vm, "guest", g.String())
		var r *thawRun
		if own != nil {
			if q, ok := own(vm).(leftoverThawer); ok {
				r = q.thawLeftover(g, dir)
			}
		}
		if r == nil {
			r = g.quiescer(vm, dir, log).thawLeftover(g, dir)
			wait = append(wait, r.done)
		}
	}
	bound := time.NewTimer(leftoverWait)
	defer bound.Stop()
	for _, done := range wait {
		select {
		case <-done:
		case <-bound.C:
			log.Warn("guests this site left frozen are not confirmed thawed yet: going on, thawing them in the background", "waited", leftoverWait)
			return
		}
	}
}

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
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/qga"
)

// A thaw guard is a small process started before each freeze. It outlives a
// lifeboat killed with -9 while a guest is frozen: its stdin (a pipe from
// lifeboat) then ends, and it thaws the guest. A lifeboat that thaws by itself
// tells the guard "ok" and the guard exits. Invariant 6: a guest is never
// left frozen, not even by a dead lifeboat.

// guardProcess is the running guard of one freeze.
type guardProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func startGuard(command []string, socket, marker string, log *slog.Logger) (*guardProcess, error) {
	args := append(append([]string{}, command[1:]...), "--socket", socket, "--marker", marker)
	cmd := exec.Command(command[0], args...)
	// Its own process group: a signal to lifeboat's group does not take it along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr // its log joins the site's
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start thaw guard %s: %w", command[0], err)
	}
	go cmd.Wait()
	return &guardProcess{cmd: cmd, stdin: in}, nil
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
// ends first, lifeboat died, and it thaws the guest behind socket (the agent may
// be busy finishing the freeze: it keeps trying for up to bound), then removes
// marker.
func RunThawGuard(ctx context.Context, socket, marker string, in io.Reader, bound time.Duration, log *slog.Logger) error {
	line, _ := bufio.NewReader(in).ReadString('\n')
	if line == "ok\n" {
		return nil
	}
	log.Warn("lifeboat died while the guest may be frozen: thawing it", "socket", socket)
	if bound <= 0 {
		bound = qga.DefaultThawBound
	}
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	if err := qga.EnsureThawed(ctx, socket, nil, log); errors.Is(err, qga.ErrNoGuest) {
		log.Warn("nothing to thaw: dropping the freeze marker", "socket", socket, "marker", marker, "why", err)
	} else if err != nil {
		return fmt.Errorf("thaw guard: %w; its marker %s stays for the site's next start", err, marker)
	}
	os.Remove(marker)
	log.Info("guest thawed", "socket", socket)
	return nil
}

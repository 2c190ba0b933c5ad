package testvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// System is a real qemu-system-x86_64 (q35, TCG, CPUs stopped: its block
// layer and devices answer QMP as a running VM's do, and no guest is needed),
// started with the test's -blockdev/-device arguments and no NBD server, as
// libvirt starts a VM.
type System struct {
	Dir     string // its QMP sockets live here
	mon     *qemu.Monitor
	cmd     *exec.Cmd
	exited  chan struct{}
	stopped bool
}

// StartSystem starts the VM in dir (a short path: unix sockets live there)
// and waits until its QMP answers. It ends with the test, or with Stop.
func StartSystem(t testing.TB, dir string, args ...string) *System {
	t.Helper()
	testenv.RequireTools(t, "qemu-system-x86_64")
	s := &System{Dir: dir, exited: make(chan struct{})}
	for _, sock := range []string{s.testQMPSocket(), s.QMPSocket()} {
		os.Remove(sock)
	}
	s.cmd = exec.Command("qemu-system-x86_64", append([]string{"-M", "q35", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
		"-qmp", "unix:" + s.testQMPSocket() + ",server=on,wait=off",
		"-qmp", "unix:" + s.QMPSocket() + ",server=on,wait=off"}, args...)...)
	var stderr strings.Builder
	s.cmd.Stderr = &stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(s.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		m, err := qemu.Dial(dctx, s.testQMPSocket())
		dcancel()
		if err == nil {
			s.mon = m
			return s
		}
		select {
		case <-s.exited:
			t.Fatalf("testvm: qemu-system-x86_64 exited: %s", stderr.String())
		case <-ctx.Done():
			t.Fatalf("testvm: qemu-system-x86_64 QMP never answered: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Monitor is the test's QMP connection.
func (s *System) Monitor() *qemu.Monitor { return s.mon }

// QMPSocket is a second QMP monitor, free for lifeboat: QMP serves one client
// per socket and the test holds the first.
func (s *System) QMPSocket() string { return filepath.Join(s.Dir, "vm-client.qmp") }

func (s *System) testQMPSocket() string { return filepath.Join(s.Dir, "vm-qmp.sock") }

// Write writes pattern over n bytes at off of the disk on the device of that
// qdev id, as the guest would: through the device's block backend, so through
// whatever filters block jobs put in front of the disk (HMP's qemu-io).
func (s *System) Write(ctx context.Context, device string, pattern byte, off, n int64) error {
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/%s/virtio-backend "write -P %d %d %d"`, device, pattern, off, n)
	var out string
	if err := s.mon.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil {
		return err
	}
	if out != "" { // qemu-io reports success on QEMU's stdout, failure here
		return fmt.Errorf("testvm: %s: %s", cmd, strings.TrimSpace(out))
	}
	return nil
}

// Stop kills the VM and waits until it is gone; a second call does nothing.
func (s *System) Stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	if s.mon != nil {
		s.mon.Close()
	}
	s.cmd.Process.Kill()
	<-s.exited
}

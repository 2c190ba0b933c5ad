package recovery

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A helper daemon that stops answering (SIGSTOP stands in for the hang seen
// once in CI: a real qemu-storage-daemon cannot be made to stall on demand)
// is killed, its state logged, and another one does the work: Verify and
// Export still succeed, and nothing is left running.
func TestStalledHelperDaemonIsReplaced(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	var logs testenv.LogBuffer
	s.log = slog.New(slog.NewTextHandler(&logs, nil))
	models := writeSeries(t, s, "st", 2)

	saved := helperCommandTimeout
	helperCommandTimeout = time.Second
	var stalled []*qemu.Daemon
	testHookDaemonStarted = func(d *qemu.Daemon) {
		if len(stalled) == 0 {
			syscall.Kill(d.Pid(), syscall.SIGSTOP)
			stalled = append(stalled, d)
		}
	}
	t.Cleanup(func() { helperCommandTimeout, testHookDaemonStarted = saved, nil })

	if _, err := s.Verify(testCtx(t), "st", 2, nil); err != nil {
		t.Fatalf("Verify with a stalled first daemon: %v", err)
	}
	if len(stalled) != 1 {
		t.Fatalf("the hook stalled %d daemons, want 1", len(stalled))
	}
	select {
	case <-stalled[0].Exited():
	default:
		t.Error("the stalled daemon still runs")
	}
	if out := logs.String(); !strings.Contains(out, "did not answer") || !strings.Contains(out, "T do_signal_stop") {
		t.Errorf("the log does not say the daemon did not answer and what it was doing:\n%s", out)
	}
	checkPoint(t, s, "st", 2, models[1])
}

// A file the helper daemon cannot open though it exists (here: not a qcow2
// image) fails with QEMU's reason, and says that the file exists and what
// lifeboat sent: the evidence a misread path (seen once in CI) needs.
func TestHelperOpenErrorSaysWhatWasSent(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	run, err := s.runDir()
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "0000000000000004.qcow2")
	if err := os.WriteFile(bad, []byte("not an image"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = s.startDaemonOnce(testCtx(t), run, []string{"vda"}, []string{bad}, false)
	if err == nil || !strings.Contains(err.Error(), "the file exists; lifeboat sent") || !strings.Contains(err.Error(), `"filename":"`+bad+`"`) {
		t.Fatalf("opening a file that is no image: %v", err)
	}
}

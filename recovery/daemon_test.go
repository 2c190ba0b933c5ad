package recovery

import (
	"fmt"
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
	_, err = s.startDaemonOnce(testCtx(t), run, []string{"vda"}, []string{bad}, nil, false)
	if err == nil || !strings.Contains(err.Error(), "the file exists; lifeboat sent") || !strings.Contains(err.Error(), `"filename":"`+bad+`"`) {
		t.Fatalf("opening a file that is no image: %v", err)
	}
}

// The writer daemon opens a point's images with O_DIRECT when the store's
// file system takes it, and through the page cache when not; either way the
// points it writes are byte-exact. (A file system that refuses O_DIRECT is
// not at hand here: the probe's answer is forced instead.)
func TestWriterCacheMode(t *testing.T) {
	requireQEMU(t)
	if !directIO(t.TempDir()) {
		t.Fatal("this test's directory does not take O_DIRECT; the writer's direct mode cannot be checked here")
	}
	if directIO(filepath.Join(t.TempDir(), "missing")) {
		t.Error("directIO of a directory that does not exist says yes")
	}
	for _, direct := range []bool{true, false} {
		s := openStore(t, t.TempDir(), 100)
		s.direct = direct
		img := filepath.Join(t.TempDir(), "0000000000000001.qcow2")
		if err := qemu.CreateImage(testCtx(t), img, "qcow2", 1<<20, "", ""); err != nil {
			t.Fatal(err)
		}
		run, err := s.runDir()
		if err != nil {
			t.Fatal(err)
		}
		d, err := s.startDaemonOnce(testCtx(t), run, []string{"vda"}, []string{img}, nil, true)
		if err != nil {
			t.Fatal(err)
		}
		var nodes []struct {
			NodeName string `json:"node-name"`
			Drv      string `json:"drv"`
			Cache    struct {
				Direct bool `json:"direct"`
			} `json:"cache"`
		}
		if err := d.Monitor().Execute(testCtx(t), "query-named-block-nodes", nil, &nodes); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", d.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		maps := string(b)
		d.Kill()
		seen := 0
		for _, n := range nodes {
			if n.Drv == "qcow2" || n.Drv == "file" {
				seen++
				if n.Cache.Direct != direct {
					t.Errorf("store direct=%v: node %s (%s) opened with cache.direct=%v", direct, n.NodeName, n.Drv, n.Cache.Direct)
				}
			}
		}
		if seen < 2 {
			t.Errorf("store direct=%v: the daemon has %d qcow2/file nodes, want 2: %+v", direct, seen, nodes)
		}
		// Linux AIO's ring shows in the process's mappings as "[aio]".
		if aio := strings.Contains(maps, "[aio]"); aio != direct {
			t.Errorf("store direct=%v: the daemon has a Linux AIO context: %v, want %v", direct, aio, direct)
		}
		models := writeSeries(t, s, "cm", 3)
		for i, m := range models {
			checkPoint(t, s, "cm", uint64(i+1), m)
		}
	}
}

// The writer daemon writes new images through QEMU's preallocate filter (a
// new point's every write allocates at the image's end; growing the file a
// write at a time serialises them), and the filter cuts the file back when
// the image is closed: a committed point's image holds its data and
// metadata, not the 128 MiB the filter grew it by.
func TestWriterPreallocates(t *testing.T) {
	requireQEMU(t)
	s := openStore(t, t.TempDir(), 100)
	p := begin(t, s, "pa", 1, model{}, DiskSpec{Name: "vda", Size: 4 << 20, Resync: true})
	p.data("vda", 0, 16)
	img := s.abs(filepath.Join("vms", "pa", "vda", "0000000000000001.qcow2"))
	var st syscall.Stat_t
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size < 64<<20 {
		t.Errorf("point 1's image being written is %d bytes: the preallocate filter did not grow it", st.Size)
	}
	pt := p.commit()
	if got := s.abs(pt.Disks[0].File); got != img {
		t.Fatalf("point 1's image is %s, the test looked at %s", got, img)
	}
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	// 16 blocks of 64 KiB, plus the qcow2 header, tables and refcounts.
	if used := st.Blocks * 512; used > 4<<20 || st.Size > 4<<20 {
		t.Errorf("point 1's image is %d bytes and uses %d on disk after the commit: the preallocated tail was not cut back", st.Size, used)
	}
}

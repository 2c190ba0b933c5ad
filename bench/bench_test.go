package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/wire"
)

// TestMain lets this test binary serve as the benchmarks' recovery site
// process, as the bench binary does (startRecoveryProcess runs itself).
func TestMain(m *testing.M) {
	if dir := os.Getenv(recoverySiteEnv); dir != "" {
		os.Exit(serveRecoverySite(dir))
	}
	if config := os.Getenv(serveEnv); config != "" {
		os.Exit(serveSite(config))
	}
	os.Exit(m.Run())
}

// The harness's smoke version (-quick) runs every benchmark against real
// qemu-storage-daemons, a real recovery site and the real peers, and its
// numbers are sane: replicas identical, changes sent as changes, compressible
// data sent smaller than it is, every temporary file gone.
func TestQuickRun(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-storage-daemon", "nbdcopy", "rsync")
	// A bound against a hang, not a timing: the suite runs packages side by
	// side on two cores, and this run shares them.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	parent := shortTempDir(t)
	var out, prog bytes.Buffer
	cfg := quickConfig()
	res, err := run(ctx, cfg, parent, &out, &prog)
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatalf("run: %v\nprogress:\n%s", err, prog.String())
	}
	if left, _ := os.ReadDir(parent); len(left) != 0 {
		t.Errorf("the run left %d entries in its temporary directory's parent (e.g. %s)", len(left), left[0].Name())
	}
	for _, want := range []string{"machine:", "nbdcopy:", "rsync:", "## 1.", "## 2.", "## 3.", "## 5.", "## 8."} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}

	// 1. initial sync
	ini := res.Initial
	if len(ini.Rows) != 4 {
		t.Fatalf("initial sync: %d contenders, want lifeboat zstd and none, nbdcopy, qemu-img", len(ini.Rows))
	}
	for _, row := range ini.Rows {
		if row.Skipped != "" {
			t.Errorf("initial sync: %s skipped: %s", row.Tool, row.Skipped)
			continue
		}
		if row.M.Wall <= 0 || row.CPU.Own <= 0 {
			t.Errorf("initial sync: %s: time %v, CPU %s s: not measured", row.Tool, row.M.Wall, row.CPU)
		}
		if strings.HasPrefix(row.Tool, "lifeboat") {
			if row.Identical != "yes" {
				t.Errorf("initial sync: %s: replica not identical to the source", row.Tool)
			}
			// The disk's data is sent as data, nothing more (the rest is zeros, sent as ranges).
			if row.Data != cfg.InitData || row.Changed > cfg.InitDisk {
				t.Errorf("initial sync: %s sent %d bytes as data (of %d considered) for %d of data", row.Tool, row.Data, row.Changed, cfg.InitData)
			}
			if row.Sent > row.Data+row.Data/100 {
				t.Errorf("initial sync: %s put %d bytes on the wire for %d of data", row.Tool, row.Sent, row.Data)
			}
			if row.CPU.Source <= 0 || row.CPU.Recovery <= 0 {
				t.Errorf("initial sync: %s: CPU %s: the source or recovery QEMU processes not counted", row.Tool, row.CPU)
			}
			// Memory is bounded by the pipeline, not the data: more data than
			// the bound crosses, and neither site grows by the bound.
			if cfg.InitData <= rssGrowthBound {
				t.Fatalf("initial sync: %d bytes of data cannot show an RSS bound of %d", cfg.InitData, rssGrowthBound)
			}
			for _, site := range []struct {
				name       string
				peak, base int64
			}{{"protected", row.ProtRSS, row.ProtRSSBase}, {"recovery", row.RecRSS, row.RecRSSBase}} {
				if site.peak <= 0 || site.base <= 0 || site.peak < site.base {
					t.Errorf("initial sync: %s: the %s site's RSS not measured (peak %d, at the start %d)", row.Tool, site.name, site.peak, site.base)
				} else if g := site.peak - site.base; g > rssGrowthBound {
					t.Errorf("initial sync: %s: the %s site's RSS grew by %s for %s of data, over the bound of %s", row.Tool, site.name, size(g), size(cfg.InitData), size(rssGrowthBound))
				}
			}
		}
	}

	// 2. incremental
	inc := res.Incremental
	if len(inc.Rows) != 4 || inc.Rows[3].Format != "raw" {
		t.Fatalf("incremental: %d rows, want 2 qcow2 disk sizes, a larger change and a raw disk", len(inc.Rows))
	}
	for _, row := range inc.Rows {
		c := row.Cycle
		if c.Identical != "yes" {
			t.Errorf("incremental %s disk, %d written: replica not identical", size(row.DiskSize), row.Written)
		}
		if row.Apply.Identical != "yes" || row.Apply.M.Wall <= 0 {
			t.Errorf("incremental %s %s disk, %d written: the direct application's copy identical: %s, in %s", size(row.DiskSize), row.Format, row.Written, row.Apply.Identical, row.Apply.M.Wall)
		}
		// Writes of 4–64 KiB touch one or two 64 KiB blocks each: at least the
		// bytes written, and far less than the data on the disk.
		if c.Changed < row.Written || c.Changed > 6*row.Written || c.Changed >= row.Data {
			t.Errorf("incremental %s disk: %d bytes changed for %d written", size(row.DiskSize), c.Changed, row.Written)
		}
		if c.Sent > c.Changed+c.Changed/50 {
			t.Errorf("incremental %s disk: sent %d for %d changed", size(row.DiskSize), c.Sent, c.Changed)
		}
		if row.Written == cfg.IncrChange && (row.Rsync.Skipped != "" || row.Rsync.M.Wall <= 0) {
			t.Errorf("incremental %s disk: rsync not measured (%s)", size(row.DiskSize), row.Rsync.Skipped)
		}
	}

	// 3. bytes on the wire
	w := res.Wire
	if len(w.Rows) != 2*len(contentKinds) {
		t.Fatalf("wire: %d rows, want %d", len(w.Rows), 2*len(contentKinds))
	}
	for _, row := range w.Rows {
		if row.Identical != "yes" {
			t.Errorf("wire %s %s: replica not identical", row.Content, row.Compression)
		}
		if row.Changed != row.Written {
			t.Errorf("wire %s %s: %d changed for %d written sequentially", row.Content, row.Compression, row.Changed, row.Written)
		}
		if row.Data+row.Zero != row.Changed {
			t.Errorf("wire %s %s: data %d + zero %d != changed %d", row.Content, row.Compression, row.Data, row.Zero, row.Changed)
		}
		switch {
		case row.Compression == wire.CompressionZstd && row.Content == contentText:
			if row.Sent > row.Changed/2 {
				t.Errorf("wire text with zstd: sent %d of %d changed", row.Sent, row.Changed)
			}
		case row.Compression == wire.CompressionZstd && row.Content == contentOS:
			if row.Sent > row.Changed {
				t.Errorf("wire os-files with zstd: sent %d, more than the %d changed", row.Sent, row.Changed)
			}
		default:
			// Uncompressed: the data and its hashes (32 bytes per 64 KiB block).
			if row.Sent < row.Data || row.Sent > row.Data+row.Data/100 {
				t.Errorf("wire %s %s: sent %d for %d of data", row.Content, row.Compression, row.Sent, row.Data)
			}
		}
	}

	// 6. failover: the guest came up from each point (checked before libvirt,
	// which returns early where it is skipped)
	fo := res.Failover
	if fo == nil || fo.Skipped != "" {
		t.Fatalf("failover: not run: %+v", fo)
	}
	if len(fo.Rows) != len(cfg.FailoverDisks) {
		t.Fatalf("failover: %d rows, want %d", len(fo.Rows), len(cfg.FailoverDisks))
	}
	for _, x := range fo.Rows {
		if x.ToRunning <= 0 || x.ToAgent < x.ToRunning || x.Export <= 0 || x.Identical != "yes" {
			t.Errorf("failover of the %d-byte disk: %+v, want QEMU running, then the agent, the export timed, the point's /data mounted", x.DiskSize, x)
		}
	}

	// 7. failback: both sides' changes handled, no more; production = recovered;
	// production read its data only when its record was lost
	fb := res.Failback
	if fb == nil || len(fb.Rows) != 2 {
		t.Fatalf("failback: %+v, want two rows", fb)
	}
	for i, x := range fb.Rows {
		if !x.Identical || x.Handled != x.Union || x.Union < x.Rec || x.Union < x.Prod || x.Sent > x.Union*105/100 {
			t.Errorf("failback, %s: %+v: want the production disk as the recovered one, the union handled, at most 1.05× sent", x.Mode, x)
		}
		if hashed := i == 1; (x.ProdRead > 0) != hashed {
			t.Errorf("failback, %s: production read %d bytes of its disk", x.Mode, x.ProdRead)
		}
	}

	// 8. RPO under load: every sample taken, the rate written, points
	// committed meanwhile, the RPO bounded by the run (a point was listed
	// at every sample after the first cycle), the last point byte-exact
	rpo := res.RPO
	if rpo == nil || len(rpo.Runs) != len(cfg.RPORates) {
		t.Fatalf("RPO: %+v, want one run a rate of %v", rpo, cfg.RPORates)
	}
	for _, x := range rpo.Runs {
		wantSamples := int(cfg.RPODuration / rpoSample)
		if len(x.Samples) < wantSamples*8/10 || x.Achieved < x.Rate*0.9 || x.Points < 2 || x.Sent <= 0 || x.CPUProd <= 0 || x.CPURecovery <= 0 || x.CPUSource <= 0 {
			t.Errorf("RPO at %.0f MB/s: %d samples (want about %d), %.1f MB/s written, %d points, %d bytes sent, CPU %.1f/%.1f/%.1f: not measured",
				x.Rate, len(x.Samples), wantSamples, x.Achieved, x.Points, x.Sent, x.CPUSource, x.CPUProd, x.CPURecovery)
		}
		if x.P50 <= 0 || x.P50 > x.P99 || x.P99 > x.Max || x.Max > cfg.RPODuration.Seconds()+5 {
			t.Errorf("RPO at %.0f MB/s: p50 %.2f, p99 %.2f, max %.2f s over a %s run", x.Rate, x.P50, x.P99, x.Max, cfg.RPODuration)
		}
	}
	if !rpo.Identical {
		t.Error("RPO: the last point is not byte-identical to the source disks")
	}
	if rpo.BaseCPU <= 0 {
		t.Errorf("RPO: the source's own CPU per MB written, without lifeboat, is %v: not measured", rpo.BaseCPU)
	}

	// 5. libvirt, where this host runs it (under CI run must have failed instead)
	lv := res.Libvirt
	if lv.Skipped != "" {
		t.Logf("libvirt: skipped: %s", lv.Skipped)
		return
	}
	if len(lv.Incr) != cfg.LibvirtRounds {
		t.Fatalf("libvirt: %d incremental rounds, want %d", len(lv.Incr), cfg.LibvirtRounds)
	}
	rows := append([][2]libvirtRow{lv.Initial}, lv.Incr...)
	for i, pair := range rows {
		lb, vnb := pair[0], pair[1]
		if lb.M.Wall <= 0 || lb.CPU.Own <= 0 || lb.CPU.Recovery <= 0 || vnb.M.Wall <= 0 || vnb.CPU.Own <= 0 {
			t.Errorf("libvirt step %d: lifeboat %v %s, virtnbdbackup %v %s: not measured", i, lb.M.Wall, lb.CPU, vnb.M.Wall, vnb.CPU)
		}
		if lb.CPU.Source <= 0 {
			t.Errorf("libvirt step %d: the domain's QEMU not counted", i)
		}
		if len(lb.Steps) != len(cycleSteps) {
			t.Errorf("libvirt step %d: lifeboat's cycle steps %v, want all %d (is the recovery site's commit in its log?)", i, lb.Steps, len(cycleSteps))
		}
		if lb.Identical != "yes" {
			t.Errorf("libvirt step %d: lifeboat's replica not identical to the disk", i)
		}
		want := cfg.LibvirtData
		if i > 0 {
			want = cfg.LibvirtChange
		}
		// Both tools read exactly the data (initial) or the change (distinct aligned blocks).
		if lb.Data != want || vnb.Output < want || vnb.Output > want+want/50 {
			t.Errorf("libvirt step %d: lifeboat sent %d bytes as data, virtnbdbackup wrote %d, for %d", i, lb.Data, vnb.Output, want)
		}
	}
	if u := lv.Unchanged[0]; u.Changed != 0 || u.Identical != "yes" || lv.Unchanged[1].M.Wall <= 0 {
		t.Errorf("libvirt, nothing changed: lifeboat changed %d bytes (identical %s), virtnbdbackup took %v", u.Changed, u.Identical, lv.Unchanged[1].M.Wall)
	}
	if lv.VnbRestored != "yes" {
		t.Errorf("libvirt: virtnbdbackup's chain restored is not the disk (%s)", lv.VnbRestored)
	}
}

func shortTempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "lbbt")
	if err != nil {
		t.Fatal(err)
	}
	// The libvirt benchmark's QEMU runs as libvirt-qemu and must pass it.
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// CPU accounting reads /proc/PID/stat fields counted from the last ')', so a
// command name with spaces and parentheses does not shift them.
func TestParseStat(t *testing.T) {
	cases := []struct {
		line string
		ppid int
		sec  float64
		ok   bool
	}{
		{"1234 (qemu-storage-d) S 99 1234 1 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 5 0 1 1 1", 99, 4, true},
		{"7 (a (b) c) R 5 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 1 1 1", 5, 0.03, true},
		{"7 (short) R 5", 0, 0, false},
		{"garbage", 0, 0, false},
	}
	for _, c := range cases {
		ppid, sec, ok := parseStat(c.line)
		if ok != c.ok || ppid != c.ppid || (sec-c.sec) > 1e-9 || (c.sec-sec) > 1e-9 {
			t.Errorf("parseStat(%q) = %d, %v, %v; want %d, %v, %v", c.line, ppid, sec, ok, c.ppid, c.sec, c.ok)
		}
	}
	// With the reaped children's fields (16, 17: 30 and 20 ticks here).
	line := "1234 (lifeboat) S 99 1234 1 0 -1 4194560 100 0 0 0 250 150 30 20 20 0 5 0 1 1 1"
	if sec, ok := statSeconds(line, true); !ok || sec < 4.5-1e-9 || sec > 4.5+1e-9 {
		t.Errorf("statSeconds with children = %v, %v; want 4.5, true", sec, ok)
	}
}

// A child's CPU is counted once whether it is still running or was reaped
// between the samples.
func TestMeasureCountsChildren(t *testing.T) {
	testenv.RequireTools(t, "sh")
	m, err := measure(func() error {
		return runTool(context.Background(), "sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
	})
	if err != nil {
		t.Fatal(err)
	}
	if m.CPU.Reaped < 0.05 {
		t.Errorf("a busy child reaped during the step: %.3f s of CPU counted", m.CPU.Reaped)
	}
	if m.CPU.Total() > m.Wall.Seconds()*2+0.1 {
		t.Errorf("%.2f s of CPU counted in %.2f s of wall time on at most 2 busy processes", m.CPU.Total(), m.Wall.Seconds())
	}
}

// The content kinds are what they claim: random does not compress, text does by half or more.
func TestContentKinds(t *testing.T) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range contentKinds {
		r, err := newContent(kind, 1)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4<<20)
		if _, err := io.ReadFull(r, b); err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		if bytes.Count(b, []byte{0}) == len(b) {
			t.Errorf("%s: all zeros", kind)
		}
		z := &zstdCounter{r: bytes.NewReader(b), enc: enc}
		if _, err := io.Copy(io.Discard, z); err != nil {
			t.Fatal(err)
		}
		ratio := float64(z.n) / float64(len(b))
		if kind == contentRandom && ratio < 0.99 || kind == contentText && ratio > 0.5 || ratio > 1 {
			t.Errorf("%s: zstd makes it %.2f of its size", kind, ratio)
		}
	}
	if _, err := newContent("nope", 1); err == nil {
		t.Error("unknown content kind accepted")
	}
}

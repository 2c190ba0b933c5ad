package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/internal/workload"
	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

func newDemoCmd() *cobra.Command {
	var (
		cycles int
		keep   bool
		dir    string
		sizeMB int64
	)
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Protect a stand-in VM end to end on this machine and prove the replica byte-identical",
		Long: `demo starts a "production VM" block layer (qemu-storage-daemon over a qcow2 and a
raw disk, a workload writing to them through NBD), a recovery site and a production
site talking mutual TLS over loopback, replicates a few cycles with live progress,
exports the latest point of each disk and proves it byte-identical to the source at
the point's instant.`,
		Example: "  lifeboat demo\n  lifeboat demo --cycles 8 --keep --dir /tmp/lbdemo",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDemo(cmd.Context(), demoOptions{cycles: cycles, keep: keep, dir: dir, size: sizeMB << 20})
		},
	}
	cmd.Flags().IntVar(&cycles, "cycles", 5, "replication cycles to run")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the demo's directory (images, catalog, logs) afterwards")
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the demo (default: a new temporary one)")
	cmd.Flags().Int64Var(&sizeMB, "size", 1024, "size of the qcow2 disk in MiB (the raw disk is a quarter)")
	return cmd
}

type demoOptions struct {
	cycles int
	keep   bool
	dir    string
	size   int64
}

func runDemo(ctx context.Context, o demoOptions) error {
	for _, tool := range []string{"qemu-img", "qemu-storage-daemon"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("demo needs %s: run `make deps` (or apt-get install qemu-utils qemu-system-common)", tool)
		}
	}
	var err error
	if o.dir == "" {
		if o.dir, err = os.MkdirTemp("", "lbdemo"); err != nil {
			return err
		}
	}
	if !o.keep {
		defer os.RemoveAll(o.dir)
	}
	say := func(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }
	say("demo directory %s", o.dir)

	// The deployment CA and the two sites' certificates.
	pkiDir := filepath.Join(o.dir, "pki")
	if err := pki.CreateCA(pkiDir, "lifeboat demo", 24*time.Hour); err != nil {
		return err
	}
	for _, s := range []string{"prod", "dr"} {
		if err := pki.IssueSite(pkiDir, pkiDir, s, []string{"127.0.0.1", "localhost"}, 24*time.Hour); err != nil {
			return err
		}
	}
	say("created a deployment CA and certificates for sites prod and dr")

	// The production VM's block layer.
	vmDir := filepath.Join(o.dir, "vm")
	disks := []demoDisk{{"vda", "qcow2", o.size}, {"vdb", "raw", o.size / 4}}
	vmd, err := startDemoVM(ctx, vmDir, disks)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		vmd.Stop(sctx)
	}()
	say("started VM %q: qemu-storage-daemon (pid %d) with disks vda (qcow2, %s) and vdb (raw, %s)", "demo-vm", vmd.Pid(), size(o.size), size(o.size/4))

	// The guest's writes, through the VM's own NBD exports.
	var wdisks []workload.Disk
	for _, d := range disks {
		wdisks = append(wdisks, workload.Disk{Name: d.name, Size: d.size})
	}
	w, err := workload.Open(ctx, vmd.NBDSocket(), uint64(time.Now().UnixNano()), wdisks...)
	if err != nil {
		return err
	}
	defer w.Close()
	if err := w.Fill(ctx, 0.25); err != nil {
		return err
	}
	say("the guest filled a quarter of each disk; a workload now writes random data, patterns, zeros and discards")

	port, err := freePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(o.dir, "sites.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	log := slog.New(slog.NewTextHandler(logf, nil))
	drCfg, prodCfg, err := demoConfigs(o.dir, pkiDir, port, vmd)
	if err != nil {
		return err
	}
	sctx, stopSites := context.WithCancel(ctx)
	var sites sync.WaitGroup
	siteErr := make(chan error, 2)
	for _, c := range []*daemon.Config{drCfg, prodCfg} {
		sites.Add(1)
		go func() {
			defer sites.Done()
			if err := daemon.New(c, log).Run(sctx); err != nil {
				siteErr <- fmt.Errorf("site %s: %w", c.Site, err)
			}
		}()
	}
	defer func() { stopSites(); sites.Wait() }()
	prod, dr := daemon.NewClient(prodCfg.API), daemon.NewClient(drCfg.API)
	if err := waitSites(ctx, siteErr, prod, dr); err != nil {
		return err
	}
	say("sites running: dr listens on 127.0.0.1:%d (mutual TLS), prod protects demo-vm (log: %s)", port, logf.Name())

	type row struct {
		point                            uint64
		changed, zero, dedup, data, sent int64
		took                             time.Duration
		identical                        string
	}
	var rows []row
	for i := 0; i < o.cycles; i++ {
		if i > 0 {
			if _, err := w.Mixed(ctx, 40); err != nil {
				return err
			}
		}
		// The instant is taken while the workload pauses, so the source's
		// content at the instant can be hashed for the proof.
		want, err := w.Hashes(ctx)
		if err != nil {
			return err
		}
		bar := newProgressLine(os.Stdout)
		pt, err := prod.Sync(ctx, "demo-vm", func(p protect.Progress) { bar.show(p) })
		bar.done()
		if err != nil {
			return fmt.Errorf("cycle %d: %w", i+1, err)
		}
		verdict := "yes"
		for _, d := range disks {
			out := filepath.Join(o.dir, "export-"+d.name+".raw")
			if _, err := dr.Export(ctx, "demo-vm", daemon.ExportRequest{Point: pt.ID, Disk: d.name, Out: out, Format: "raw"}); err != nil {
				return err
			}
			got, err := fileSHA256(out, d.size)
			os.Remove(out)
			if err != nil {
				return err
			}
			if got != want[d.name] {
				verdict = "NO: " + d.name + " differs"
			}
		}
		s := pt.Stats
		rows = append(rows, row{pt.ID, s.BytesChanged, s.BytesZero, s.BytesDedup, s.BytesData, s.BytesSent, s.Duration, verdict})
		say("cycle %d: point %d committed (%s), changed %s, sent %s, %s; export byte-identical to the source: %s",
			i+1, pt.ID, pt.Consistency, size(s.BytesChanged), size(s.BytesSent), s.Duration.Round(time.Millisecond), verdict)
		if i == 0 {
			var total int64
			for _, d := range disks {
				total += d.size
			}
			say("the initial sync read only the %s the disks hold: %s of white space (unallocated or zero) was never read nor sent", size(s.BytesChanged), size(total-s.BytesChanged))
		}
		if verdict != "yes" {
			return fmt.Errorf("point %d is not byte-identical to the source at its instant", pt.ID)
		}
	}
	rep, err := dr.Verify(ctx, "demo-vm", 0, nil)
	if err != nil {
		return err
	}
	say("verify of the latest point at the recovery site: %d disks re-read against their recorded hashes: OK", len(rep.Disks))

	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "point\tchanged\tzero ranges\tdeduplicated\tdata\tsent (zstd)\ttime\tidentical\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.point, size(r.changed), size(r.zero), size(r.dedup), size(r.data), size(r.sent), r.took.Round(time.Millisecond), r.identical)
	}
	tw.Flush()
	st, err := prod.Status(ctx)
	if err == nil {
		b, _ := json.MarshalIndent(st.VMs, "", "  ")
		fmt.Printf("\n`lifeboat status --json` at prod:\n%s\n", b)
	}
	return nil
}

type demoDisk struct {
	name   string
	format string
	size   int64
}

func startDemoVM(ctx context.Context, dir string, disks []demoDisk) (*qemu.Daemon, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	var args []string
	for _, d := range disks {
		img := filepath.Join(dir, d.name+"."+d.format)
		if err := qemu.CreateImage(ctx, img, d.format, d.size, "", ""); err != nil {
			return nil, err
		}
		args = append(args, qemu.DiskArgs(d.name, img, d.format)...)
	}
	return qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: dir, Args: args, NBD: true})
}

func demoConfigs(dir, pkiDir string, port int, vmd *qemu.Daemon) (dr, prod *daemon.Config, err error) {
	files := func(site string) daemon.TLSConfig {
		f := pki.SiteFiles(pkiDir, site)
		return daemon.TLSConfig{CA: f.CA, Cert: f.Cert, Key: f.Key}
	}
	drYAML := fmt.Sprintf("site: dr\nstate_dir: %s\nlisten: 127.0.0.1:%d\nkeep: 4\ntls: {ca: %s, cert: %s, key: %s}\n",
		filepath.Join(dir, "dr"), port, files("dr").CA, files("dr").Cert, files("dr").Key)
	prodYAML := fmt.Sprintf(`site: prod
state_dir: %s
tls: {ca: %s, cert: %s, key: %s}
peers:
  - {name: dr, address: "127.0.0.1:%d", compression: zstd}
vms:
  - {name: demo-vm, qmp: %s, nbd_socket: %s, peer: dr, interval: 0s}
`, filepath.Join(dir, "prod"), files("prod").CA, files("prod").Cert, files("prod").Key, port, vmd.ClientQMPSocket(), vmd.NBDSocket())
	load := func(name, body string) (*daemon.Config, error) {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			return nil, err
		}
		return daemon.LoadConfig(p)
	}
	if dr, err = load("dr.yaml", drYAML); err != nil {
		return nil, nil, err
	}
	prod, err = load("prod.yaml", prodYAML)
	return dr, prod, err
}

func waitSites(ctx context.Context, siteErr chan error, cs ...*daemon.Client) error {
	deadline := time.Now().Add(20 * time.Second)
	for _, c := range cs {
		for {
			if _, err := c.Status(ctx); err == nil {
				break
			} else if time.Now().After(deadline) {
				return fmt.Errorf("site did not start: %w", err)
			}
			select {
			case err := <-siteErr:
				return err
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func fileSHA256(path string, n int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	got, err := io.Copy(h, io.LimitReader(f, n))
	if err != nil {
		return "", err
	}
	if got != n {
		return "", fmt.Errorf("%s: %d bytes, expected %d", path, got, n)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

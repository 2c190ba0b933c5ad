// Package testguest boots lifeboat's tiny test guest for integration tests: a
// Debian kernel with qemu-ga and a workload, its data disk served by a qemu-storage-daemon.
package testguest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/qemu"
	"github.com/lifeboat-dr/lifeboat/qga"
)

// The workloads the guest can run (Options.Workload).
const (
	// None runs nothing: the guest only mounts /data and answers its agent.
	None = "none"
	// FsyncWriter writes files /data/w/NNNNNN, each holding its own sha256,
	// fsyncing each and the directory, and keeps the newest 200. Every
	// complete file verifies: `lb-verify /data/w` in the guest, or
	// CheckWriterFile on the host.
	FsyncWriter = "fsync-writer"
	// Counter appends each line sent with SendCounter to /data/counter,
	// fsyncs, and acknowledges it (WaitCounter).
	Counter = "counter"
)

// Options says what guest to boot. The zero value is a guest named "guest"
// with a fresh 256 MiB ext4 data disk and no workload.
type Options struct {
	Workload string // None, FsyncWriter or Counter
	DiskSize int64  // bytes of the fresh data disk; ignored with Image
	Name     string // names the guest in messages and in QEMU's -name
	// Image boots on an existing data disk (qcow2 or raw holding ext4, say a
	// restored point) instead of a fresh one. It is used in place, not copied.
	Image string
}

// DefaultDiskSize is the data disk's size when Options.DiskSize is 0.
const DefaultDiskSize = 256 << 20

// BootTimeout bounds the wait from starting QEMU to the agent answering.
const BootTimeout = 60 * time.Second

// diskNode is the data disk's node name and NBD export name (and id) in the
// storage daemon, and the id of its device in the qemu-system process: the
// disk's name either way. vmDiskNode is its node in the qemu-system process.
const (
	diskNode   = "vda"
	vmDiskNode = "nbd-vda"
)

// Guest is one running test guest and the storage daemon holding its disk.
type Guest struct {
	t        testing.TB
	name     string
	dir      string // images and logs: the test's temporary directory
	sockDir  string // sockets: a short path, since unix socket paths are limited to 108 bytes
	image    string
	storage  *qemu.Daemon
	vm       *process
	bootTime time.Duration

	stopOnce sync.Once

	counterMu   sync.Mutex
	counterConn net.Conn
	acks        map[string]bool
	ackCond     *sync.Cond
	ackErr      error
}

// Boot builds the guest (cached across runs), makes its data disk, starts a
// qemu-storage-daemon serving the disk over NBD and a TCG qemu-system-x86_64
// using it, and waits until the guest agent answers. Cleanup stops both
// processes whatever the test's outcome. It skips (or fails under CI) when
// QEMU or the guest's ingredients are missing.
func Boot(t testing.TB, opts Options) *Guest {
	t.Helper()
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-storage-daemon", "qemu-img")
	if opts.Workload == "" {
		opts.Workload = None
	}
	switch opts.Workload {
	case None, FsyncWriter, Counter:
	default:
		t.Fatalf("testguest: unknown workload %q: use testguest.None, FsyncWriter or Counter", opts.Workload)
	}
	if opts.Name == "" {
		opts.Name = "guest"
	}
	if opts.DiskSize == 0 {
		opts.DiskSize = DefaultDiskSize
	}
	kernel, initrd := build(t)

	sockDir, err := os.MkdirTemp("", "lbg-")
	if err != nil {
		t.Fatalf("testguest: make socket directory: %v", err)
	}
	g := &Guest{t: t, name: opts.Name, dir: t.TempDir(), sockDir: sockDir, acks: map[string]bool{}}
	g.ackCond = sync.NewCond(&g.counterMu)
	t.Cleanup(g.Stop)

	g.image = opts.Image
	if g.image == "" {
		g.image = filepath.Join(g.dir, "data.qcow2")
		MakeDisk(t, g.image, opts.DiskSize, "qcow2")
	}
	format := "raw"
	if isQcow2(g.image) {
		format = "qcow2"
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	g.storage, err = qemu.StartDaemon(ctx, qemu.DaemonConfig{Dir: sockDir, NBD: true, Args: qemu.DiskArgs(diskNode, g.image, format)})
	cancel()
	if err != nil {
		t.Fatalf("testguest: %s: %v", opts.Name, err)
	}

	begin := time.Now()
	g.vm = start(t, g.dir, opts.Name+"-vm", "qemu-system-x86_64",
		"-name", opts.Name,
		"-accel", "tcg", "-M", "q35", "-m", "512", "-cpu", "max", "-smp", "1",
		"-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
		"-chardev", "file,id=console0,path="+optEscape(g.consolePath()),
		"-serial", "chardev:console0",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 lb.workload="+opts.Workload,
		// The device's id names the disk (as libvirt's virtio-disk0 does); its
		// node is named otherwise, as libvirt's libvirt-N-format are.
		"-blockdev", "driver=nbd,node-name="+vmDiskNode+",server.type=unix,server.path="+optEscape(g.StorageNBDSocket())+",export="+diskNode,
		"-device", "virtio-blk-pci,drive="+vmDiskNode+",id="+diskNode,
		"-device", "virtio-serial-pci",
		"-chardev", "socket,path="+optEscape(g.AgentSocket())+",server=on,wait=off,id=qga0",
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
		"-chardev", "socket,path="+optEscape(g.counterSocket())+",server=on,wait=off,id=counter0",
		"-device", "virtserialport,chardev=counter0,name=lb.counter",
		"-qmp", "unix:"+optEscape(g.VMQMPSocket())+",server=on,wait=off",
	)
	g.waitReady(begin)
	g.bootTime = time.Since(begin)
	t.Logf("testguest: %s booted, agent answering after %v", g.name, g.bootTime.Round(time.Millisecond))
	return g
}

// AgentSocket is the host end of the guest agent's virtio-serial port. QEMU
// serves one client at a time: close an Agent before another dials.
func (g *Guest) AgentSocket() string { return filepath.Join(g.sockDir, "qga.sock") }

// StorageQMPSocket is a QMP monitor, free for lifeboat, of the
// qemu-storage-daemon holding the data disk: the VM's block layer, which
// lifeboat fleeces. (The test itself has Storage().Monitor().)
func (g *Guest) StorageQMPSocket() string { return g.storage.ClientQMPSocket() }

// StorageNBDSocket is the storage daemon's NBD server; the disk is exported
// there under the name DiskNode().
func (g *Guest) StorageNBDSocket() string { return g.storage.NBDSocket() }

// Storage is the qemu-storage-daemon holding the data disk.
func (g *Guest) Storage() *qemu.Daemon { return g.storage }

// VMQMPSocket is the QMP monitor of the qemu-system process (to pause it, say).
func (g *Guest) VMQMPSocket() string { return filepath.Join(g.sockDir, "vm-qmp.sock") }

// DiskNode is the data disk's node name (and NBD export name) in the storage daemon.
func (g *Guest) DiskNode() string { return diskNode }

// DiskImage is the data disk's image file.
func (g *Guest) DiskImage() string { return g.image }

// Name is Options.Name.
func (g *Guest) Name() string { return g.name }

// BootTime is how long the guest took from starting QEMU to its agent answering.
func (g *Guest) BootTime() time.Duration { return g.bootTime }

func (g *Guest) consolePath() string   { return filepath.Join(g.dir, "console.log") }
func (g *Guest) counterSocket() string { return filepath.Join(g.sockDir, "counter.sock") }

// Console is the guest's serial output so far, for failure messages.
func (g *Guest) Console() string {
	b, err := os.ReadFile(g.consolePath())
	if err != nil {
		return fmt.Sprintf("(no console output: %v)", err)
	}
	return string(b)
}

// Shell runs a shell script in the guest through its agent and returns its
// stdout; a non-zero exit is an error quoting stderr.
func (g *Guest) Shell(ctx context.Context, script string) (string, error) {
	a, err := qga.Dial(ctx, g.AgentSocket())
	if err != nil {
		return "", err
	}
	defer a.Close()
	out, err := a.Output(ctx, "/bin/sh", "-c", script)
	return string(out), err
}

// Stop stops the VM, then quits the storage daemon through QMP (so its
// persistent bitmaps are saved). It is safe to call more than once; Boot registers
// it as cleanup.
func (g *Guest) Stop() {
	g.stopOnce.Do(func() {
		if g.t.Failed() {
			g.t.Logf("testguest: %s console:\n%s", g.name, tail(g.Console(), 40))
		}
		g.counterMu.Lock()
		if g.counterConn != nil {
			g.counterConn.Close()
		}
		g.counterMu.Unlock()
		if g.vm != nil {
			g.vm.stop(g.t, 5*time.Second)
		}
		if g.storage != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := g.storage.Stop(ctx); err != nil {
				g.t.Logf("testguest: %s: %v", g.name, err)
			}
			cancel()
		}
		os.RemoveAll(g.sockDir)
	})
}

// Signal sends sig to the guest's qemu-system and, with storage, to the
// qemu-storage-daemon holding its disk: SIGSTOP of both is a VM whose QEMU
// hangs (its monitor, its agent's port and its block layer all stop
// answering), of the qemu-system alone a guest that cannot write; SIGCONT
// resumes them.
func (g *Guest) Signal(sig syscall.Signal, storage bool) error {
	if err := g.vm.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("testguest: %s: signal qemu-system-x86_64: %w", g.name, err)
	}
	if storage {
		if err := syscall.Kill(g.storage.Pid(), sig); err != nil {
			return fmt.Errorf("testguest: %s: signal qemu-storage-daemon: %w", g.name, err)
		}
	}
	return nil
}

// Kill ends the guest as a lost production site does: SIGKILL of its
// qemu-system and of the storage daemon holding its disk (nothing saved).
func (g *Guest) Kill() {
	g.stopOnce.Do(func() {
		g.counterMu.Lock()
		if g.counterConn != nil {
			g.counterConn.Close()
		}
		g.counterMu.Unlock()
		if g.vm != nil && g.vm.cmd.Process != nil {
			g.vm.cmd.Process.Kill()
			<-g.vm.done
		}
		if g.storage != nil {
			if err := g.storage.Kill(); err != nil {
				g.t.Logf("testguest: %s: %v", g.name, err)
			}
		}
		os.RemoveAll(g.sockDir)
	})
}

// waitReady waits for the guest to say it is ready on its console and for
// its agent to answer.
func (g *Guest) waitReady(begin time.Time) {
	g.t.Helper()
	ctx, cancel := context.WithDeadline(context.Background(), begin.Add(BootTimeout))
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(g.Console(), "lifeboat-guest: ready") {
		select {
		case <-ctx.Done():
			g.t.Fatalf("testguest: %s not ready after %v; console:\n%s", g.name, BootTimeout, tail(g.Console(), 40))
		case <-g.vm.done:
			g.t.Fatalf("testguest: %s: qemu-system-x86_64 exited during boot (%v); its log:\n%s\nconsole:\n%s",
				g.name, g.vm.err, g.vm.log(), tail(g.Console(), 40))
		case <-tick.C:
		}
	}
	if strings.Contains(g.Console(), "lifeboat-guest: error") {
		g.t.Fatalf("testguest: %s reported an error while booting; console:\n%s", g.name, tail(g.Console(), 40))
	}
	a, err := qga.Dial(ctx, g.AgentSocket())
	if err == nil {
		err = a.Ping(ctx)
		a.Close()
	}
	if err != nil {
		g.t.Fatalf("testguest: %s: guest agent: %v; console:\n%s", g.name, err, tail(g.Console(), 40))
	}
}

// SendCounter sends one line to the guest's lb.counter port. With the Counter
// workload the guest appends it to /data/counter, fsyncs, and acknowledges it:
// WaitCounter waits for that.
func (g *Guest) SendCounter(line string) error {
	if strings.ContainsAny(line, "\n\r") {
		return fmt.Errorf("testguest: counter line %q holds a line break; send one line at a time", line)
	}
	g.counterMu.Lock()
	defer g.counterMu.Unlock()
	if g.counterConn == nil {
		c, err := net.DialTimeout("unix", g.counterSocket(), 5*time.Second)
		if err != nil {
			return fmt.Errorf("testguest: %s: connect to the lb.counter port: %w", g.name, err)
		}
		g.counterConn = c
		go g.readAcks(c)
	}
	g.counterConn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := g.counterConn.Write([]byte(line + "\n")); err != nil {
		return fmt.Errorf("testguest: %s: send %q to the lb.counter port: %w", g.name, line, err)
	}
	return nil
}

// Count sends line to the counter workload and waits until the guest has
// stored it. A line sent while lb-counter reopens its port can be lost, so
// it is sent once more if no acknowledgement came in 10 s (the guest may then
// store it twice); the wait ends 30 s after that.
func (g *Guest) Count(line string) error {
	var err error
	for try := range 2 {
		if err = g.SendCounter(line); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(10+20*try)*time.Second)
		err = g.WaitCounter(ctx, line)
		cancel()
		if err == nil {
			return nil
		}
	}
	return err
}

// WaitCounter waits until the guest has acknowledged line: it is then fsynced
// in /data/counter.
func (g *Guest) WaitCounter(ctx context.Context, line string) error {
	stop := context.AfterFunc(ctx, func() {
		g.counterMu.Lock()
		g.ackCond.Broadcast()
		g.counterMu.Unlock()
	})
	defer stop()
	g.counterMu.Lock()
	defer g.counterMu.Unlock()
	for !g.acks[line] {
		if g.ackErr != nil {
			return fmt.Errorf("testguest: %s: waiting for the guest to store counter %q: %w", g.name, line, g.ackErr)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("testguest: %s: guest did not acknowledge counter %q (is the workload %q?): %w", g.name, line, Counter, ctx.Err())
		}
		g.ackCond.Wait()
	}
	return nil
}

func (g *Guest) readAcks(c net.Conn) {
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "ack "); ok {
			g.counterMu.Lock()
			g.acks[line] = true
			g.ackCond.Broadcast()
			g.counterMu.Unlock()
		}
	}
	err := sc.Err()
	if err == nil {
		err = errors.New("lb.counter port closed")
	}
	g.counterMu.Lock()
	g.ackErr = err
	g.ackCond.Broadcast()
	g.counterMu.Unlock()
}

// process is a QEMU process a test started.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when it has exited; err is then set
	err     error
}

func start(t testing.TB, dir, name, prog string, args ...string) *process {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("testguest: create %s: %v", logPath, err)
	}
	defer logf.Close()
	cmd := exec.Command(prog, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// If the test binary dies without running cleanups (a timeout panic),
	// the kernel kills its QEMU processes instead of leaving them behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testguest: start %s: %v", prog, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p
}

// stop asks the process to quit (SIGTERM is a clean quit for QEMU) and kills
// it if it has not within limit.
func (p *process) stop(t testing.TB, limit time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(limit):
		t.Logf("testguest: %s did not quit within %v of SIGTERM; killing it", p.name, limit)
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *process) log() string {
	b, _ := os.ReadFile(p.logPath)
	return tail(string(b), 40)
}

func tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// optEscape escapes a value for QEMU's key=value options, where a comma ends
// the value unless doubled (t.TempDir keeps commas of test names).
func optEscape(v string) string { return strings.ReplaceAll(v, ",", ",,") }

func isQcow2(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	magic := make([]byte, 4)
	_, err = f.ReadAt(magic, 0)
	return err == nil && bytes.Equal(magic, []byte("QFI\xfb"))
}

// WaitThawed polls the guest agent until it says the guest's file systems are
// thawed, for at most within; it returns the last status seen.
func (g *Guest) WaitThawed(ctx context.Context, within time.Duration) (string, error) {
	var status string
	var err error
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		var a *qga.Agent
		if a, err = qga.Dial(c, g.AgentSocket()); err == nil {
			status, err = a.FreezeStatus(c)
			a.Close()
		}
		cancel()
		if err == nil && status == "thawed" {
			return status, nil
		}
	}
	return status, fmt.Errorf("guest %s still %q after %v (last error: %v)", g.name, status, within, err)
}

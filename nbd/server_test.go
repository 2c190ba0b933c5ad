package nbd

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// This file starts the real NBD servers the tests talk to. The qemu package has
// its own process management; nbd's tests stay independent of it on purpose.

// startServer runs name with args in the foreground, waits until it accepts
// connections on sock, and kills it when the test ends.
func startServer(t testing.TB, sock, name string, args ...string) *exec.Cmd {
	t.Helper()
	testenv.RequireTools(t, name)
	var stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not exit after kill", name, cmd.Process.Pid)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return cmd
		}
		select {
		case <-exited:
			t.Fatalf("%s %s exited before serving: %s", name, strings.Join(args, " "), stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen on %s within 10s: %s", name, sock, stderr.String())
		}
	}
}

// startNbdkit serves an nbdkit plugin (with filters given as --filter=X in args)
// on a unix socket and returns the socket's address for Dial.
func startNbdkit(t testing.TB, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	all := append([]string{"--foreground", "--unix", sock, "--exit-with-parent"}, args...)
	startServer(t, sock, "nbdkit", all...)
	return "unix:" + sock
}

// startQemuNbd serves image (format fmt) with qemu-nbd, export name "disk0",
// and returns its NBD URI; extra arguments come before the image.
func startQemuNbd(t testing.TB, image, format string, extra ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	args := append([]string{"--socket", sock, "--format", format, "--export-name", "disk0", "--persistent", "--shared", "8"}, extra...)
	startServer(t, sock, "qemu-nbd", append(args, image)...)
	return uri("unix:"+sock, "disk0")
}

// startQSD exports the qcow2 image as "disk0" from a qemu-storage-daemon.
// exportOpts are extra JSON members of the export, e.g. `"writable":true`.
// It returns the export's NBD URI.
func startQSD(t testing.TB, image string, exportOpts string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	export := `{"type":"nbd","id":"exp0","node-name":"disk0","name":"disk0"`
	if exportOpts != "" {
		export += "," + exportOpts
	}
	export += "}"
	startServer(t, sock, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=file0,filename="+image,
		"--blockdev", "driver=qcow2,node-name=disk0,file=file0",
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", export)
	return uri("unix:"+sock, "disk0")
}

// run runs a tool to completion within 30s and returns its stdout.
func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	testenv.RequireTools(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v: %s%s", name, strings.Join(args, " "), err, out, stderr.String())
	}
	return out
}

// qcow2 creates a qcow2 image of size in a temp dir.
func qcow2(t testing.TB, size string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, size)
	return img
}

// dial connects with a 10s bound and closes the client when the test ends.
func dial(t testing.TB, addr string, opts Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, "", opts)
	if err != nil {
		t.Fatalf("Dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// uri turns a "unix:" address into the NBD URI nbdinfo and qemu-io take.
func uri(addr, export string) string {
	return "nbd+unix:///" + export + "?socket=" + strings.TrimPrefix(addr, "unix:")
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

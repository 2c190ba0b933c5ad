package qemu_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// hungPeer is a deliberate fake: a unix listener that accepts connections and
// then behaves as a hung QEMU. greet makes it send the QMP greeting and
// answer qmp_capabilities first, so the hang comes at the first real command.
// No real QEMU can be made to hang on demand, hence the fake.
func hungPeer(t *testing.T, greet bool) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			if greet {
				c.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\n"))
				line, _ := bufio.NewReader(c).ReadString('\n')
				_ = line // qmp_capabilities
				c.Write([]byte(`{"return": {}, "id": "cap"}` + "\n"))
			}
		}
	}()
	return path
}

func TestHungPeerIsBoundedByContext(t *testing.T) {
	const bound = 300 * time.Millisecond
	t.Run("Dial", func(t *testing.T) {
		path := hungPeer(t, false)
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		start := time.Now()
		m, err := qemu.Dial(ctx, path)
		if err == nil {
			m.Close()
			t.Fatal("Dial to a peer that never greets succeeded")
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Dial error = %v, want it to wrap context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d > bound+time.Second {
			t.Errorf("Dial returned after %v, bound was %v", d, bound)
		}
	})
	t.Run("Execute", func(t *testing.T) {
		path := hungPeer(t, true)
		m, err := qemu.Dial(testCtx(t), path)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		start := time.Now()
		err = m.Execute(ctx, "query-version", nil, nil)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Execute error = %v, want it to wrap context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d > bound+time.Second {
			t.Errorf("Execute returned after %v, bound was %v", d, bound)
		}
	})
}

func TestExecute(t *testing.T) {
	vm := testvm.Start(t)
	ctx := testCtx(t)
	// A second connection to the same socket: QEMU serves one monitor client
	// per chardev, so use the daemon's own.
	m := vm.Monitor()

	var v struct {
		QEMU struct{ Major, Minor int } `json:"qemu"`
	}
	if err := m.Execute(ctx, "query-version", nil, &v); err != nil {
		t.Fatal(err)
	}
	if v.QEMU.Major < 7 {
		t.Errorf("query-version says QEMU %d.%d; want >= 7", v.QEMU.Major, v.QEMU.Minor)
	}

	err := m.Execute(ctx, "no-such-command", nil, nil)
	var qe *qemu.QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "no-such-command" {
		t.Errorf("unknown command: err = %#v, want *QMPError{Class: CommandNotFound, Command: no-such-command}", err)
	}

	// Concurrent commands each get their own reply.
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() {
			var nodes []map[string]any
			errs <- m.Execute(ctx, "query-named-block-nodes", nil, &nodes)
		}()
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestCommandAfterQEMUExitFails(t *testing.T) {
	vm := testvm.Start(t)
	ctx := testCtx(t)
	if err := vm.Daemon.Kill(); err != nil {
		t.Fatal(err)
	}
	err := vm.Monitor().Execute(ctx, "query-version", nil, nil)
	if !errors.Is(err, qemu.ErrClosed) {
		t.Errorf("after the daemon died: err = %v, want ErrClosed", err)
	}
}

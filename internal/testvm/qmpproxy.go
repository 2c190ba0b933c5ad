package testvm

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// LostCommand says which QMP command a LossyQMPSocket loses, and how.
type LostCommand struct {
	// Match picks the command (a line as the client sent it); only the first
	// match is lost.
	Match func(line []byte) bool
	// Ran: QEMU gets the command and runs it, and only its reply is lost.
	// Otherwise the command itself is lost and QEMU never sees it.
	Ran bool
	// Lost is called once the loss happened: QEMU has replied to the
	// command (Ran), or the command was dropped.
	Lost func()
}

// LossyQMPSocket is a QMP socket in front of the VM's client QMP socket that
// passes everything through but loses one command as lost says: what a
// client sees when its context ends while QEMU runs a command, or when the
// connection breaks after a command was sent. No real QEMU can be made to
// lose a reply on demand, hence the proxy; everything else is the real QMP.
func (v *VM) LossyQMPSocket(t testing.TB, lost LostCommand) string {
	t.Helper()
	var (
		mu     sync.Mutex
		once   sync.Once
		lostID string // the id of the command whose reply is dropped
	)
	idOf := func(line []byte) string {
		var m struct {
			ID json.RawMessage `json:"id"`
		}
		json.Unmarshal(line, &m)
		return string(m.ID)
	}
	toQEMU := func(line []byte) bool {
		if !lost.Match(bytes.TrimSpace(line)) {
			return false
		}
		drop := false
		once.Do(func() {
			if lost.Ran {
				mu.Lock()
				lostID = idOf(line)
				mu.Unlock()
			} else {
				drop = true
				lost.Lost()
			}
		})
		return drop
	}
	toClient := func(line []byte) bool {
		mu.Lock()
		drop := lostID != "" && idOf(line) == lostID
		if drop {
			lostID = ""
		}
		mu.Unlock()
		if drop {
			lost.Lost()
		}
		return drop
	}
	return proxyQMP(t, filepath.Join(v.Dir, "qmp-lossy.sock"), v.QMPSocket(), toQEMU, toClient)
}

// TapQMPSocket is a QMP socket at path in front of upstream (a QMP socket)
// that passes everything through, calling before with each line a client
// sends before QEMU gets it: a test acts at the moment a command is sent
// (stops QEMU with SIGSTOP while the command is in flight, say).
func TapQMPSocket(t testing.TB, path, upstream string, before func(line []byte)) string {
	t.Helper()
	return proxyQMP(t, path, upstream,
		func(line []byte) bool { before(bytes.TrimSpace(line)); return false },
		func([]byte) bool { return false })
}

// proxyQMP serves a socket at path in front of upstream, a connection to
// upstream for each client, passing lines either way but those that toQEMU
// or toClient drop, until the test ends.
func proxyQMP(t testing.TB, path, upstream string, toQEMU, toClient func(line []byte) (drop bool)) string {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("testvm: %v", err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
		os.Remove(path)
	})
	// relay copies lines from src to dst, but those drop says, until either ends.
	relay := func(dst, src net.Conn, drop func(line []byte) bool) {
		defer wg.Done()
		defer dst.Close()
		br := bufio.NewReader(src)
		for {
			line, err := br.ReadBytes('\n')
			if len(line) > 0 && !drop(line) {
				if _, err := dst.Write(line); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("unix", upstream)
			if err != nil {
				c.Close()
				continue
			}
			track(c)
			track(u)
			wg.Add(2)
			go relay(u, c, toQEMU)
			go relay(c, u, toClient)
		}
	}()
	return path
}

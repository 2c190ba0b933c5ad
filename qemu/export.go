package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ErrNBDServerRunning is why NBDServerStart failed when the QEMU process
// already runs an NBD server: QEMU runs at most one, wherever it listens.
var ErrNBDServerRunning = errors.New("an NBD server is already running in this QEMU")

// NBDServerStart starts QEMU's NBD server on a unix socket. If a server is
// already running (on that socket or another) it returns an error wrapping
// ErrNBDServerRunning: QEMU cannot be asked where that one listens (7.2 has
// no query for the server's address), but ServesNBD tells whether it is on a
// given socket.
func (m *Monitor) NBDServerStart(ctx context.Context, unixSocket string) error {
	args := map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": unixSocket}}}
	err := m.Execute(ctx, "nbd-server-start", args, nil)
	if qe := (*QMPError)(nil); errors.As(err, &qe) && strings.Contains(qe.Desc, "already running") {
		return fmt.Errorf("start NBD server on %s: %w", unixSocket, ErrNBDServerRunning)
	}
	if err != nil {
		return fmt.Errorf("start NBD server on %s: %w", unixSocket, err)
	}
	return nil
}

// NBDServerStop stops QEMU's NBD server, closing every NBD export on it and
// its socket (QEMU removes the socket file). Only the one who started the
// server may stop it.
func (m *Monitor) NBDServerStop(ctx context.Context) error {
	if err := m.Execute(ctx, "nbd-server-stop", nil, nil); err != nil {
		return fmt.Errorf("stop NBD server: %w", err)
	}
	return nil
}

// ServesNBD reports whether this QEMU's NBD server listens on the unix
// socket. QMP cannot say where the server listens, so the socket's listener
// is compared with the monitor's peer (SO_PEERCRED): the same process. It is
// false when nothing listens there, when another process does, and when the
// monitor's peer is unknown: never a guess that would let a caller stop
// another's server.
func (m *Monitor) ServesNBD(ctx context.Context, unixSocket string) (bool, error) {
	qemuPID, err := peerPID(m.conn)
	if err != nil || qemuPID <= 0 {
		return false, nil
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", unixSocket)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return false, nil // no socket, or a socket nobody listens on (its QEMU is gone)
		}
		return false, fmt.Errorf("check NBD socket %s: %w", unixSocket, err)
	}
	defer c.Close()
	pid, err := peerPID(c)
	if err != nil {
		return false, fmt.Errorf("check NBD socket %s: %w", unixSocket, err)
	}
	return pid == qemuPID, nil
}

// UnixListener is a unix socket a QEMU process listens on.
type UnixListener struct {
	// Path is the path the socket was bound to: the file may have been moved
	// or removed since (QEMU still listens, but nobody can connect by path).
	Path string
	// Clients is how many connections QEMU accepted on it are still open.
	Clients int
}

// UnixListeners lists the unix sockets the monitor's QEMU process listens on
// (its QMP sockets, chardevs, its NBD server...). QMP cannot say where the NBD
// server listens (QEMU 7.2 has no query for it), so this asks the kernel:
// the socket inodes among the process's file descriptors, looked up in
// /proc/PID/net/unix. It needs the right to read the process's fds (the same
// user, or root); without it, it returns an error and no guess.
func (m *Monitor) UnixListeners() ([]UnixListener, error) {
	pid, err := peerPID(m.conn)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("list QEMU's unix sockets: the monitor's process is unknown (%v)", err)
	}
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, fmt.Errorf("list QEMU's unix sockets: %w", err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		l, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if ino, ok := strings.CutPrefix(l, "socket:["); err == nil && ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	table, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		return nil, fmt.Errorf("list QEMU's unix sockets: %w", err)
	}
	return parseUnixTable(string(table), inodes), nil
}

// parseUnixTable picks from /proc/net/unix the listening sockets whose inode
// is one of the process's, with the count of the process's connections on
// each (an accepted connection carries its listener's path).
func parseUnixTable(table string, inodes map[string]bool) []UnixListener {
	const (
		acceptCon   = 0x10000 // __SO_ACCEPTCON: listening
		unconnected = "01"
		connected   = "03"
	)
	var out []UnixListener
	clients := map[string]int{}
	for _, line := range strings.Split(table, "\n")[1:] {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(line)
		if len(f) < 8 || !inodes[f[6]] || strings.HasPrefix(f[7], "@") {
			continue // not QEMU's, unbound, or abstract
		}
		path := strings.Join(f[7:], " ")
		flags, _ := strconv.ParseUint(f[3], 16, 32)
		switch {
		case flags&acceptCon != 0 && f[5] == unconnected:
			out = append(out, UnixListener{Path: path})
		case f[5] == connected:
			clients[path]++
		}
	}
	for i := range out {
		out[i].Clients = clients[out[i].Path]
	}
	return out
}

// peerPID is the process at the other end of a unix socket: for a
// connection to a listening socket, the process that listens.
func peerPID(c net.Conn) (int, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("not a unix socket: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return int(cred.Pid), nil
}

// Export is an NBD export of a node on the monitor's NBD server.
type Export struct {
	ID       string   // QEMU's id of the export
	Node     string   // the node exported
	Name     string   // NBD export name ("" = the node name)
	Writable bool     //
	Bitmaps  []string // dirty bitmaps published as qemu:dirty-bitmap:NAME (must be disabled on a read-only export)
}

// ExportAdd adds an NBD export.
func (m *Monitor) ExportAdd(ctx context.Context, e Export) error {
	args := map[string]any{"type": "nbd", "id": e.ID, "node-name": e.Node, "writable": e.Writable}
	if e.Name != "" {
		args["name"] = e.Name
	}
	if len(e.Bitmaps) > 0 {
		args["bitmaps"] = e.Bitmaps
	}
	if err := m.Execute(ctx, "block-export-add", args, nil); err != nil {
		return fmt.Errorf("export node %q as %q: %w", e.Node, e.Name, err)
	}
	return nil
}

// ExportDel removes an export that has no clients connected (QEMU refuses
// with "still in use" otherwise) and waits, bounded by ctx, for QEMU to
// report it deleted.
func (m *Monitor) ExportDel(ctx context.Context, id string) error {
	return m.exportDel(ctx, id, "safe")
}

// ExportDelForce drops the export's clients and removes it, waiting as ExportDel.
func (m *Monitor) ExportDelForce(ctx context.Context, id string) error {
	return m.exportDel(ctx, id, "hard")
}

func (m *Monitor) exportDel(ctx context.Context, id, mode string) error {
	sub := m.Subscribe("BLOCK_EXPORT_DELETED")
	defer sub.Close()
	if err := m.Execute(ctx, "block-export-del", map[string]any{"id": id, "mode": mode}, nil); err != nil {
		return fmt.Errorf("delete export %q: %w", id, err)
	}
	_, err := sub.Wait(ctx, func(ev Event) bool {
		return idOf(ev) == id
	})
	if err != nil {
		return fmt.Errorf("delete export %q: not deleted yet: %w", id, err)
	}
	return nil
}

func idOf(ev Event) string {
	var d struct {
		ID string `json:"id"`
	}
	json.Unmarshal(ev.Data, &d)
	return d.ID
}

// ExportInfo is an export as query-block-exports reports it.
type ExportInfo struct {
	ID           string `json:"id"`
	Type         string `json:"type"`
	Node         string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// Exports lists the block exports.
func (m *Monitor) Exports(ctx context.Context) ([]ExportInfo, error) {
	var ex []ExportInfo
	if err := m.Execute(ctx, "query-block-exports", nil, &ex); err != nil {
		return nil, err
	}
	return ex, nil
}

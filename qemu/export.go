package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
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

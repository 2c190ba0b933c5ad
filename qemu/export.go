package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// NBDServerStart starts QEMU's NBD server on a unix socket. If a server is
// already running it returns nil: the caller must then know its socket.
func (m *Monitor) NBDServerStart(ctx context.Context, unixSocket string) error {
	args := map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": unixSocket}}}
	err := m.Execute(ctx, "nbd-server-start", args, nil)
	if qe := (*QMPError)(nil); errors.As(err, &qe) && strings.Contains(qe.Desc, "already running") {
		return nil
	}
	if err != nil {
		return fmt.Errorf("start NBD server on %s: %w", unixSocket, err)
	}
	return nil
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

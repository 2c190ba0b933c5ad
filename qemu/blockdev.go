package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// cleanupTimeout bounds the undo steps that run after the caller's context has
// already ended (cancelling a job we started, deleting a node we added).
const cleanupTimeout = 30 * time.Second

// BlockdevAdd adds a node described as blockdev-add arguments, e.g.
// {"driver": "qcow2", "node-name": "ov1", "file": {"driver": "file", "filename": "/x/ov1.qcow2"}}.
func (m *Monitor) BlockdevAdd(ctx context.Context, spec map[string]any) error {
	if err := m.Execute(ctx, "blockdev-add", spec, nil); err != nil {
		return fmt.Errorf("add block node %v: %w", spec["node-name"], err)
	}
	return nil
}

// BlockdevDel removes a node that nothing uses any more.
func (m *Monitor) BlockdevDel(ctx context.Context, node string) error {
	if err := m.Execute(ctx, "blockdev-del", map[string]any{"node-name": node}, nil); err != nil {
		return fmt.Errorf("delete block node %q: %w", node, err)
	}
	return nil
}

// BlockResize changes a node's virtual size.
func (m *Monitor) BlockResize(ctx context.Context, node string, size int64) error {
	if err := m.Execute(ctx, "block_resize", map[string]any{"node-name": node, "size": size}, nil); err != nil {
		return fmt.Errorf("resize block node %q to %d bytes: %w", node, size, err)
	}
	return nil
}

// BlockJob is a running block job as query-block-jobs reports it.
type BlockJob struct {
	ID     string `json:"device"` // the job id
	Type   string `json:"type"`   // backup, commit, mirror, stream
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Status string `json:"status"` // running, ready, paused, concluded, ...
}

// Jobs lists the block jobs.
func (m *Monitor) Jobs(ctx context.Context) ([]BlockJob, error) {
	var jobs []BlockJob
	if err := m.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	return jobs, nil
}

type jobEvent struct {
	Device string `json:"device"`
	Type   string `json:"type"`
	Error  string `json:"error"`
}

func decodeJobEvent(ev Event) jobEvent {
	var je jobEvent
	json.Unmarshal(ev.Data, &je)
	return je
}

// BlockCommit merges topNode into its backing baseNode and waits until the job
// has finished. device is the node at the top of the chain (the one the users
// of the chain see). When topNode is that active layer, the job is completed
// once it is ready. If ctx ends first the job is cancelled.
func (m *Monitor) BlockCommit(ctx context.Context, jobID, device, topNode, baseNode string) error {
	sub := m.Subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY")
	defer sub.Close()
	args := map[string]any{"job-id": jobID, "device": device, "top-node": topNode, "base-node": baseNode}
	what := fmt.Sprintf("commit %q into %q (job %q)", topNode, baseNode, jobID)
	if err := m.Execute(ctx, "block-commit", args, nil); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	for {
		ev, err := sub.Wait(ctx, func(ev Event) bool { return decodeJobEvent(ev).Device == jobID })
		if err != nil {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			cerr := m.CancelJob(cctx, jobID)
			cancel()
			return errors.Join(fmt.Errorf("%s: %w (job cancelled)", what, err), cerr)
		}
		je := decodeJobEvent(ev)
		switch ev.Name {
		case "BLOCK_JOB_READY":
			// Committing the active layer: the job mirrors until told to pivot.
			if err := m.Execute(ctx, "block-job-complete", map[string]any{"device": jobID}, nil); err != nil {
				return fmt.Errorf("%s: complete: %w", what, err)
			}
		case "BLOCK_JOB_CANCELLED":
			return fmt.Errorf("%s: the job was cancelled by someone else", what)
		case "BLOCK_JOB_COMPLETED":
			if je.Error != "" {
				return fmt.Errorf("%s: %s", what, je.Error)
			}
			return nil
		}
	}
}

// CancelJob cancels a block job and waits until it is gone. A job that does
// not exist (any more) is not an error.
func (m *Monitor) CancelJob(ctx context.Context, jobID string) error {
	sub := m.Subscribe("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
	defer sub.Close()
	err := m.Execute(ctx, "block-job-cancel", map[string]any{"device": jobID, "force": true}, nil)
	// QEMU 7.2 says DeviceNotActive ("Block job 'x' not found").
	if qe := (*QMPError)(nil); errors.As(err, &qe) && (qe.Class == "DeviceNotActive" || qe.Class == "DeviceNotFound") {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cancel block job %q: %w", jobID, err)
	}
	if _, err := sub.Wait(ctx, func(ev Event) bool { return decodeJobEvent(ev).Device == jobID }); err != nil {
		return fmt.Errorf("cancel block job %q: it did not end: %w", jobID, err)
	}
	return nil
}

package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"syscall"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/recovery"
)

// Client talks to a running site over its local API socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the site whose API socket is given.
func NewClient(socket string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://lifeboat"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("no lifeboat site answers at %s: start it with `lifeboat serve -c site.yaml`", c.socket)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
			// The request went; the site ended before it answered (it was
			// stopped or killed): what it did of it is for status to say.
			return nil, fmt.Errorf("the lifeboat site at %s ended before it answered (%v): see its log, and `lifeboat status` (`lifeboat failover --list` for runs) for what was done; run the command again once the site runs", c.socket, err)
		}
		return nil, fmt.Errorf("lifeboat site at %s: %w", c.socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var e Event
		if json.NewDecoder(resp.Body).Decode(&e) == nil && e.Error != "" {
			return nil, errors.New(e.Error)
		}
		return nil, fmt.Errorf("lifeboat site at %s: %s", c.socket, resp.Status)
	}
	return resp, nil
}

func (c *Client) getJSON(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(out)
}

// events reads a streamed answer, handing each progress event to fn, and returns the last event.
func events(resp *http.Response, fn func(json.RawMessage)) (Event, error) {
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var raw struct {
			Progress json.RawMessage `json:"progress"`
		}
		line := sc.Bytes()
		if err := json.Unmarshal(line, &raw); err != nil {
			return Event{}, fmt.Errorf("bad event from the site: %w", err)
		}
		if raw.Progress != nil {
			if fn != nil {
				fn(raw.Progress)
			}
			continue
		}
		var e Event
		if err := json.Unmarshal(line, &e); err != nil {
			return Event{}, fmt.Errorf("bad event from the site: %w", err)
		}
		return e, nil
	}
	if err := sc.Err(); err != nil {
		return Event{}, fmt.Errorf("the site stopped answering mid-operation (%v): see its log; the operation's outcome is in `lifeboat status`", err)
	}
	return Event{}, errors.New("the site closed the answer before the result: see its log")
}

// Status is every VM of the site.
func (c *Client) Status(ctx context.Context) (StatusReply, error) {
	var s StatusReply
	return s, c.getJSON(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Sync runs one cycle of vm now and returns its committed point.
func (c *Client) Sync(ctx context.Context, vm string, progress func(protect.Progress)) (lifeboat.Point, error) {
	pts, err := c.SyncAll(ctx, vm, false, progress)
	if err != nil {
		return lifeboat.Point{}, err
	}
	if len(pts) != 1 {
		return lifeboat.Point{}, fmt.Errorf("%q is a consistency group: %d points", vm, len(pts))
	}
	return pts[0], nil
}

// SyncAll runs one cycle of a VM or a consistency group now and returns the
// committed points (one per member of a group). With a group, points that did
// commit are returned along with the error of the members that did not.
func (c *Client) SyncAll(ctx context.Context, name string, whole bool, progress func(protect.Progress)) ([]lifeboat.Point, error) {
	path := "/v1/vms/" + url.PathEscape(name) + "/sync"
	if whole {
		path += "?whole=1"
	}
	e, err := c.cycle(ctx, path, progress)
	if err != nil {
		return nil, err
	}
	pts := e.Points
	if e.Point != nil {
		pts = append(pts, *e.Point)
	}
	if e.Error != "" {
		return pts, errors.New(e.Error)
	}
	if len(pts) == 0 {
		return nil, errors.New("the site answered without a point")
	}
	return pts, nil
}

// cycle posts to path, whose answer is a cycle's stream (streamCycle): the
// progress goes to progress, and the last event is returned.
func (c *Client) cycle(ctx context.Context, path string, progress func(protect.Progress)) (Event, error) {
	resp, err := c.do(ctx, http.MethodPost, path, nil)
	if err != nil {
		return Event{}, err
	}
	return events(resp, func(raw json.RawMessage) {
		var p protect.Progress
		if progress != nil && json.Unmarshal(raw, &p) == nil {
			progress(p)
		}
	})
}

// Points lists vm's restore points, oldest first.
func (c *Client) Points(ctx context.Context, vm string) ([]lifeboat.Point, error) {
	var pts []lifeboat.Point
	return pts, c.getJSON(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/points", nil, &pts)
}

// Export writes a point's disk to a file at the recovery site.
func (c *Client) Export(ctx context.Context, vm string, req ExportRequest) (lifeboat.Point, error) {
	var e Event
	if err := c.getJSON(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/export", req, &e); err != nil {
		return lifeboat.Point{}, err
	}
	if e.Error != "" {
		return lifeboat.Point{}, errors.New(e.Error)
	}
	if e.Point == nil {
		return lifeboat.Point{}, errors.New("the site answered without a point")
	}
	return *e.Point, nil
}

// Verify re-reads a point at the recovery site against its recorded hashes.
func (c *Client) Verify(ctx context.Context, vm string, point uint64, progress func(VerifyProgress)) (recovery.VerifyReport, error) {
	resp, err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/verify?point="+strconv.FormatUint(point, 10), nil)
	if err != nil {
		return recovery.VerifyReport{}, err
	}
	e, err := events(resp, func(raw json.RawMessage) {
		var p VerifyProgress
		if progress != nil && json.Unmarshal(raw, &p) == nil {
			progress(p)
		}
	})
	if err != nil {
		return recovery.VerifyReport{}, err
	}
	var rep recovery.VerifyReport
	if e.Verify != nil {
		rep = *e.Verify
	}
	if e.Error != "" {
		return rep, errors.New(e.Error)
	}
	return rep, nil
}

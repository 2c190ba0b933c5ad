// Package qga talks to the QEMU guest agent (qemu-ga) over the host side of its
// virtio-serial channel: to freeze and thaw a guest's file systems and run commands in it.
package qga

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"time"
)

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 10 * time.Second

// Agent is a connection to one guest's agent. Its methods may be called from
// several goroutines; the agent answers one command at a time, so they take
// turns.
type Agent struct {
	socket string
	conn   net.Conn
	r      *bufio.Reader
	turn   chan struct{} // holds one token: whoever takes it owns the connection
	// stale is set when a call gave up before its reply arrived: the reply
	// may still come, so the next call resyncs first.
	stale bool
}

// Dial connects to the agent behind a unix socket (a QEMU chardev such as
// -chardev socket,path=qga.sock,server=on,wait=off) and syncs with it, so that
// replies meant for an earlier client are not taken for ours.
func Dial(ctx context.Context, socket string) (*Agent, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("qga: connect to guest agent socket %s: %w (is the VM running with a virtserialport named org.qemu.guest_agent.0 on it?)", socket, err)
	}
	a := &Agent{socket: socket, conn: conn, r: bufio.NewReaderSize(conn, 64<<10), turn: make(chan struct{}, 1), stale: true}
	a.turn <- struct{}{}
	if err := a.do(ctx, func() error { return nil }); err != nil {
		conn.Close()
		return nil, err
	}
	return a, nil
}

// Close closes the connection. A call in progress fails.
func (a *Agent) Close() error { return a.conn.Close() }

// call runs one command and decodes its return value into out (when out is
// not nil).
func (a *Agent) call(ctx context.Context, command string, args, out any) error {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	req, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
	}{command, args})
	if err != nil {
		return fmt.Errorf("qga: encode %s: %w", command, err)
	}
	req = append(req, '\n')
	return a.do(ctx, func() error {
		if _, err := a.conn.Write(req); err != nil {
			return a.ioError(ctx, command, "send", err)
		}
		ret, err := readReply(a.r, command)
		var agentErr *Error
		switch {
		case errors.As(err, &agentErr):
			return err
		case errors.Is(err, errMalformed):
			a.stale = true
			return fmt.Errorf("qga: %s on %s: %w; the next call resyncs", command, a.socket, err)
		case err != nil:
			return a.ioError(ctx, command, "read the reply to", err)
		}
		if out == nil {
			return nil
		}
		if err := json.Unmarshal(ret, out); err != nil {
			return fmt.Errorf("qga: %s on %s: unexpected return value %.200s: %w", command, a.socket, ret, err)
		}
		return nil
	})
}

// do takes the connection for one exchange, bounded by ctx, resyncing first
// if an earlier exchange was abandoned.
func (a *Agent) do(ctx context.Context, exchange func() error) error {
	select {
	case <-a.turn:
	case <-ctx.Done():
		return fmt.Errorf("qga: waiting for another call on %s to finish: %w", a.socket, ctx.Err())
	}
	defer func() { a.turn <- struct{}{} }()

	deadline, _ := ctx.Deadline()
	if err := a.conn.SetDeadline(deadline); err != nil {
		return fmt.Errorf("qga: set deadline on %s: %w", a.socket, err)
	}
	// Cancelling ctx must interrupt a blocked read too.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		a.conn.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired // so its SetDeadline cannot land on the next call
		}
	}()

	if a.stale {
		if err := a.sync(ctx); err != nil {
			return err
		}
	}
	return exchange()
}

// sync sends the sentinel and guest-sync-delimited with a fresh random id and
// reads until the agent echoes that id.
func (a *Agent) sync(ctx context.Context) error {
	id := rand.Uint64() >> 11 // JSON numbers are exact only up to 2^53
	req := fmt.Appendf([]byte{sentinel}, `{"execute":"guest-sync-delimited","arguments":{"id":%d}}`+"\n", id)
	if _, err := a.conn.Write(req); err != nil {
		return a.ioError(ctx, "guest-sync-delimited", "send", err)
	}
	if err := readSync(a.r, id); err != nil {
		if errors.Is(err, errMalformed) {
			return fmt.Errorf("qga: sync with guest agent on %s: %w", a.socket, err)
		}
		return a.ioError(ctx, "guest-sync-delimited", "read the reply to", err)
	}
	a.stale = false
	return nil
}

// ioError marks the connection stale and says what to check.
func (a *Agent) ioError(ctx context.Context, command, what string, err error) error {
	a.stale = true
	if errors.Is(err, os.ErrDeadlineExceeded) {
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("qga: %s %s on %s: %w", what, command, a.socket, ctx.Err())
		}
		return fmt.Errorf("qga: %s %s on %s: no answer in time (is qemu-ga running in the guest? the guest console may say why not): %w",
			what, command, a.socket, context.DeadlineExceeded)
	}
	return fmt.Errorf("qga: %s %s on %s: %w", what, command, a.socket, err)
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultTimeout)
}

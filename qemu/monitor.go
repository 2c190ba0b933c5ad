// Package qemu drives the QEMU mechanisms lifeboat stands on: QMP, dirty bitmaps,
// the fleece transaction, NBD exports, block jobs, qemu-storage-daemon and qemu-img.
package qemu

// This is a small QMP client of our own rather than go-qemu's SocketMonitor:
// that one has no context on Connect/Run (a hung QEMU hangs the caller), reads
// lines with a bufio.Scanner capped at 64 KiB (query-named-block-nodes with
// bitmaps outgrows it and the monitor then goes silent), matches replies by
// order rather than by id (one abandoned command shifts every later reply),
// and blocks its reader on an unbuffered event channel. Here every command
// carries an id, every wait is bounded by its context, and events fan out to
// subscribers that never block the reader.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// DefaultCommandTimeout bounds one QMP round trip when the caller's context has
// no deadline of its own, so a hung QEMU never hangs lifeboat.
const DefaultCommandTimeout = 2 * time.Minute

// ErrClosed is returned by commands on a monitor whose connection is gone:
// closed by us, or QEMU exited.
var ErrClosed = errors.New("QMP connection closed")

// QMPError is an error QEMU returned for a command.
type QMPError struct {
	Class   string // GenericError, CommandNotFound, DeviceNotFound, ...
	Desc    string
	Command string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("QMP %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string
	Data      json.RawMessage
	Timestamp time.Time
}

// Monitor is a connection to one QMP socket. It is safe for concurrent use.
type Monitor struct {
	conn    net.Conn
	path    string
	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[string]pendingCmd
	subs    map[*Subscription]struct{}
	closed  bool
	err     error // why the reader stopped
	done    chan struct{}
}

// pendingCmd is a command sent and not answered yet.
type pendingCmd struct {
	ch      chan reply
	command string
	sent    time.Time
}

type reply struct {
	ret json.RawMessage
	err *QMPError
}

// message is anything QEMU sends: a greeting, a reply or an event.
type message struct {
	QMP    json.RawMessage `json:"QMP"`
	ID     json.RawMessage `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Dial connects to a QMP unix socket, reads the greeting and negotiates
// capabilities. The whole handshake is bounded by ctx.
func Dial(ctx context.Context, qmpSocket string) (*Monitor, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", qmpSocket)
	if err != nil {
		return nil, fmt.Errorf("connect to QMP socket %s: %w (is QEMU running with this monitor socket?)", qmpSocket, err)
	}
	// Unblock the handshake's reads and writes when ctx ends.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	dec := json.NewDecoder(conn)
	err = handshake(conn, dec)
	if !stop() || ctx.Err() != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP handshake on %s: %w (QEMU did not greet in time: is it hung, or is another client connected? a QMP socket serves one client at a time)", qmpSocket, context.Cause(ctx))
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP handshake on %s: %w", qmpSocket, err)
	}
	conn.SetDeadline(time.Time{})
	m := &Monitor{
		conn:    conn,
		path:    qmpSocket,
		pending: make(map[string]pendingCmd),
		subs:    make(map[*Subscription]struct{}),
		done:    make(chan struct{}),
	}
	go m.read(dec)
	return m, nil
}

func handshake(conn net.Conn, dec *json.Decoder) error {
	var greet message
	if err := dec.Decode(&greet); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if greet.QMP == nil {
		return errors.New("peer did not greet with QMP: is this a QMP socket (not HMP)?")
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities","id":"cap"}` + "\n")); err != nil {
		return fmt.Errorf("send qmp_capabilities: %w", err)
	}
	for {
		var msg message
		if err := dec.Decode(&msg); err != nil {
			return fmt.Errorf("read qmp_capabilities reply: %w", err)
		}
		if msg.Event != "" {
			continue // events may come before the reply; nobody listens yet
		}
		if msg.Error != nil {
			return &QMPError{Class: msg.Error.Class, Desc: msg.Error.Desc, Command: "qmp_capabilities"}
		}
		return nil
	}
}

// read dispatches replies to their commands and events to subscribers until
// the connection ends.
func (m *Monitor) read(dec *json.Decoder) {
	var err error
	for {
		var msg message
		if err = dec.Decode(&msg); err != nil {
			break
		}
		ev, id, r, ok := sortMessage(&msg)
		if ev != nil {
			m.mu.Lock()
			for s := range m.subs {
				s.push(*ev)
			}
			m.mu.Unlock()
			continue
		}
		if !ok {
			continue // a reply to nothing we sent
		}
		m.mu.Lock()
		pc, ok := m.pending[id]
		delete(m.pending, id)
		m.mu.Unlock()
		if ok {
			pc.ch <- r // buffered
		}
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	m.mu.Lock()
	m.err = err
	m.closed = true
	m.pending = nil
	for s := range m.subs {
		s.end()
	}
	m.mu.Unlock()
	close(m.done)
}

// sortMessage tells what one message from QEMU is: an event (ev), a reply to
// the command of that id (ok), or neither (a reply to nothing we sent).
func sortMessage(msg *message) (ev *Event, id string, r reply, ok bool) {
	if msg.Event != "" {
		return &Event{Name: msg.Event, Data: msg.Data,
			Timestamp: time.Unix(msg.Timestamp.Seconds, msg.Timestamp.Microseconds*1000)}, "", reply{}, false
	}
	if json.Unmarshal(msg.ID, &id) != nil {
		return nil, "", reply{}, false
	}
	r = reply{ret: msg.Return}
	if msg.Error != nil {
		r.err = &QMPError{Class: msg.Error.Class, Desc: msg.Error.Desc}
	}
	return nil, id, r, true
}

// Close closes the connection. Commands in flight return ErrClosed.
func (m *Monitor) Close() error {
	err := m.conn.Close()
	<-m.done
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Done is closed when the connection has ended (Close, or QEMU went away).
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Execute runs one QMP command and decodes its return value into result (which
// may be nil). args is marshalled as the command's arguments (nil for none).
// A QMP error comes back as *QMPError. When ctx has no deadline the round trip
// is bounded by DefaultCommandTimeout.
func (m *Monitor) Execute(ctx context.Context, command string, args any, result any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	cmd := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{Execute: command, Arguments: args}
	ch := make(chan reply, 1)
	m.mu.Lock()
	if m.closed {
		err := m.err
		m.mu.Unlock()
		return fmt.Errorf("QMP %s on %s: %w", command, m.path, err)
	}
	m.nextID++
	cmd.ID = strconv.FormatUint(m.nextID, 10)
	m.pending[cmd.ID] = pendingCmd{ch: ch, command: command, sent: time.Now()}
	m.mu.Unlock()
	forget := func() {
		m.mu.Lock()
		delete(m.pending, cmd.ID)
		m.mu.Unlock()
	}

	b, err := json.Marshal(cmd)
	if err != nil {
		forget()
		return fmt.Errorf("QMP %s: encode arguments: %w", command, err)
	}
	if err := m.write(ctx, append(b, '\n')); err != nil {
		forget()
		return fmt.Errorf("QMP %s on %s: send: %w", command, m.path, err)
	}
	var r reply
	select {
	case r = <-ch:
	case <-m.done:
		select {
		case r = <-ch: // the reply came just before the connection ended
		default:
			return fmt.Errorf("QMP %s on %s: %w", command, m.path, m.err)
		}
	case <-ctx.Done():
		forget()
		return fmt.Errorf("QMP %s on %s: no reply: %w", command, m.path, context.Cause(ctx))
	}
	if r.err != nil {
		r.err.Command = command
		return r.err
	}
	if result != nil && r.ret != nil {
		if err := json.Unmarshal(r.ret, result); err != nil {
			return fmt.Errorf("QMP %s: decode reply: %w", command, err)
		}
	}
	return nil
}

// Unanswered is the command that has waited longest for its reply, and
// how long it has waited; "" and 0 when none waits. QEMU answers a
// monitor's commands in order, in milliseconds unless it is hung: a
// caller can tell a hung QEMU by this, however long its own work takes.
func (m *Monitor) Unanswered() (command string, waited time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var oldest time.Time
	for _, pc := range m.pending {
		if oldest.IsZero() || pc.sent.Before(oldest) {
			oldest, command = pc.sent, pc.command
		}
	}
	if oldest.IsZero() {
		return "", 0
	}
	return command, time.Since(oldest)
}

func (m *Monitor) write(ctx context.Context, b []byte) error {
	m.writeMu.Lock()
	defer m.writeMu.Unlock()
	dl, _ := ctx.Deadline()
	m.conn.SetWriteDeadline(dl)
	_, err := m.conn.Write(b)
	return err
}

// Subscription receives the events named when it was made, in order, from the
// moment Subscribe returned. Subscribe before sending the command whose event
// you wait for, so the event cannot slip by.
type Subscription struct {
	m      *Monitor
	names  map[string]bool // nil: every event
	mu     sync.Mutex
	queue  []Event
	notify chan struct{}
	ended  bool
}

// Subscribe starts collecting the named events (all events when none are named).
// Close the subscription when done with it.
func (m *Monitor) Subscribe(names ...string) *Subscription {
	s := &Subscription{m: m, notify: make(chan struct{}, 1)}
	if len(names) > 0 {
		s.names = make(map[string]bool, len(names))
		for _, n := range names {
			s.names[n] = true
		}
	}
	m.mu.Lock()
	if m.closed {
		s.ended = true
	} else {
		m.subs[s] = struct{}{}
	}
	m.mu.Unlock()
	return s
}

// push never blocks: the reader must keep reading replies.
func (s *Subscription) push(ev Event) {
	if s.names != nil && !s.names[ev.Name] {
		return
	}
	s.mu.Lock()
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *Subscription) end() {
	s.mu.Lock()
	s.ended = true
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Next returns the next event, waiting until one comes, ctx ends or the
// connection ends.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return ev, nil
		}
		ended := s.ended
		s.mu.Unlock()
		if ended {
			return Event{}, fmt.Errorf("wait for QMP event on %s: %w", s.m.path, ErrClosed)
		}
		select {
		case <-s.notify:
		case <-ctx.Done():
			return Event{}, fmt.Errorf("wait for QMP event on %s: %w", s.m.path, context.Cause(ctx))
		}
	}
}

// Wait returns the first event for which match returns true (match may be nil),
// dropping the others.
func (s *Subscription) Wait(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		ev, err := s.Next(ctx)
		if err != nil {
			return ev, err
		}
		if match == nil || match(ev) {
			return ev, nil
		}
	}
}

// Close stops the subscription.
func (s *Subscription) Close() {
	s.m.mu.Lock()
	delete(s.m.subs, s)
	s.m.mu.Unlock()
}

// Quit asks QEMU to exit (persistent bitmaps are saved on the way out) and waits
// until it closes the connection, bounded by ctx.
func (m *Monitor) Quit(ctx context.Context) error {
	err := m.Execute(ctx, "quit", nil, nil)
	if err != nil && !errors.Is(err, ErrClosed) {
		return err
	}
	select {
	case <-m.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("QEMU on %s accepted quit but did not exit: %w", m.path, context.Cause(ctx))
	}
}

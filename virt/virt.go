// Package virt reaches QEMU through libvirtd, the way a libvirt user's own
// tools do: the domain's XML for its disks, libvirt checkpoints for change
// tracking, pull-mode backups for the instant and its NBD export, and
// libvirt's guest-agent calls for freezing. Nothing here edits the domain's
// definition or uses libvirt's QEMU pass-through (which taints a domain).
package virt

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sync"

	libvirt "github.com/digitalocean/go-libvirt"
)

// DefaultURI is the system libvirtd's.
const DefaultURI = "qemu:///system"

// ErrClosed is returned by calls on a connection that is gone.
var ErrClosed = errors.New("libvirt connection closed")

// Conn is a connection to libvirtd. go-libvirt's calls take no context, so
// each call here runs beside its context: a call that outlives it closes the
// connection, and a hung libvirtd never hangs lifeboat.
type Conn struct {
	uri string
	l   *libvirt.Libvirt

	mu     sync.Mutex
	closed bool
}

// Dial connects to the libvirtd of uri ("" = qemu:///system), bounded by ctx.
func Dial(ctx context.Context, uri string) (*Conn, error) {
	if uri == "" {
		uri = DefaultURI
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w (write it like qemu:///system)", uri, err)
	}
	type result struct {
		l   *libvirt.Libvirt
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := libvirt.ConnectToURI(u)
		done <- result{l, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return nil, fmt.Errorf("connect to libvirt at %s: %w (is libvirtd running? `virsh -c %s list` should answer)", uri, r.err, uri)
		}
		return &Conn{uri: uri, l: r.l}, nil
	case <-ctx.Done():
		go func() {
			if r := <-done; r.l != nil {
				r.l.Disconnect()
			}
		}()
		return nil, fmt.Errorf("connect to libvirt at %s: %w (libvirtd did not answer)", uri, context.Cause(ctx))
	}
}

// URI is the libvirt URI the connection was made to.
func (c *Conn) URI() string { return c.uri }

// Close ends the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	return c.l.Disconnect()
}

// call runs f, bounded by ctx. When ctx ends first the connection is closed,
// which ends f's call too.
func (c *Conn) call(ctx context.Context, what string, f func(l *libvirt.Libvirt) error) error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return fmt.Errorf("libvirt %s: %w", what, ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("libvirt %s: %w", what, context.Cause(ctx))
	}
	done := make(chan error, 1)
	go func() { done <- f(c.l) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		c.Close()
		return fmt.Errorf("libvirt %s on %s: no answer: %w (the connection was closed)", what, c.uri, context.Cause(ctx))
	}
}

// code is libvirt's error number of err, or 0.
func code(err error) libvirt.ErrorNumber {
	var le libvirt.Error
	if errors.As(err, &le) {
		return libvirt.ErrorNumber(le.Code)
	}
	return 0
}

// NoAnswer reports whether err is a call's failure without libvirt's answer
// (its context ended, which closes the connection, or the connection broke)
// rather than libvirt's refusal: what the call asked may have happened.
func NoAnswer(err error) bool { return err != nil && code(err) == 0 }

// IsBusy reports whether err says another job holds the domain (a backup of
// another tool, a migration, a block job): worth waiting for and retrying.
func IsBusy(err error) bool {
	switch code(err) {
	case libvirt.ErrOperationTimeout: // "cannot acquire state change lock"
		return true
	case libvirt.ErrOperationInvalid, libvirt.ErrOperationUnsupported:
		return containsAny(err.Error(), "another job", "job is already", "already running", "already active", "backup job")
	}
	return false
}

// IsNotRunning reports whether err says the domain is not running. libvirt
// says so of a paused domain too (a guest-agent call): see Domain.Paused.
func IsNotRunning(err error) bool {
	return code(err) == libvirt.ErrOperationInvalid && containsAny(err.Error(), "not running", "is not active")
}

// AgentRefused reports whether err is the guest agent's own answer "no" to
// a command libvirt passed it (libvirt 9.0 reports it as an internal error;
// later versions as VIR_ERR_AGENT_COMMAND_FAILED), not a call that got no
// answer. qemu-ga thaws what a freeze it refuses froze before it answers.
func AgentRefused(err error) bool {
	switch code(err) {
	case libvirt.ErrAgentCommandFailed:
		return true
	case libvirt.ErrInternalError:
		return containsAny(err.Error(), "unable to execute QEMU agent command")
	}
	return false
}

// IsNoDomain reports whether err says libvirt has no domain of that name
// (undefined, or a transient domain that stopped).
func IsNoDomain(err error) bool { return code(err) == libvirt.ErrNoDomain }

// IsBrokenCheckpoint reports whether err says a checkpoint's bitmaps are
// missing or inconsistent.
func IsBrokenCheckpoint(err error) bool {
	return code(err) == libvirt.ErrCheckpointInconsistent || containsAny(err.Error(), "missing or broken bitmap", "not found in backing chain")
}

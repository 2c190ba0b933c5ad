// Package nbd is a pure-Go NBD client: it reads, writes and queries the block status
// (allocation, qemu dirty bitmaps) of exports served by qemu-storage-daemon, qemu-nbd or nbdkit.
package nbd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"syscall"
	"time"
)

// Options tune Dial. The zero value is usable.
type Options struct {
	// MetaContexts to negotiate, e.g. "base:allocation" or
	// "qemu:dirty-bitmap:lifeboat-3". Each must be granted or Dial fails naming it.
	MetaContexts []string
	// Connections wanted (default 1); more than one is opened only when the
	// server advertises NBD_FLAG_CAN_MULTI_CONN.
	Connections int
	// MaxInFlight is the number of requests in flight per connection (default 16).
	MaxInFlight int
	// Timeout bounds the handshake and each request when the context has no
	// deadline (default 60s).
	Timeout time.Duration
	// Stall, when set, is how long the server may answer nothing while
	// requests wait for it, whatever their contexts allow: then it is taken
	// for hung, the connection is dropped, and its requests fail with an
	// error wrapping ErrStalled. It bounds the handshake too. A server that
	// answers, however long the requests take in all, is not cut.
	Stall time.Duration
	// TLS, when set, makes Dial upgrade every connection with NBD_OPT_STARTTLS.
	// For tcp addresses an empty ServerName defaults to the host; for unix
	// sockets set it to a name in the server's certificate.
	TLS *tls.Config
}

const (
	defaultMaxInFlight = 16
	defaultTimeout     = 60 * time.Second
)

func (o Options) withDefaults() Options {
	if o.Connections < 1 {
		o.Connections = 1
	}
	if o.MaxInFlight < 1 {
		o.MaxInFlight = defaultMaxInFlight
	}
	if o.Timeout <= 0 {
		o.Timeout = defaultTimeout
	}
	return o
}

// Extent is one run of the export with the same status flags in a meta context.
type Extent struct {
	Offset, Length int64
	Flags          uint32
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// Status flags of the meta contexts lifeboat uses.
const (
	StateHole  = 1 // base:allocation NBD_STATE_HOLE: not allocated
	StateZero  = 2 // base:allocation NBD_STATE_ZERO: reads as zeros
	StateDirty = 1 // qemu:dirty-bitmap:*: the extent is dirty
)

// Well-known meta context names.
const (
	ContextBaseAllocation = "base:allocation"
	ContextDirtyBitmap    = "qemu:dirty-bitmap:" // followed by the bitmap name
)

// ZeroFlags modify WriteZeroes.
type ZeroFlags uint16

const (
	// ZeroNoHole asks the server to allocate the zeroed range rather than punch
	// a hole (NBD_CMD_FLAG_NO_HOLE).
	ZeroNoHole ZeroFlags = 1 << iota
	// ZeroFast asks the server to fail with ENOTSUP rather than zero slowly
	// (NBD_CMD_FLAG_FAST_ZERO). Without server support WriteZeroes fails with
	// ENOTSUP at once instead of falling back to writing zero buffers.
	ZeroFast
)

// ErrClosed is returned by requests on a closed Client, and by those in flight
// when Close was called.
var ErrClosed = errors.New("nbd: connection closed")

// ErrStalled is in the error of requests and of a handshake that the server
// left unanswered for Options.Stall.
var ErrStalled = errors.New("nbd: the server answered nothing within the stall bound (hung or stopped?)")

// ErrProtocol marks a server reply that breaks the NBD protocol. The connection
// it came on is dropped; dial again (and report the server bug).
var ErrProtocol = errors.New("nbd: protocol violation by server")

// Error is an error reply from the server to one request.
// errors.Is(err, syscall.EIO) and friends work on it.
type Error struct {
	Op             string // read, write, flush, trim, write-zeroes, block-status
	Offset, Length int64
	Errno          syscall.Errno
	Message        string // the server's own words, if it sent any
}

func (e *Error) Error() string {
	s := fmt.Sprintf("nbd: server failed %s at offset %d length %d: %v", e.Op, e.Offset, e.Length, errnoName(e.Errno))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap exposes the errno so errors.Is(err, syscall.ENOSPC) works.
func (e *Error) Unwrap() error { return e.Errno }

// Is makes a server's ESHUTDOWN match ErrClosed: a server answers requests
// still in flight with it when the connection is being closed (by our Close
// or by its own shutdown), and to the caller both mean the same thing.
func (e *Error) Is(target error) bool { return target == ErrClosed && e.Errno == syscall.ESHUTDOWN }

// NBD error values, as the protocol defines them (they are not the platform's).
var nbdErrnos = map[uint32]syscall.Errno{
	1:   syscall.EPERM,
	5:   syscall.EIO,
	12:  syscall.ENOMEM,
	22:  syscall.EINVAL,
	28:  syscall.ENOSPC,
	75:  syscall.EOVERFLOW,
	95:  syscall.ENOTSUP,
	108: syscall.ESHUTDOWN,
}

// errnoOf maps an NBD error value; unknown values count as EINVAL, as the
// protocol asks of clients.
func errnoOf(v uint32) syscall.Errno {
	if e, ok := nbdErrnos[v]; ok {
		return e
	}
	return syscall.EINVAL
}

func errnoName(e syscall.Errno) string {
	names := map[syscall.Errno]string{
		syscall.EPERM: "EPERM", syscall.EIO: "EIO", syscall.ENOMEM: "ENOMEM",
		syscall.EINVAL: "EINVAL", syscall.ENOSPC: "ENOSPC", syscall.EOVERFLOW: "EOVERFLOW",
		syscall.ENOTSUP: "ENOTSUP", syscall.ESHUTDOWN: "ESHUTDOWN",
	}
	if n, ok := names[e]; ok {
		return fmt.Sprintf("%s (%v)", n, e)
	}
	return e.Error()
}

// Protocol constants, named as in the NBD proto.md.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	optsMagic        = 0x49484156454f5054 // "IHAVEOPT"
	oldstyleMagic    = 0x0000420281861253
	optReplyMagic    = 0x0003e889045565a9
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698
	structReplyMagic = 0x668e33ef

	flagFixedNewstyle = 1 << 0 // handshake flags
	flagNoZeroes      = 1 << 1

	optExportName     = 1
	optAbort          = 2
	optStartTLS       = 5
	optGo             = 7
	optStructured     = 8
	optSetMetaContext = 10

	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31

	infoExport    = 0
	infoBlockSize = 3

	// Transmission flags.
	tfHasFlags     = 1 << 0
	tfReadOnly     = 1 << 1
	tfFlush        = 1 << 2
	tfFUA          = 1 << 3
	tfTrim         = 1 << 5
	tfWriteZeroes  = 1 << 6
	tfCanMultiConn = 1 << 8
	tfFastZero     = 1 << 11

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagFastZero = 1 << 4

	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkErrBit      = 1 << 15
	chunkError       = chunkErrBit + 1
	chunkErrorOffset = chunkErrBit + 2
)

// Limits on what a server may make us read or allocate.
const (
	maxString          = 4096     // protocol limit for names and messages
	maxOptReply        = 16 << 10 // any option reply payload we accept
	maxOptReplies      = 1024     // replies to one option
	defaultMaxBlock    = 32 << 20 // protocol default maximum block size
	maxRequest         = 32 << 20 // we never read or write more in one request
	maxStatusRequest   = 1 << 31  // length of one block-status request
	maxStatusDescs     = 1 << 20  // descriptors in one block-status chunk
	maxErrorChunk      = 6 + maxString + 64
	abandonStallBound  = 5 * time.Second
	closeWriteBound    = time.Second
	extraConnBound     = 5 * time.Second
	requestHeaderBytes = 28
)

func cmdName(cmd uint16) string {
	switch cmd {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	}
	return fmt.Sprintf("command %d", cmd)
}

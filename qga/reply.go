package qga

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Error is an error the agent answered a command with.
type Error struct {
	Command string // the command that failed, e.g. "guest-fsfreeze-freeze"
	Class   string // QAPI error class, e.g. "GenericError", "CommandNotFound"
	Desc    string // the agent's own words
}

func (e *Error) Error() string {
	return fmt.Sprintf("qga: guest agent refused %s: %s: %s", e.Command, e.Class, e.Desc)
}

// sentinel is the byte that precedes the reply to guest-sync-delimited. Sent
// to the agent, it resets its JSON parser, dropping half a command an earlier
// client left behind.
const sentinel = 0xFF

// maxReply bounds one reply line. guest-exec-status is the largest: the agent
// caps captured output at 16 MiB per stream, and base64 grows that by a third.
const maxReply = 48 << 20

// maxDiscard bounds what a resync throws away while it looks for its reply.
const maxDiscard = 64 << 20

// errMalformed marks a reply that is not what the protocol allows: after one,
// the connection must be resynced before it is trusted again.
var errMalformed = errors.New("malformed reply")

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// parseReply decodes one reply line. A line may carry stray bytes before a
// sentinel (the tail of a reply an earlier client abandoned): only what
// follows the last sentinel counts.
func parseReply(line []byte, command string) (json.RawMessage, error) {
	if i := bytes.LastIndexByte(line, sentinel); i >= 0 {
		line = line[i+1:]
	}
	var r reply
	if err := json.Unmarshal(line, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", errMalformed, err)
	}
	if r.Error != nil {
		return nil, &Error{Command: command, Class: r.Error.Class, Desc: r.Error.Desc}
	}
	if r.Return == nil {
		return nil, fmt.Errorf("%w: neither \"return\" nor \"error\" in %.80q", errMalformed, line)
	}
	return r.Return, nil
}

// readLine reads up to and without the next newline, refusing lines longer
// than limit.
func readLine(r *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > limit {
			return nil, fmt.Errorf("%w: reply longer than %d bytes", errMalformed, limit)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			return nil, err
		}
	}
}

// readReply reads the next reply to command, skipping blank lines.
func readReply(r *bufio.Reader, command string) (json.RawMessage, error) {
	for {
		line, err := readLine(r, maxReply)
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		return parseReply(line, command)
	}
}

// readSync discards everything up to the reply to guest-sync-delimited with
// this id: replies an earlier client never read, the agent's complaint about
// the sentinel we sent, garbage. It gives up after maxDiscard bytes.
func readSync(r *bufio.Reader, id uint64) error {
	want := fmt.Sprint(id)
	discarded := 0
	for {
		// Skip to the next sentinel.
		for {
			chunk, err := r.ReadSlice(sentinel)
			discarded += len(chunk)
			if discarded > maxDiscard {
				return fmt.Errorf("%w: no reply to guest-sync-delimited in %d bytes", errMalformed, maxDiscard)
			}
			if err == nil {
				break
			}
			if !errors.Is(err, bufio.ErrBufferFull) {
				return err
			}
		}
		line, err := readLine(r, maxReply)
		if err != nil {
			if errors.Is(err, errMalformed) {
				discarded += maxReply
				continue // an overlong line is just more garbage here
			}
			return err
		}
		discarded += len(line)
		ret, err := parseReply(line, "guest-sync-delimited")
		if err != nil {
			continue
		}
		if string(bytes.TrimSpace(ret)) == want {
			return nil
		}
	}
}

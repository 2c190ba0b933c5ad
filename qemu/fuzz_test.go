package qemu

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"testing"
)

// FuzzQMP feeds arbitrary bytes, as a QMP peer would send them, to what
// decodes them: the handshake, then each message sorted into an event or a
// reply (sortMessage, as the monitor's reader does), and the payloads the
// package decodes further (nodes, exports, jobs, event data). Property: no
// panic, and a message is an event or a reply, never both. The seeds are a
// session captured from qemu-storage-daemon 7.2 (testdata/qmp-session.jsonl:
// greeting, capabilities, bitmap, nodes, export, an error, an event) and
// every line of it; they run in every `go test`.
func FuzzQMP(f *testing.F) {
	session, err := os.ReadFile("testdata/qmp-session.jsonl")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(session)
	lines := bytes.SplitAfter(session, []byte("\n"))
	for _, l := range lines {
		f.Add(l)
		f.Add(append(append([]byte(nil), lines[0]...), l...)) // greeting, then the line
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		dec := json.NewDecoder(bytes.NewReader(in))
		if handshake(discardConn{}, dec) != nil {
			// The monitor gives up on a peer that fails the handshake;
			// decode what follows anyway, as if it had greeted.
			dec = json.NewDecoder(bytes.NewReader(in))
		}
		for range 64 {
			var msg message
			if dec.Decode(&msg) != nil {
				return
			}
			ev, _, r, ok := sortMessage(&msg)
			if ev != nil {
				if ok {
					t.Fatalf("message %+v is both an event and a reply", msg)
				}
				_ = idOf(*ev)
				_ = decodeJobEvent(*ev)
				continue
			}
			if !ok || r.err != nil || r.ret == nil {
				continue
			}
			var infos []blockDeviceInfo
			if json.Unmarshal(r.ret, &infos) == nil {
				nodes := make([]BlockNode, 0, len(infos))
				for _, i := range infos {
					n := i.node()
					n.Bitmap("lb-1")
					n.PersistentBitmaps()
					nodes = append(nodes, n)
				}
				findNode(nodes, "vda")
			}
			var ex []ExportInfo
			_ = json.Unmarshal(r.ret, &ex)
			var jobs []BlockJob
			_ = json.Unmarshal(r.ret, &jobs)
		}
	})
}

// discardConn is the handshake's side of the socket: what it writes goes nowhere.
type discardConn struct{ net.Conn }

func (discardConn) Write(b []byte) (int, error) { return len(b), nil }

// TestQMPSessionSeed checks that the captured session passes the handshake and
// sorts into the replies and the event it holds: the fuzzer starts from a
// session the monitor takes whole.
func TestQMPSessionSeed(t *testing.T) {
	session, err := os.ReadFile("testdata/qmp-session.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(session))
	if err := handshake(discardConn{}, dec); err != nil {
		t.Fatalf("handshake on the captured session: %v", err)
	}
	var replies, events, errs int
	for {
		var msg message
		if dec.Decode(&msg) != nil {
			break
		}
		ev, _, r, ok := sortMessage(&msg)
		switch {
		case ev != nil:
			events++
		case ok && r.err != nil:
			errs++
		case ok:
			replies++
		}
	}
	if replies != 7 || errs != 1 || events != 2 {
		t.Fatalf("captured session sorted into %d replies, %d errors, %d events; want 7, 1, 2", replies, errs, events)
	}
}

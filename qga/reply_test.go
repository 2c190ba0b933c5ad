package qga

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
)

func TestReadReply(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    string // the raw return value
		agent   *Error
		wantErr error
	}{
		{name: "object", in: `{"return": {}}` + "\n", want: `{}`},
		{name: "number after blank lines", in: "\n \n" + `{"return": 3}` + "\n", want: `3`},
		{name: "null", in: `{"return": null}` + "\n", want: `null`},
		{name: "tail of an abandoned reply before a sentinel", in: "garb\xff" + `{"return": "frozen"}` + "\n", want: `"frozen"`},
		{name: "agent error", in: `{"error": {"class": "GenericError", "desc": "nope"}}` + "\n",
			agent: &Error{Command: "guest-ping", Class: "GenericError", Desc: "nope"}},
		{name: "neither return nor error", in: `{"QMP": 1}` + "\n", wantErr: errMalformed},
		{name: "not JSON", in: "\x00\x01 hello\n", wantErr: errMalformed},
		{name: "cut short", in: `{"return": `, wantErr: io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readReply(bufio.NewReaderSize(strings.NewReader(tt.in), 16), "guest-ping")
			var agentErr *Error
			switch {
			case tt.agent != nil:
				if !errors.As(err, &agentErr) || *agentErr != *tt.agent {
					t.Fatalf("error %v, want agent error %+v", err, tt.agent)
				}
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error %v, want %v", err, tt.wantErr)
				}
			case err != nil:
				t.Fatalf("unexpected error %v", err)
			case string(got) != tt.want:
				t.Fatalf("return %s, want %s", got, tt.want)
			}
		})
	}
}

func TestReadReplyTooLong(t *testing.T) {
	r := bufio.NewReaderSize(io.MultiReader(strings.NewReader(`{"return": "`), neverEnding('a')), 4096)
	if _, err := readLine(r, 1<<20); !errors.Is(err, errMalformed) {
		t.Fatalf("an endless line gave %v, want errMalformed", err)
	}
}

type neverEnding byte

func (b neverEnding) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}

func TestReadSync(t *testing.T) {
	tests := []struct {
		name string
		in   string
		err  error // nil: found id 42 and the next reply is `{"return": "next"}`
	}{
		{name: "clean", in: "\xff" + `{"return": 42}` + "\n"},
		{name: "stale replies and the sentinel complaint first",
			in: `{"return": {}}` + "\n" + `{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}` + "\n\xff" + `{"return": 42}` + "\n"},
		{name: "an earlier client's sync reply", in: "\xff" + `{"return": 41}` + "\n\xff" + `{"return": 42}` + "\n"},
		{name: "garbage with sentinels", in: "\xff\xff\x00{{{\n\xffnot json\n\xff" + `{"return": "42"}` + "\n\xff" + `{"return": 42}` + "\n"},
		{name: "half a reply then ours", in: `{"return": {"pid": ` + "\xff" + `{"return": 42}` + "\n"},
		{name: "never answered", in: `{"return": {}}` + "\n", err: io.EOF},
		{name: "wrong id only", in: "\xff" + `{"return": 420}` + "\n", err: io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bufio.NewReaderSize(strings.NewReader(tt.in+`{"return": "next"}`+"\n"), 16)
			err := readSync(r, 42)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("error %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			next, err := readReply(r, "guest-ping")
			if err != nil || string(next) != `"next"` {
				t.Fatalf("after sync read %s, %v; want the next reply", next, err)
			}
		})
	}
}

// The parsers read bytes a guest controls: no input may panic them or make
// them read forever.
func FuzzReadReply(f *testing.F) {
	for _, s := range []string{
		`{"return": {}}` + "\n",
		`{"error": {"class": "GenericError", "desc": "x"}}` + "\n",
		"\xff" + `{"return": 42}` + "\n",
		`{"return": {"exited": true, "exitcode": 0, "out-data": "aGk="}}` + "\n",
		"\xff\n\xff{\n",
		`{"return": ` + strings.Repeat("[", 10000) + "\n",
	} {
		f.Add([]byte(s))
	}
	// What qemu-ga 7.2 answered a sync, a ping, a freeze status, an OS query
	// and an unknown command (captured from its unix socket), whole and by line.
	session, err := os.ReadFile("testdata/qga-session.jsonl")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(session)
	for _, l := range bytes.SplitAfter(session, []byte("\n")) {
		f.Add(l)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bufio.NewReaderSize(bytes.NewReader(in), 16)
		for range len(in) + 1 {
			ret, err := readReply(r, "guest-ping")
			if errors.Is(err, io.EOF) {
				break
			}
			if err == nil && !json.Valid(ret) {
				t.Fatalf("return value %q is not JSON", ret)
			}
		}
		_ = readSync(bufio.NewReaderSize(bytes.NewReader(in), 16), 42)
	})
}

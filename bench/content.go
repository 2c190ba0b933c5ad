package main

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/workload"
)

// A content kind is what the stand-in guest writes in the bytes-on-the-wire
// benchmark: how compressible a real guest's changes are decides what zstd saves.
type contentKind string

const (
	contentRandom contentKind = "random"   // incompressible: encrypted or compressed files
	contentOS     contentKind = "os-files" // files of this machine's /usr/lib and /usr/share, as a guest OS's disk holds them
	contentText   contentKind = "text-log" // generated log lines: text-like and very compressible
)

var contentKinds = []contentKind{contentRandom, contentOS, contentText}

// newContent returns an endless stream of a kind of content.
func newContent(kind contentKind, seed uint64) (io.Reader, error) {
	rng := rand.New(rand.NewPCG(seed, seed^0x51ed27))
	switch kind {
	case contentRandom:
		return randomReader{rng}, nil
	case contentOS:
		return newOSFiles([]string{"/usr/lib", "/usr/share"}, &textLog{rng: rng}), nil
	case contentText:
		return &textLog{rng: rng}, nil
	}
	return nil, fmt.Errorf("unknown content %q", kind)
}

type randomReader struct{ rng *rand.Rand }

func (r randomReader) Read(b []byte) (int, error) {
	workload.Random(r.rng, b)
	return len(b), nil
}

// osFiles concatenates the regular files under some directories, each padded
// to 4 KiB as a file system lays them out, and goes on with more when they run out.
type osFiles struct {
	files []string
	next  int
	cur   io.Reader
	more  io.Reader
}

func newOSFiles(roots []string, more io.Reader) *osFiles {
	o := &osFiles{more: more}
	for _, root := range roots {
		// WalkDir visits in lexical order: the same machine gives the same stream.
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				o.files = append(o.files, path)
			}
			return nil // an unreadable directory is skipped, not fatal
		})
	}
	return o
}

func (o *osFiles) Read(b []byte) (int, error) {
	for {
		if o.cur != nil {
			n, err := o.cur.Read(b)
			if n > 0 || err != io.EOF {
				return n, nil
			}
			o.cur = nil
		}
		if o.next >= len(o.files) {
			return o.more.Read(b)
		}
		path := o.files[o.next]
		o.next++
		data, err := os.ReadFile(path)
		if err != nil || len(data) == 0 {
			continue // unreadable or empty files are not in the stream
		}
		pad := (4096 - len(data)%4096) % 4096
		o.cur = io.MultiReader(bytes.NewReader(data), bytes.NewReader(make([]byte, pad)))
	}
}

// textLog generates log lines: timestamps, levels, a small vocabulary, numbers.
type textLog struct {
	rng  *rand.Rand
	t    time.Time
	line []byte
}

var (
	logLevels = []string{"INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"}
	logWords  = []string{"request", "served", "user", "session", "cache", "miss", "hit", "db", "query",
		"took", "ms", "connection", "opened", "closed", "GET", "POST", "/api/v1/orders", "/login",
		"status", "200", "404", "500", "retry", "backend", "timeout", "worker", "job", "done"}
)

func (l *textLog) Read(b []byte) (int, error) {
	if l.t.IsZero() {
		l.t = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	n := 0
	for n < len(b) {
		if len(l.line) == 0 {
			l.t = l.t.Add(time.Duration(l.rng.IntN(50)) * time.Millisecond)
			line := l.t.AppendFormat(nil, time.RFC3339Nano)
			line = append(line, ' ')
			line = append(line, logLevels[l.rng.IntN(len(logLevels))]...)
			for range 4 + l.rng.IntN(8) {
				line = append(line, ' ')
				if l.rng.IntN(4) == 0 {
					line = strconv.AppendInt(line, int64(l.rng.IntN(100000)), 10)
				} else {
					line = append(line, logWords[l.rng.IntN(len(logWords))]...)
				}
			}
			l.line = append(line, '\n')
		}
		c := copy(b[n:], l.line)
		l.line = l.line[c:]
		n += c
	}
	return n, nil
}

package testenv

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// PIDs is a file a test's scripts append process ids to (`echo $! >> FILE`),
// so that the test can see which still run and kill them, whatever the code
// under test left behind.
type PIDs struct{ Path string }

// NewPIDs makes the file in t.TempDir(); every process it lists is killed
// when the test ends.
func NewPIDs(t testing.TB) *PIDs {
	p := &PIDs{Path: filepath.Join(t.TempDir(), "pids")}
	t.Cleanup(p.KillAll)
	return p
}

// Alive is the listed processes that still run.
func (p *PIDs) Alive() (live []int) {
	b, _ := os.ReadFile(p.Path)
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && syscall.Kill(pid, 0) == nil {
			live = append(live, pid)
		}
	}
	return live
}

// KillAll kills every listed process that still runs and empties the list.
func (p *PIDs) KillAll() {
	for _, pid := range p.Alive() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	os.Remove(p.Path)
}

package testenv

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Lifeboat is this test binary run again as a lifeboat in the middle of
// something (its TestMain picks the role from args[0]), to be killed with -9.
type Lifeboat struct {
	cmd *exec.Cmd
	// Log is the file its stderr (and its children's) goes to.
	Log string
}

// StartLifeboat runs this test binary with args and returns once it says
// word on stdout (within 2 minutes, or the test fails with its log). It is
// killed when the test ends, if not before.
func StartLifeboat(t testing.TB, word string, args ...string) *Lifeboat {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(t.TempDir(), "lifeboat.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// The log is a file, not a pipe: a child inherits it, and Wait would
	// wait for it to close.
	l := &Lifeboat{cmd: exec.Command(exe, args...), Log: logf.Name()}
	l.cmd.Stderr = logf
	out, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Kill)
	said := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		said <- line
	}()
	select {
	case line := <-said:
		if line != word+"\n" {
			l.cmd.Wait()
			b, _ := os.ReadFile(l.Log)
			t.Fatalf("the lifeboat (%s) said %q; its log:\n%s", args[0], line, b)
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("the lifeboat (%s) did not say %s within 2 minutes", args[0], word)
	}
	return l
}

// Kill kills it with SIGKILL, as the OOM killer does: no deferred cleanup
// runs. It returns once the process is gone.
func (l *Lifeboat) Kill() {
	if l.cmd.ProcessState == nil {
		l.cmd.Process.Kill()
		l.cmd.Wait()
	}
}

package daemon

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// lockStateDir makes this process the only site serving its state_dir: two
// sites on one state_dir would each take the other's fleece, freeze
// markers and checkpoint records for a dead lifeboat's and clear them mid-cycle.
// The lock is the file's flock, which the kernel drops with the process;
// the file says whose it is, so that a second site names the first.
func (d *Daemon) lockStateDir() (unlock func(), err error) {
	path := filepath.Join(d.cfg.StateDir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state_dir %s: %w", d.cfg.StateDir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("config %s: state_dir %s is in use by another lifeboat (%s): two sites on one state_dir would undo each other's work; stop it first, or give this site a state_dir of its own",
				d.cfg.Path(), d.cfg.StateDir, cmp.Or(strings.TrimSpace(string(holder)), "which did not say who it is"))
		}
		if errors.Is(err, syscall.ENOLCK) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("state_dir %s: its file system does not lock files (%w), which lifeboat needs to keep two sites off one state_dir and for its catalog: put state_dir on a local file system", d.cfg.StateDir, err)
		}
		return nil, fmt.Errorf("state_dir %s: locking %s: %w", d.cfg.StateDir, path, err)
	}
	f.Truncate(0)
	fmt.Fprintf(f, "site %q, pid %d, config %s\n", d.cfg.Site, os.Getpid(), d.cfg.Path())
	f.Sync()
	return func() { f.Close() }, nil
}

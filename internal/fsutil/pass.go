package fsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// LetOthersPass gives every directory from dir up to own (inclusive) search
// permission for others (o+x: a process of another user may open a file
// it knows the name of, not list the directory), for a process running as
// another user (QEMU under libvirt) to reach files under dir. Directories
// above own are not changed: one that others may not pass is an error that
// says what to do.
func LetOthersPass(dir, own string) error {
	dir, own = filepath.Clean(dir), filepath.Clean(own)
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			if d != own && !strings.HasPrefix(d+"/", own+"/") {
				return fmt.Errorf("directory %s (mode %v) does not let other users pass, and QEMU, running as libvirt's user, must reach %s: chmod o+x %s, or put state_dir elsewhere", d, fi.Mode().Perm(), dir, d)
			}
			if err := os.Chmod(d, fi.Mode().Perm()|0o001); err != nil {
				return fmt.Errorf("letting QEMU's user pass %s: %w", d, err)
			}
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// PrivateFiles takes group and other permissions off every regular file in
// dir (not below it): before another user may pass dir, what it holds must
// not be readable by the user who can.
func PrivateFiles(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // gone meanwhile
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			if err := os.Chmod(filepath.Join(dir, e.Name()), perm&^0o077); err != nil {
				return fmt.Errorf("making %s private: %w", filepath.Join(dir, e.Name()), err)
			}
		}
	}
	return nil
}

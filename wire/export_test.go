package wire

import "time"

// SetCopySourceWait shortens the bound on a Copy's wait for tests.
func SetCopySourceWait(d time.Duration) (restore func()) {
	old := copySourceWait
	copySourceWait = d
	return func() { copySourceWait = old }
}

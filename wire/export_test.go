package wire

import "time"

// SetCopySourceWait shortens the bound on a Copy's wait for tests.
func SetCopySourceWait(d time.Duration) (restore func()) {
	old := copySourceWait
	copySourceWait = d
	return func() { copySourceWait = old }
}

// InflightBytes is the bound on a point's frames read and not yet written.
const InflightBytes = inflightBytes

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

// SpeakV3 makes a server or client speak point stream version 3 only, as a
// lifeboat before patches did.
func (s *Server) SpeakV3() { s.v3 = true }
func (c *Client) SpeakV3() { c.v3 = true }

// SetStreamStall shortens the bound on a point stream's stalled write for tests.
func SetStreamStall(d time.Duration) (restore func()) {
	old := streamStall
	streamStall = d
	return func() { streamStall = old }
}

// SetStreamIdle shortens the bound on the wait for a point stream's next frame.
func SetStreamIdle(d time.Duration) (restore func()) {
	old := streamIdle
	streamIdle = d
	return func() { streamIdle = old }
}

// SetBootClock makes the boot clock (boot ID, time since boot) f's for tests.
func SetBootClock(f func() (string, time.Duration, error)) (restore func()) {
	old := bootClock
	bootClock = f
	return func() { bootClock = old }
}

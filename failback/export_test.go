package failback

// SetReverseMovedHook sets what Reverse calls once the images have moved
// (nil: nothing), standing in for the site dying there.
func SetReverseMovedHook(f func() error) { testHookReverseMoved = f }

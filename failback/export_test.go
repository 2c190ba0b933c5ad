package failback

// SetReverseMovedHook sets what Reverse calls once the images have moved
// (nil: nothing), standing in for the site dying there.
func SetReverseMovedHook(f func() error) { testHookReverseMoved = f }

// ProductionOf is the disks s holds open for vm's failback, nil if none.
func ProductionOf(s *Store, vm string) *Production {
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.vms[vm]; ok {
		return v.prod
	}
	return nil
}

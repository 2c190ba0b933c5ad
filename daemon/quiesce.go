package daemon

import (
	"fmt"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/protect"
)

// quiescer returns what makes a VM's points as consistent as its policy asks.
func (d *Daemon) quiescer(c VMConfig) (protect.Quiescer, error) {
	if lifeboat.Consistency(c.Consistency) == lifeboat.Crash {
		return nil, nil
	}
	return nil, fmt.Errorf("consistency %q is not available in this build yet; use `consistency: crash`", c.Consistency)
}

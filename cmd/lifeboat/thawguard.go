package main

import (
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/protect"
)

// newThawGuardCmd is started by a site before each guest freeze (see
// protect/guard.go); people do not run it.
func newThawGuardCmd() *cobra.Command {
	var socket, marker string
	var bound time.Duration
	cmd := &cobra.Command{
		Use:    "thaw-guard --socket AGENT --marker FILE",
		Short:  "Thaw a guest if the lifeboat that froze it dies (started by lifeboat itself)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if socket == "" {
				return usagef("--socket is required")
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "thaw-guard")
			return protect.RunThawGuard(cmd.Context(), socket, marker, os.Stdin, bound, log)
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "the guest agent's socket")
	cmd.Flags().StringVar(&marker, "marker", "", "the freeze marker to remove once thawed")
	cmd.Flags().DurationVar(&bound, "bound", 10*time.Minute, "how long to keep trying")
	return cmd
}

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
	var socket, uri, domain, marker string
	var bound time.Duration
	cmd := &cobra.Command{
		Use:    "thaw-guard (--socket AGENT | --uri URI --domain NAME) --marker FILE",
		Short:  "Thaw a guest if the lifeboat that froze it dies (started by lifeboat itself)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g := protect.FrozenGuest{Socket: socket}
			switch {
			case domain != "" && socket != "":
				return usagef("--socket and --domain name two guests: give one")
			case domain != "":
				g = protect.FrozenGuest{Libvirt: &protect.LibvirtDomain{URI: uri, Domain: domain}}
			case socket == "":
				return usagef("--socket (a guest agent's socket) or --domain (a libvirt domain) is required")
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "thaw-guard")
			return protect.RunThawGuard(cmd.Context(), g, marker, os.Stdin, bound, log)
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "the guest agent's socket")
	cmd.Flags().StringVar(&uri, "uri", "", "the libvirt URI of --domain (default qemu:///system)")
	cmd.Flags().StringVar(&domain, "domain", "", "the libvirt domain whose guest to thaw")
	cmd.Flags().StringVar(&marker, "marker", "", "the freeze marker to remove once thawed")
	cmd.Flags().DurationVar(&bound, "bound", 10*time.Minute, "how long to keep trying")
	return cmd
}

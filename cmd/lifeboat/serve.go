package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
)

func newServeCmd(g *globals) *cobra.Command {
	var debug bool
	cmd := &cobra.Command{
		Use:     "serve",
		Short:   "Run a site: protect its VMs, and receive points if it is a recovery site",
		Example: `  lifeboat serve -c /etc/lifeboat/site.yaml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := daemon.LoadConfig(g.config)
			if err != nil {
				return err
			}
			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			return daemon.New(cfg, log).Run(cmd.Context())
		},
	}
	cmd.Flags().BoolVar(&debug, "debug", false, "log debug messages")
	return cmd
}

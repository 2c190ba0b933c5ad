package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
)

func newVerifyCmd(g *globals) *cobra.Command {
	var point string
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "verify VM [--point ID]",
		Short:   "Re-read a restore point at the recovery site and check it against its recorded hashes",
		Example: "  lifeboat verify web1\n  lifeboat verify web1 --point 12",
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat verify web1")
			if err != nil {
				return err
			}
			id, err := parsePoint(point)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			tty := isTerminal(os.Stderr)
			rep, err := c.Verify(cmd.Context(), vm, id, func(p daemon.VerifyProgress) {
				if tty && !asJSON && p.Total > 0 {
					fmt.Fprintf(os.Stderr, "\rverify %s: %s / %s", vm, size(p.Done), size(p.Total))
				}
			})
			if tty && !asJSON {
				fmt.Fprint(os.Stderr, "\r\033[K")
			}
			if asJSON {
				if perr := printJSON(rep); perr != nil {
					return perr
				}
			}
			if err != nil {
				return err
			}
			if !asJSON {
				var blocks, bytes int64
				for _, d := range rep.Disks {
					blocks += d.Blocks
					bytes += d.Bytes
				}
				fmt.Printf("vm %s point %d: OK, %d disks, %d blocks (%s) match their hashes, in %s\n",
					vm, rep.Point, len(rep.Disks), blocks, size(bytes), rep.Duration.Round(time.Millisecond))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&point, "point", "latest", "point ID, or latest")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}

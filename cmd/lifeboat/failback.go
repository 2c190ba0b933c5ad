package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/protect"
)

func newFailbackCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "failback VM",
		Short: "Replicate a failed-over VM back into its production site's disks, while it runs here",
		Long: `Run one failback cycle, at the recovery site where the VM runs after a failover.
It sends into the production site's disks exactly the blocks that differ: those
the VM wrote here since the failover, and those production wrote after its last
point (from its own change tracking, or by comparing hashes where that was lost).
The production VM must be stopped, and the production site serving with
` + "`listen:`" + `; this site must have it in ` + "`peers:`" + `. Run it again to send what
changed since; each cycle is incremental. Exits 0 once production has flushed
the point. (Finalizing, which brings the VM up at production, is not built yet.)`,
		Example: `  lifeboat failback web1 -c dr.yaml`,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat failback web1")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			bar := newProgressLine(os.Stderr)
			pt, err := c.Failback(cmd.Context(), vm, func(p protect.Progress) { bar.show(p) })
			bar.done()
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(pt)
			}
			s := pt.Stats
			fmt.Printf("vm %s: production's disks hold failback point %d (%s)\n", pt.VM, pt.ID, pt.Consistency)
			for _, d := range pt.Disks {
				how := fmt.Sprintf("incremental from point %d", d.Base)
				if d.Resync {
					how = "compared whole"
				}
				fmt.Printf("  disk %s: %s\n", d.Name, how)
			}
			fmt.Printf("  changed %s, zero %s, data %s, sent %s, in %s\n",
				size(s.BytesChanged), size(s.BytesZero), size(s.BytesData), size(s.BytesSent), s.Duration.Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the point as JSON")
	return cmd
}

package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/protect"
)

func newSyncCmd(g *globals) *cobra.Command {
	var asJSON, whole bool
	cmd := &cobra.Command{
		Use:   "sync VM|GROUP",
		Short: "Run one replication cycle of a VM (or a consistency group) now",
		Long: `Run one replication cycle now. The first is the initial sync of all allocated
data; later ones send only the blocks written since the last point. Exits 0 only
when the recovery site has committed the point.

--whole sends every disk whole, whatever the recovery site holds: every allocated
block is read and sent, the rest as zeros. The point then holds the whole disk, so
it repairs a replica that ` + "`lifeboat verify`" + ` found damaged (a failing disk at
the recovery site): it and the points after it no longer read the damaged images.
Until such a point commits, every cycle of the VM sends whole.`,
		Example: `  lifeboat sync web1 -c site.yaml
  lifeboat sync web1 --whole     # after verify found web1's replica damaged`,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat sync web1")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			bar := newProgressLine(os.Stderr)
			pts, err := c.SyncAll(cmd.Context(), vm, whole, func(p protect.Progress) { bar.show(p) })
			bar.done()
			if asJSON && len(pts) > 0 {
				var v any = pts
				if len(pts) == 1 && pts[0].Group == "" {
					v = pts[0]
				}
				if perr := printJSON(v); perr != nil {
					return perr
				}
			}
			if !asJSON {
				for _, pt := range pts {
					s := pt.Stats
					fmt.Printf("vm %s: point %d committed at %s (%s)\n", pt.VM, pt.ID, pt.Instant.Format(time.RFC3339Nano), pt.Consistency)
					if pt.Group != "" {
						fmt.Printf("  group point %s\n", pt.Group)
					}
					if pt.Note != "" {
						fmt.Printf("  note: %s\n", pt.Note)
					}
					fmt.Printf("  changed %s, zero %s, unchanged %s, data %s, sent %s, in %s\n",
						size(s.BytesChanged), size(s.BytesZero), size(s.BytesSame), size(s.BytesData), size(s.BytesSent),
						s.Duration.Round(time.Millisecond))
				}
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the committed point as JSON")
	cmd.Flags().BoolVar(&whole, "whole", false, "send every disk whole, whatever the recovery site holds (repairs a damaged replica)")
	return cmd
}

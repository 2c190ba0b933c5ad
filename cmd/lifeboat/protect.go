package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/protect"
)

func newProtectCmd(g *globals) *cobra.Command {
	var (
		asJSON, reverse bool
		interval        time.Duration
	)
	cmd := &cobra.Command{
		Use:   "protect VM --reverse",
		Short: "Protect a VM failed over here for good back to its old production site, with no full copy",
		Long: `At the recovery site where the VM runs after a committed failover, make its
old production site its recovery site: the production disks, brought up to date
by a failback cycle when they do not hold one of this site's failback points
yet, become the VM's first restore point there (moved into that site's store,
nothing copied over the wire), and from then on this site replicates the VM
there on its own schedule, every --interval, each cycle incremental. The VM
shows in ` + "`lifeboat status`" + ` here; its points there are listed by
` + "`lifeboat points`" + ` at that site, which protects the VM no more (remove it from
its ` + "`vms:`" + `). The production VM must be stopped and its site serving with
` + "`listen:`" + `; its images move out of its reach, so that started again it fails
instead of writing under the points. Run again, it changes only the interval
(from this site's next start).`,
		Example: `  lifeboat failover web1 --commit -c dr.yaml
  lifeboat protect web1 --reverse --interval 1m -c dr.yaml`,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat protect web1 --reverse")
			if err != nil {
				return err
			}
			if err := notNegative("interval", interval, "lifeboat protect web1 --reverse --interval 5m"); err != nil {
				return err
			}
			if !reverse {
				return usageError{fmt.Sprintf("lifeboat protect only protects in reverse so far: a VM of this site is protected by its config's vms:; for a VM failed over here, `lifeboat protect %s --reverse`", vm)}
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			bar := newProgressLine(os.Stderr)
			pt, err := c.Reverse(cmd.Context(), vm, interval, func(p protect.Progress) { bar.show(p) })
			bar.done()
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(pt)
			}
			every := interval
			if every == 0 {
				every = 5 * time.Minute
			}
			fmt.Printf("vm %s is protected in reverse: its old production site keeps its points from its own disks, the first point %d (%s, instant %s);\n",
				vm, pt.ID, pt.Consistency, pt.Instant.UTC().Format(time.RFC3339))
			fmt.Printf("  this site replicates it there every %s, each cycle incremental from the last (`lifeboat status`).\n", every)
			return nil
		},
	}
	cmd.Flags().BoolVar(&reverse, "reverse", false, "protect the VM, failed over here and committed, back to its old production site")
	cmd.Flags().DurationVar(&interval, "interval", 0, "how often a cycle runs (default 5m)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the first point as JSON")
	return cmd
}

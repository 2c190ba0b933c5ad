package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

func newPointsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "points VM",
		Short:   "List a VM's restore points",
		Example: "  lifeboat points web1\n  lifeboat points web1 --json",
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat points web1")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			pts, err := c.Points(cmd.Context(), vm)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(pts)
			}
			if len(pts) == 0 {
				fmt.Printf("vm %s has no restore point yet: run `lifeboat sync %s`\n", vm, vm)
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tINSTANT (UTC)\tCONSISTENCY\tFREEZE\tCHANGED\tSENT\tDISKS\tGROUP\tTESTED\tDAMAGED")
			for _, p := range pts {
				freeze, group := "-", "-"
				if p.Freeze > 0 {
					freeze = p.Freeze.Round(time.Millisecond).String()
				}
				if p.Group != "" {
					group = p.Group
				}
				tested := "-"
				if m := p.Tested; m != nil {
					tested = fmt.Sprintf("%s: running +%v, agent +%v", m.At.UTC().Format(time.RFC3339), m.ToRunning.Round(time.Millisecond), m.ToAgent.Round(time.Millisecond))
				}
				damaged := "-"
				if m := p.Damaged; m != nil && m.Missing != "" {
					damaged = fmt.Sprintf("disk %s: image %s is gone", m.Disk, m.Missing)
				} else if m != nil {
					damaged = fmt.Sprintf("disk %s at offset %d (verify of point %d)", m.Disk, m.Offset, m.Point)
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", p.ID, p.Instant.UTC().Format(time.RFC3339Nano), p.Consistency,
					freeze, size(p.Stats.BytesChanged), size(p.Stats.BytesSent), len(p.Disks), group, tested, damaged)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

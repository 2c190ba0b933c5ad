package main

import (
	"cmp"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
)

func newStatusCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "status",
		Short:   "Show every VM of the site: state, last point, its age (the current RPO), last error",
		Example: "  lifeboat status\n  lifeboat status --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			st, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(st)
			}
			fmt.Printf("site %s, %s\n", st.Site, st.Time.Format(time.RFC3339))
			if c := st.Certificate; c != nil && c.Warning != "" {
				fmt.Printf("site certificate %s: %s\n", c.File, c.Warning)
			}
			if l := st.RevocationList; l != nil && l.Warning != "" {
				num := ""
				if l.Number != "" {
					num = " (number " + l.Number + ")"
				}
				fmt.Printf("revocation list %s%s: %s\n", l.File, num, l.Warning)
			}
			if len(st.VMs) == 0 {
				fmt.Println("no VMs: add some under `vms:` in the config")
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VM\tROLE\tSTATE\tLAST POINT\tRPO\tPOINTS\tLAST ERROR")
			for _, v := range st.VMs {
				last, rpo := "-", "-"
				if v.LastPoint != nil {
					last = fmt.Sprintf("%d @ %s", v.LastPoint.ID, v.LastPoint.Instant.Format("15:04:05"))
					rpo = age(time.Duration(v.RPO * float64(time.Second)))
				}
				if v.Behind {
					rpo += fmt.Sprintf(" (BEHIND target %s)", age(time.Duration(v.RPOTarget*float64(time.Second))))
				}
				state := cmp.Or(v.Detail, v.State)
				if v.Progress != nil && v.Progress.Total > 0 {
					state = fmt.Sprintf("%s %d%%", v.State, v.Progress.Done*100/v.Progress.Total)
				}
				points := "-"
				if v.Role == "replica" {
					points = fmt.Sprint(v.Points)
				}
				errText := v.LastError
				if len(errText) > 120 {
					errText = errText[:117] + "..."
				}
				name := v.VM
				if v.Group != "" {
					name += " (group " + v.Group + ")"
				}
				role := v.Role
				if v.Owner != "" {
					role = fmt.Sprintf("%s of %s (epoch %d)", v.Role, v.Owner, v.Epoch)
				}
				if v.ReverseRun != "" {
					role = "protected in reverse to " + v.Peer
				}
				if v.State == "failed-over" || v.State == "reversed" || v.Failback != nil {
					errText = "(below)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, role, state, last, rpo, points, errText)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, v := range st.VMs {
				if fb := v.Failback; fb != nil {
					own := "production's own writes since the shared point are still to be overwritten"
					if fb.OwnSent {
						own = "production's own writes since the shared point are overwritten"
					}
					fmt.Printf("\n%s: failing back from %s: its disks here hold point %d (taken %s); %s. The VM runs at %s until the failback is finalized.\n",
						v.VM, fb.From, fb.Holds, fb.Instant.UTC().Format(time.RFC3339), own, fb.From)
					continue
				}
				if v.State == "failed-over" || v.State == "reversed" {
					fmt.Printf("\n%s: %s\n", v.VM, v.LastError)
				}
				if fb := v.FailingBack; fb != nil {
					fmt.Printf("\n%s: %s\n", v.VM, failingBack(v.VM, fb))
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

// failingBack is the line status prints for a failback at the recovery site.
func failingBack(vm string, fb *daemon.FailingBack) string {
	what := "failing back"
	if fb.Finalizing {
		what = "finalizing its failback"
	}
	if fb.Running {
		line := fmt.Sprintf("%s to %s since %s", what, fb.To, fb.Started.Format("15:04:05"))
		if p := fb.Progress; p != nil {
			line += ": " + p.Phase
			if p.Total > 0 {
				line += fmt.Sprintf(" %d%% (%s of %s)", p.Done*100/p.Total, size(p.Done), size(p.Total))
			}
			if fb.Rate > 0 {
				line += fmt.Sprintf(" at %s/s, about %s left", size(int64(fb.Rate)), age(time.Duration(fb.ETA*float64(time.Second))))
			}
		}
		return line
	}
	line := fmt.Sprintf("failing back to %s", fb.To)
	if fb.LastPoint > 0 {
		line += fmt.Sprintf(": production's disks took failback point %d at %s; `lifeboat failback %s` sends what changed since, `--finalize` brings it home", fb.LastPoint, fb.LastAt.Format("15:04:05"), vm)
	}
	if fb.LastError != "" {
		line += "; the last attempt failed: " + fb.LastError
	}
	return line
}

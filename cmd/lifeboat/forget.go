package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newForgetCmd(g *globals) *cobra.Command {
	var asJSON, yes bool
	cmd := &cobra.Command{
		Use:   "forget VM --yes",
		Short: "At a recovery site: delete every restore point of a VM, for good",
		Long: `Delete every restore point of a VM at this recovery site, with its images and
records, freeing their space: for a VM taken out of protection. Refused while a
failover or test failover of it runs, while it is failed over here, and for a VM
protected in reverse onto its own disks. Without --yes it only lists what it would
delete.

Run ` + "`lifeboat unprotect VM`" + ` at its protected site first: a site that still protects
it sends it whole again at its next cycle, as a new VM.`,
		Example: "  lifeboat forget web1          # what would go\n  lifeboat forget web1 --yes    # delete it",
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat forget web1 --yes")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			if !yes {
				pts, err := c.Points(cmd.Context(), vm)
				if err != nil {
					return err
				}
				if len(pts) == 0 {
					return fmt.Errorf("vm %s has no restore point at this site: nothing to forget", vm)
				}
				return usagef("this deletes the %d restore points of vm %s (%d to %d, the latest from %s) for good: add --yes", len(pts), vm, pts[0].ID, pts[len(pts)-1].ID, pts[len(pts)-1].Instant.UTC().Format("2006-01-02 15:04:05 MST"))
			}
			f, err := c.Forget(cmd.Context(), vm)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(f)
			}
			fmt.Printf("vm %s forgotten: %d restore points deleted, %s freed\n", vm, len(f.Points), size(f.Bytes))
			if f.Owner != "" {
				fmt.Printf("if site %s still protects it, run `lifeboat unprotect %s` there, or its next cycle sends it whole again\n", f.Owner, vm)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "delete, rather than list what would be deleted")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was deleted as JSON")
	return cmd
}

package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newHandoverCmd(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "handover VM --to SITE",
		Short: "At a recovery site: let another protected site replicate a VM from now on",
		Long: `A recovery site takes points of a VM only from the site that owns it: the first
site that replicated it, or the one named under owners: in its config. handover moves
the ownership to another site under a new epoch; the old owner is refused from then on.`,
		Example: "  lifeboat handover web1 --to prod-east",
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat handover web1 --to prod-east")
			if err != nil {
				return err
			}
			if to == "" {
				return usagef("name the site that is to own %s, e.g. `lifeboat handover %s --to prod-east`", vm, vm)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			o, err := c.Handover(cmd.Context(), vm, to)
			if err != nil {
				return err
			}
			fmt.Printf("vm %s now belongs to site %s (epoch %d)\n", vm, o.Site, o.Epoch)
			return nil
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the protected site that is to own the VM")
	return cmd
}

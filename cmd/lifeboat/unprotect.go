package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newUnprotectCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "unprotect VM",
		Short: "Stop protecting a VM and take lifeboat's change tracking out of it",
		Long: `At the protected site: stop a VM's cycles and remove what lifeboat keeps in the
running VM between cycles for its recovery site: its dirty bitmaps (under libvirt,
its checkpoints, which libvirt does not show, with their bitmaps), and whatever an
interrupted cycle left there. Bitmaps and checkpoints of other tools, and those kept
for another recovery site, are not touched. The VM must be running.

The recovery site keeps the VM's restore points. The VM stays unprotected across
restarts of the site; then remove it from vms: in the config, or run
` + "`lifeboat sync VM`" + ` to protect it again (its first cycle compares hashes with the
recovery site).`,
		Example: "  lifeboat unprotect web1",
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat unprotect web1")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			u, err := c.Unprotect(cmd.Context(), vm)
			if err != nil {
				return err
			}
			if asJSON {
				if err := printJSON(u); err != nil {
					return err
				}
			} else {
				fmt.Printf("vm %s: not protected any more (no cycles); recovery site %s keeps its restore points\n", vm, u.Peer)
				for _, r := range u.Removed {
					fmt.Printf("  removed %s\n", r)
				}
				if len(u.Removed) == 0 && u.Error == "" {
					fmt.Println("  nothing of lifeboat's was left in the VM")
				}
				for _, l := range u.Left {
					fmt.Printf("  left %s\n", l)
				}
				if u.Error == "" {
					fmt.Printf("remove it from vms: in the config, or run `lifeboat sync %s` to protect it again\n", vm)
				}
			}
			if u.Error != "" {
				return fmt.Errorf("%s: run `lifeboat unprotect %s` again", u.Error, vm)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was done as JSON")
	return cmd
}

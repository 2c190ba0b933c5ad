package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/failback"
	"github.com/lifeboat-dr/lifeboat/protect"
)

func newFailbackCmd(g *globals) *cobra.Command {
	var (
		asJSON, finalize      bool
		shutdownTimeout, wait time.Duration
	)
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
the point.

With --finalize, the VM comes home: its guest is powered off here (through its
agent, else the power button; its CPUs are stopped if it has not powered off
within --shutdown-timeout), a last cycle sends its final state to production,
the same state becomes a restore point here, production starts the change
tracking that continues from that point and releases its disks, and the VM
is handed back to production under a new epoch. Production then starts the
VM with its config's start: command (or says in its log to start it) and, as
soon as the VM's QMP answers, runs a cycle, incremental from that point; the
points taken before the failover stay valid. The finalize waits for that
first point, for at most --wait, and says how long the VM was down. A
finalize that fails leaves the VM powered off here and may be run again.`,
		Example: `  lifeboat failback web1 -c dr.yaml
  lifeboat failback web1 --finalize -c dr.yaml`,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat failback web1")
			if err != nil {
				return err
			}
			if err := notNegative("shutdown-timeout", shutdownTimeout, "lifeboat failback web1 --finalize --shutdown-timeout 2m"); err != nil {
				return err
			}
			if err := notNegative("wait", wait, "lifeboat failback web1 --finalize --wait 10m"); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			bar := newProgressLine(os.Stderr)
			if finalize {
				fin, err := c.Finalize(cmd.Context(), vm, failback.FinalizeOptions{ShutdownTimeout: shutdownTimeout, Wait: wait}, func(p protect.Progress) { bar.show(p) })
				bar.done()
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(fin)
				}
				how := "its guest powered off cleanly"
				if !fin.ShutDown {
					how = "its guest did not power off in time: its CPUs were stopped (crash-consistent)"
				}
				fmt.Printf("vm %s is home at site %s (epoch %d): %s.\n", vm, fin.Home, fin.Epoch, how)
				fmt.Printf("  production's disks hold failback point %d; here it is restore point %d (%s)\n", fin.Last.ID, fin.Fold.ID, fin.Fold.Consistency)
				switch r := fin.Resumed; {
				case r != nil:
					how := "incremental from point " + fmt.Sprint(fin.Fold.ID)
					for _, d := range r.Disks {
						if d.Resync {
							how = "disk " + d.Name + " compared whole"
						}
					}
					fmt.Printf("  it runs at %s again: its first point there, %d (%s, sent %s), was taken %s after the guest stopped here\n",
						fin.Home, r.ID, how, size(r.Stats.BytesSent), fin.Down.Round(time.Millisecond))
				case wait > 0:
					fmt.Printf("  down for %s so far, and %s sent no point within %s: start the VM there (its config's start: command failed, or it has none; see its log); its next cycle continues from point %d.\n",
						fin.Took.Round(time.Millisecond), fin.Home, wait, fin.Fold.ID)
				default:
					fmt.Printf("  down for %s so far. %s starts the VM (its config's start:) or waits for it to be started; its next cycle continues from point %d.\n", fin.Took.Round(time.Millisecond), fin.Home, fin.Fold.ID)
				}
				return nil
			}
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
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the point (with --finalize: what it did) as JSON")
	cmd.Flags().BoolVar(&finalize, "finalize", false, "power the VM off here, send its last state, and hand it back to production")
	cmd.Flags().DurationVar(&shutdownTimeout, "shutdown-timeout", 0, "with --finalize: how long the guest may take to power off before its CPUs are stopped (default 2m)")
	cmd.Flags().DurationVar(&wait, "wait", 10*time.Minute, "with --finalize: how long to wait for the VM to run at production and send its first point (0: return once it is handed over)")
	return cmd
}

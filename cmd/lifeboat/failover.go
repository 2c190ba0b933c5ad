package main

import (
	"fmt"
	"os"
	"strconv"

	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/failover"
)

func newFailoverCmd(g *globals) *cobra.Command {
	var (
		point                      string
		test, stop, undo, commit   bool
		list, asJSON, planned      bool
		force, acceptDamage        bool
		agentWait, shutdownTimeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "failover VM [--point ID|latest] [--test] | --commit | --undo | --test --stop | --planned | --list",
		Short: "At a recovery site: run a VM from one of its points (a failover, or a test of one)",
		Long: `failover starts the VM at this recovery site from a point (the latest unless
--point says otherwise): a writable overlay above the point's images, nothing copied,
QEMU started from the VM definition the point carries. The recovery site then owns the
VM under a new epoch, and its production site is refused and told why. The failover
waits for a decision: --commit keeps it; --undo stops the VM, discards what it wrote and
hands it back to its production site, which replicates it again incrementally.

--test starts the same on a throwaway overlay with its network isolated, while
replication goes on; --test --stop ends every test run of the VM.

--planned, run at the protected site, moves the VM with no loss: it is powered off
(through its guest agent when it has one), or its CPUs stopped if it does not power
off in time, a last point is sent, and the recovery site starts the VM from it.`,
		Example: "  lifeboat failover web1\n  lifeboat failover web1 --point 41\n  lifeboat failover web1 --test\n" +
			"  lifeboat failover web1 --test --stop\n  lifeboat failover web1 --commit\n  lifeboat failover web1 --undo\n  lifeboat failover --list\n" +
			"  lifeboat failover web1 --planned    # at the protected site",
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := notNegative("agent-wait", agentWait, "lifeboat failover web1 --agent-wait 2m"); err != nil {
				return err
			}
			if err := notNegative("shutdown-timeout", shutdownTimeout, "lifeboat failover web1 --planned --shutdown-timeout 2m"); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if list {
				vm := ""
				if len(args) == 1 {
					vm = args[0]
				}
				runs, err := c.Runs(ctx, vm)
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(runs)
				}
				return printRuns(runs)
			}
			vm, err := oneVM(args, "lifeboat failover web1")
			if err != nil {
				return err
			}
			if planned {
				if test || stop || undo || commit || point != "" {
					return usagef("--planned takes no other choice: `lifeboat failover %s --planned` at the site that protects it", vm)
				}
				if !asJSON {
					fmt.Fprintf(os.Stderr, "planned migration of vm %s: shutting it down (up to %v), a last cycle, then the recovery site starts it ...\n", vm, shutdownTimeout)
				}
				m, err := c.Migrate(ctx, vm, daemon.MigrateRequest{ShutdownTimeout: shutdownTimeout})
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(m)
				}
				how := "its CPUs were stopped (it did not power off in time)"
				if m.ShutDown {
					how = "the guest powered off cleanly"
				}
				fmt.Printf("vm %s migrated to %s with no loss: %s; its last point is %d\n", vm, m.Peer, how, m.Point)
				fmt.Printf("  running at %s %v after its request (run %s, epoch %d); took %v in all\n", m.Peer, m.ToRunning.Round(time.Millisecond), m.Run, m.Epoch, m.Took.Round(time.Millisecond))
				return nil
			}
			if n := countTrue(stop, undo, commit); n > 1 || (stop && !test) || (test && (undo || commit)) {
				return usagef("choose one: start (`lifeboat failover %s [--test]`), --commit, --undo, or --test --stop", vm)
			}
			if stop || undo || commit {
				runs, err := c.Runs(ctx, vm)
				if err != nil {
					return err
				}
				action := "stop"
				if commit {
					action = "commit"
				}
				var done []*failover.Run
				for _, r := range runs {
					if r.Test != test {
						continue
					}
					out, err := c.RunAction(ctx, r.ID, action)
					if err != nil {
						return err
					}
					done = append(done, out)
				}
				if len(done) == 0 {
					return fmt.Errorf("vm %s has no %s running at this site (`lifeboat failover --list`)", vm, map[bool]string{true: "test failover", false: "failover"}[test])
				}
				if asJSON {
					return printJSON(done)
				}
				for _, r := range done {
					switch {
					case commit:
						fmt.Printf("vm %s: failover from point %d committed; it runs here from now on\n", vm, r.Point)
					case test:
						fmt.Printf("vm %s: test of point %d stopped and discarded\n", vm, r.Point)
					default:
						to := "its previous owner"
						if r.Previous != nil && r.Previous.Site != "" {
							to = "site " + r.Previous.Site
						}
						fmt.Printf("vm %s: failover undone, what it wrote here discarded; handed back to %s, which replicates it again\n", vm, to)
					}
				}
				return nil
			}
			req := daemon.FailoverRequest{Test: test, AgentWait: agentWait, Force: force, AcceptDamage: acceptDamage}
			if t, ok := pointTime(point); ok {
				req.Before = t
			} else if point != "" && point != "latest" {
				id, err := strconv.ParseUint(point, 10, 64)
				if err != nil || id == 0 {
					return usagef("--point %q: give a point's id (`lifeboat points %s`), a time (2026-12-01T09:30:00Z: the latest point at or before it), or latest", point, vm)
				}
				req.Point = id
			}
			if !asJSON {
				fmt.Fprintf(os.Stderr, "starting vm %s from %s ...\n", vm, map[bool]string{true: "point " + point, false: "its latest point"}[req.Point != 0 || !req.Before.IsZero()])
			}
			r, err := c.Failover(ctx, vm, req)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(r)
			}
			printRun(r)
			return nil
		},
	}
	cmd.Flags().StringVar(&point, "point", "", "the point to start from: its id, a time (RFC 3339: the latest point at or before it), or latest (the default)")
	cmd.Flags().BoolVar(&test, "test", false, "a test: a throwaway overlay, an isolated network, replication goes on")
	cmd.Flags().BoolVar(&stop, "stop", false, "with --test: stop and discard the VM's test runs")
	cmd.Flags().BoolVar(&undo, "undo", false, "stop the failed-over VM, discard what it wrote, and hand it back to its production site")
	cmd.Flags().BoolVar(&commit, "commit", false, "keep the failover")
	cmd.Flags().BoolVar(&force, "force", false, "fail over although the production site was in contact a moment ago (it is known lost, or fenced)")
	cmd.Flags().BoolVar(&acceptDamage, "accept-damage", false, "start the VM even from a point with an image cut short since it was written (the guest reads zeros there) or a block a verify found damaged: a last resort")
	cmd.Flags().BoolVar(&list, "list", false, "list the VMs running from their points here")
	cmd.Flags().BoolVar(&planned, "planned", false, "at the protected site: shut the VM down, send a last point, and have the recovery site start it (no loss)")
	cmd.Flags().DurationVar(&shutdownTimeout, "shutdown-timeout", 2*time.Minute, "with --planned: how long the guest may take to power off before its CPUs are stopped")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	cmd.Flags().DurationVar(&agentWait, "agent-wait", 5*time.Minute, "how long to wait for the guest agent to answer (0: do not wait)")
	return cmd
}

func countTrue(bs ...bool) int {
	n := 0
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

func printRun(r *failover.Run) {
	fmt.Printf("vm %s: %s of point %d (taken %s, %s before the start) running\n", r.VM, r.Kind(), r.Point,
		r.Instant.UTC().Format(time.RFC3339), r.Started.Sub(r.Instant).Round(time.Second))
	fmt.Printf("  QEMU running      %v after the command\n", r.ToRunning.Round(time.Millisecond))
	if r.ToAgent > 0 {
		fmt.Printf("  agent answering   %v after the command\n", r.ToAgent.Round(time.Millisecond))
	} else {
		fmt.Printf("  agent             not answering yet (console: %s)\n", r.Console)
	}
	for _, n := range r.Networks {
		fmt.Printf("  nic               %s\n", n)
	}
	fmt.Printf("  qmp               %s\n  guest agent       %s\n", r.QMP, r.Agent)
	if r.Test {
		fmt.Printf("end it with `lifeboat failover %s --test --stop`\n", r.VM)
		return
	}
	fmt.Printf("this site owns vm %s now (epoch %d): keep it with `lifeboat failover %s --commit`, or give it up with --undo\n", r.VM, r.Owner.Epoch, r.VM)
}

func printRuns(runs []*failover.Run) error {
	if len(runs) == 0 {
		fmt.Println("no VM runs from its points at this site")
		return nil
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tKIND\tPOINT\tSTARTED (UTC)\tTO RUNNING\tTO AGENT\tSTATE\tRUN")
	for _, r := range runs {
		state := "running"
		if !r.Alive() {
			state = "QEMU gone (stop it to clean up)"
		} else if r.Committed {
			state = "running, committed"
		} else if !r.Test && !r.CommitBy.IsZero() {
			state = "running, waiting for --commit or --undo (commits itself at " + r.CommitBy.UTC().Format("15:04:05") + ")"
		} else if !r.Test {
			state = "running, waiting for --commit or --undo"
		}
		agent := "-"
		if r.ToAgent > 0 {
			agent = r.ToAgent.Round(time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%v\t%s\t%s\t%s\n", r.VM, r.Kind(), r.Point, r.Started.Format(time.RFC3339),
			r.ToRunning.Round(time.Millisecond), agent, state, r.ID)
	}
	return tw.Flush()
}

// pointTime reads --point as a time (RFC 3339, or its date and time with no
// zone, read in the local zone): the latest point at or before it.
func pointTime(s string) (time.Time, bool) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, true
	}
	for _, layout := range []string{"2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02 15:04"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, true
		}
	}
	return time.Time{}, false
}

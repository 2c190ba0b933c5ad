package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
	"github.com/lifeboat-dr/lifeboat/failover"
)

func newPlanCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "plan run NAME [--test] [--point latest|TIME] | plan stop NAME",
		Short: "At a recovery site: run a recovery plan (VMs started step by step), or end a test of one",
	}
	var test, asJSON, force, apart bool
	var point string
	run := &cobra.Command{
		Use:   "run NAME",
		Short: "Start a plan's VMs from their latest points, step by step",
		Long: `run starts each step's VMs at once from their latest points, waits for the step (every
guest agent answering, or a delay), runs the plan's hooks for each VM, then goes on to
the next step. A step with a VM that fails ends the plan; the VMs started keep running.
--test does it all as test failovers: isolated networks, replication goes on; end it with
` + "`lifeboat plan stop NAME`" + `.`,
		Example: "  lifeboat plan run web-tier --test\n  lifeboat plan stop web-tier\n  lifeboat plan run web-tier",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			req := daemon.PlanRequest{Test: test, Force: force, Apart: apart}
			if t, ok := pointTime(point); ok {
				req.Before = t
			} else if point != "" && point != "latest" {
				return usagef("--point %q: give latest, or a time (2026-12-01T09:30:00Z): each VM from its latest point at or before it", point)
			}
			begin := time.Now()
			rows, err := c.RunPlan(cmd.Context(), args[0], req, func(e failover.PlanEvent) {
				if !asJSON {
					vm := ""
					if e.VM != "" {
						vm = e.VM + ": "
					}
					fmt.Fprintf(os.Stderr, "%s  +%5.1fs  step %d  %s%s\n", e.At.Local().Format("15:04:05"), e.At.Sub(begin).Seconds(), e.Step, vm, e.What)
				}
			})
			if asJSON {
				if perr := printJSON(rows); perr != nil {
					return perr
				}
				return err
			}
			if len(rows) == 0 {
				return err // nothing started: no summary to show
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STEP\tVM\tPOINT\tPOINT AGE (RPO)\tSTARTED\tQEMU RUNNING\tAGENT ANSWERING\tERROR")
			for _, r := range rows {
				agent, errText := "-", "-"
				if !r.Agent.IsZero() {
					agent = fmt.Sprintf("%s (+%v)", r.Agent.Local().Format("15:04:05.000"), r.ToAgent.Round(time.Millisecond))
				}
				if r.Error != "" {
					errText = r.Error
				}
				running := fmt.Sprintf("+%v", r.ToRunning.Round(time.Millisecond))
				if r.Already {
					running = "already, by run " + r.Run
				}
				fmt.Fprintf(tw, "%d\t%s\t%d\t%v\t%s\t%s\t%s\t%s\n", r.Step, r.VM, r.Point, r.PointAge.Round(time.Second),
					r.Started.Local().Format("15:04:05.000"), running, agent, errText)
			}
			if ferr := tw.Flush(); ferr != nil {
				return ferr
			}
			return err
		},
	}
	run.Flags().BoolVar(&test, "test", false, "a test: every VM as a test failover")
	run.Flags().StringVar(&point, "point", "latest", "which points: latest, or a time (RFC 3339): each VM from its latest point at or before it")
	run.Flags().BoolVar(&asJSON, "json", false, "print the summary as JSON")
	run.Flags().BoolVar(&apart, "apart", false, "start the VMs of a consistency group each from its own point when they hold no group point in common (not consistent with one another; without it such a plan starts nothing)")
	run.Flags().BoolVar(&force, "force", false, "fail over even VMs whose production site was in contact a moment ago (it is known lost, or fenced)")
	stop := &cobra.Command{
		Use:   "stop NAME",
		Short: "End every test failover a plan started",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			n, err := c.StopPlan(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Printf("plan %s: %d test run(s) stopped and discarded\n", args[0], n)
			return nil
		},
	}
	cmd.AddCommand(run, stop)
	return cmd
}

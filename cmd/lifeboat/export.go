package main

import (
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
)

func newExportCmd(g *globals) *cobra.Command {
	var point, out, format, disk string
	cmd := &cobra.Command{
		Use:   "export VM [--point ID|latest] [--disk NAME] -o FILE",
		Short: "Write a restore point's disk out as an image (sparse), in any format qemu-img writes",
		Example: `  lifeboat export web1 -o /srv/web1.raw                 # a VM with one disk
  lifeboat export web1 --point latest -o /srv/web1.qcow2 --format qcow2
  lifeboat export web1 --point 12 --disk vdb -o /srv/web1-vdb.raw`,
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := oneVM(args, "lifeboat export web1 --point latest -o web1.raw")
			if err != nil {
				return err
			}
			if out == "" {
				return usagef("say where to write the image: `lifeboat export %s --point latest -o %s.raw`", vm, vm)
			}
			id, err := parsePoint(point)
			if err != nil {
				return err
			}
			abs, err := filepath.Abs(out)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			pt, err := c.Export(cmd.Context(), vm, daemon.ExportRequest{Point: id, Disk: disk, Out: abs, Format: format})
			if err != nil {
				return err
			}
			fmt.Printf("vm %s point %d (%s, %s) written to %s as %s\n", vm, pt.ID, pt.Instant.Format("2006-01-02T15:04:05.000Z"), pt.Consistency, abs, format)
			return nil
		},
	}
	cmd.Flags().StringVar(&point, "point", "latest", "point ID, or latest")
	cmd.Flags().StringVarP(&out, "output", "o", "", "image file to write (on the recovery site's file system)")
	cmd.Flags().StringVar(&format, "format", "raw", "raw, qcow2, vmdk, vdi, vhdx, ... (any format qemu-img writes)")
	cmd.Flags().StringVar(&disk, "disk", "", "disk to export, by its name in the point (needed when the point has several; an unknown name lists them)")
	return cmd
}

// parsePoint reads --point: a point ID or "latest" (0).
func parsePoint(s string) (uint64, error) {
	if s == "" || s == "latest" {
		return 0, nil
	}
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, usagef("--point %q: give a point ID from `lifeboat points VM`, or latest", s)
	}
	return id, nil
}

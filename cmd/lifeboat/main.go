// Command lifeboat replicates running QEMU/KVM VMs' disks to a recovery site and
// keeps restore points there. One binary: `serve` runs a site, the rest talk to it.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/daemon"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRootCmd()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "lifeboat:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// globals are the flags every command shares.
type globals struct {
	config string
	api    string
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "lifeboat",
		Short: "Disaster recovery for QEMU/KVM virtual machines",
		Long: `lifeboat replicates the disks of running QEMU/KVM VMs, block by block, to a
recovery site, and keeps restore points there that can be exported or powered on.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	def := os.Getenv("LIFEBOAT_CONFIG")
	if def == "" {
		def = "/etc/lifeboat/site.yaml"
	}
	root.PersistentFlags().StringVarP(&g.config, "config", "c", def, "site config file (env LIFEBOAT_CONFIG)")
	root.PersistentFlags().StringVar(&g.api, "api", "", "the site's API socket (default: api_socket of the config)")
	root.AddCommand(
		newServeCmd(g),
		newSyncCmd(g),
		newPointsCmd(g),
		newExportCmd(g),
		newVerifyCmd(g),
		newHandoverCmd(g),
		newFailoverCmd(g),
		newFailbackCmd(g),
		newProtectCmd(g),
		newUnprotectCmd(g),
		newForgetCmd(g),
		newPlanCmd(g),
		newStatusCmd(g),
		newCertCmd(),
		newDemoCmd(),
		newThawGuardCmd(),
	)
	return root
}

// usageError is a mistake on the command line; its message says what to type.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// client finds the local site's API socket from --api or the config.
func (g *globals) client() (*daemon.Client, error) {
	if g.api != "" {
		return daemon.NewClient(g.api), nil
	}
	cfg, err := daemon.LoadConfig(g.config)
	if err != nil {
		return nil, err
	}
	return daemon.NewClient(cfg.API), nil
}

// oneVM checks that a command got exactly one VM name.
func oneVM(args []string, example string) (string, error) {
	if len(args) != 1 {
		return "", usagef("name one VM, e.g. `%s`", example)
	}
	// A name that no VM can have ('/', a leading '.') would not even reach
	// the site's API as one path element ("..": a 404).
	if vm := args[0]; vm == "" || strings.ContainsRune(vm, '/') || strings.HasPrefix(vm, ".") || strings.HasPrefix(vm, "-") {
		return "", usagef("%q is not a VM's name (letters, digits, '_', '-' and '.', not starting with '.' or '-'): `lifeboat status` lists the VMs, e.g. `%s`", vm, example)
	}
	return args[0], nil
}

// notNegative refuses a negative duration given to flag: taken as its
// default or as none, it did what nobody asked.
func notNegative(flag string, d time.Duration, example string) error {
	if d < 0 {
		return usagef("--%s %v: give a duration of 0 or more, e.g. `%s`", flag, d, example)
	}
	return nil
}

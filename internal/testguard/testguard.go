// Package testguard lets a test binary be the thaw guard lifeboat starts
// before each freeze (`lifeboat thaw-guard`), so that tests run the real one.
package testguard

import (
	"context"
	"flag"
	"log/slog"
	"os"

	"github.com/lifeboat-dr/lifeboat/protect"
)

// Command is a quiescer's Guard in a test: this binary, as `lifeboat
// thaw-guard` (the daemon's guardCommand is os.Executable() thaw-guard too).
func Command() []string {
	exe, err := os.Executable()
	if err != nil {
		panic(err)
	}
	return []string{exe, "thaw-guard"}
}

// Serve runs the thaw guard and exits when this binary was started as one;
// TestMain calls it first.
func Serve() {
	if len(os.Args) < 2 || os.Args[1] != "thaw-guard" {
		return
	}
	fs := flag.NewFlagSet("thaw-guard", flag.ExitOnError)
	socket, uri, domain := fs.String("socket", "", ""), fs.String("uri", "", ""), fs.String("domain", "", "")
	marker, bound := fs.String("marker", "", ""), fs.Duration("bound", 0, "")
	fs.Parse(os.Args[2:])
	g := protect.FrozenGuest{Socket: *socket}
	if *domain != "" {
		g = protect.FrozenGuest{Libvirt: &protect.LibvirtDomain{URI: *uri, Domain: *domain}}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "thaw-guard")
	if err := protect.RunThawGuard(context.Background(), g, *marker, os.Stdin, *bound, log); err != nil {
		log.Error("thaw guard", "err", err)
		os.Exit(1)
	}
	os.Exit(0)
}

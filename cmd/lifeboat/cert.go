package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/pki"
	"github.com/spf13/cobra"
)

// maxDays bounds --days so the validity cannot overflow a time.Duration.
const maxDays = 100 * 365

// newCertCmd is `lifeboat cert`: the deployment's CA and its site certificates.
func newCertCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cert",
		Short: "Create the deployment CA and site certificates for mutual TLS",
		Long: `Sites talk only over mutual TLS with certificates from the deployment's own CA;
a peer with any other certificate is refused.

Create the CA once, on a machine you trust, then issue one certificate per site
and copy ca.crt, NAME.crt and NAME.key to that site, and nothing else: never
ca.key (who holds it can make a certificate of any site's name) nor another
site's key. A certificate cannot be revoked: if a site's key leaks, create a new
CA and issue every site again.`,
		Example: `  lifeboat cert ca --dir ./ca --name "acme lifeboat CA"
  lifeboat cert site dr-east --ca ./ca --out ./dr-east --host dr-east.example.com --host 10.0.0.5`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newCertCACmd(), newCertSiteCmd())
	return cmd
}

func newCertCACmd() *cobra.Command {
	var (
		dir, name string
		days      int
		force     bool
	)
	cmd := &cobra.Command{
		Use:   "ca --dir DIR",
		Short: "Create the deployment CA (DIR/ca.crt and DIR/ca.key)",
		Long: `Create the deployment CA: DIR/ca.crt, which every site gets a copy of, and
DIR/ca.key (mode 0600), which signs site certificates and should stay on the
machine that issues them. An existing CA is never replaced without --force.`,
		Example: `  lifeboat cert ca --dir ./ca --name "acme lifeboat CA" --days 3650`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			validFor, err := daysFlag(days, "lifeboat cert ca --dir ./ca --days 3650")
			if err != nil {
				return err
			}
			create := pki.CreateCA
			if force {
				create = pki.ReplaceCA
			}
			if err := create(dir, name, validFor); err != nil {
				return err
			}
			ca, err := pki.LoadCert(filepath.Join(dir, pki.CACertFile))
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "created CA %q in %s, valid until %s\n", name, dir, ca.NotAfter.UTC().Format(time.DateOnly))
			fmt.Fprintf(out, "  %s/ca.crt  copy to every site\n  %s/ca.key  keep secret: it signs site certificates\n", dir, dir)
			if force {
				fmt.Fprintln(cmd.ErrOrStderr(), "the old CA is gone: issue every site's certificate again with `lifeboat cert site`")
			}
			fmt.Fprintf(out, "next: lifeboat cert site NAME --ca %s --out DIR --host HOST\n", dir)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "`DIR` to create ca.crt and ca.key in (created 0700 if missing)")
	f.StringVar(&name, "name", "lifeboat CA", "`NAME` of the CA, shown in every certificate it issues")
	f.IntVar(&days, "days", 3650, "the CA is valid for `N` days; site certificates never outlive it")
	f.BoolVar(&force, "force", false, "replace an existing CA: every site certificate it issued stops being trusted")
	cmd.MarkFlagRequired("dir")
	cmd.MarkFlagDirname("dir")
	return cmd
}

func newCertSiteCmd() *cobra.Command {
	var (
		caDir, outDir string
		hosts         []string
		days          int
	)
	cmd := &cobra.Command{
		Use:   "site NAME --ca DIR --out DIR [--host H]...",
		Short: "Issue a site certificate from the CA",
		Long: `Issue the certificate of site NAME from the CA in --ca, writing NAME.crt,
NAME.key (mode 0600) and a copy of ca.crt into --out. The certificate serves
both ends of a connection. --host names the DNS names and IP addresses other
sites dial this one at; a site without --host can only dial out. Issuing again
for the same NAME renews the certificate.`,
		Example: `  lifeboat cert site dr-east --ca ./ca --out ./dr-east --host dr-east.example.com --host 10.0.0.5`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("lifeboat cert site takes one site name, got %d arguments; e.g. `lifeboat cert site dr-east --ca ./ca --out ./dr-east --host dr-east.example.com`", len(args))
			}
			return pki.CheckSiteName(args[0])
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			site := args[0]
			validFor, err := daysFlag(days, "lifeboat cert site "+site+" --ca ./ca --out ./"+site+" --days 365")
			if err != nil {
				return err
			}
			if err := pki.IssueSite(caDir, outDir, site, hosts, validFor); err != nil {
				return err
			}
			files := pki.SiteFiles(outDir, site)
			c, err := pki.LoadCert(files.Cert)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "issued site %q, valid until %s\n", site, c.NotAfter.UTC().Format(time.DateOnly))
			fmt.Fprintf(out, "  %s\n  %s  keep secret\n  %s\n", files.Cert, files.Key, files.CA)
			var names []string
			names = append(names, c.DNSNames...)
			for _, ip := range c.IPAddresses {
				names = append(names, ip.String())
			}
			if len(names) == 0 {
				fmt.Fprintf(cmd.ErrOrStderr(), "note: no --host given, so %q can dial other sites but no site can dial it\n", site)
			} else {
				fmt.Fprintf(out, "other sites dial it at: %s\n", strings.Join(names, ", "))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca", "", "`DIR` of the CA, as made by lifeboat cert ca")
	f.StringVar(&outDir, "out", "", "`DIR` to write NAME.crt, NAME.key and ca.crt in (created 0700 if missing)")
	f.StringSliceVar(&hosts, "host", nil, "`H`ost name or IP address other sites dial this site at (repeat, or separate with commas)")
	f.IntVar(&days, "days", 365, "the certificate is valid for `N` days (cut at the CA's expiry)")
	cmd.MarkFlagRequired("ca")
	cmd.MarkFlagRequired("out")
	cmd.MarkFlagDirname("ca")
	cmd.MarkFlagDirname("out")
	return cmd
}

// daysFlag turns --days into a validity, refusing values that make no sense.
func daysFlag(days int, example string) (time.Duration, error) {
	if days < 1 || days > maxDays {
		return 0, fmt.Errorf("--days %d: must be between 1 and %d; e.g. `%s`", days, maxDays, example)
	}
	return time.Duration(days) * 24 * time.Hour, nil
}

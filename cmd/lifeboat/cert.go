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
site's key. If a site's key leaks (its host compromised or decommissioned),
revoke its certificate with ` + "`lifeboat cert revoke`" + ` and copy the CA's ca.crl to
every site, beside ca.crt: every other site refuses it from its next call on.
The list's next update is due a year after it is signed: sign it again before
then with ` + "`lifeboat cert crl`" + ` and copy it to every site likewise.`,
		Example: `  lifeboat cert ca --dir ./ca --name "acme lifeboat CA"
  lifeboat cert site dr-east --ca ./ca --out ./dr-east --host dr-east.example.com --host 10.0.0.5
  lifeboat cert revoke ./dr-east/dr-east.crt --ca ./ca
  lifeboat cert crl --ca ./ca`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newCertCACmd(), newCertSiteCmd(), newCertRevokeCmd(), newCertCRLCmd())
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

func newCertRevokeCmd() *cobra.Command {
	var caDir string
	cmd := &cobra.Command{
		Use:   "revoke CERT|SERIAL --ca DIR",
		Short: "Revoke a site certificate: every site refuses it",
		Long: `Add a site certificate to the CA's revocation list, DIR/ca.crl (an X.509 CRL
signed by the CA), creating the list on first use. Name the certificate by its
file (NAME.crt) or its serial (as ` + "`openssl x509 -noout -serial`" + ` prints it; the
CA records every certificate it issues in DIR/issued/).

Then copy DIR/ca.crl to every site, beside its ca.crt (or where its config's
tls.crl says). A site reads the list again when the file changes: from its
next call or connection on it refuses the revoked site, a point that site is
streaming is not committed, and no restart is needed. Revocation is for good:
a site to be trusted again gets a new certificate (` + "`lifeboat cert site`" + `).`,
		Example: `  lifeboat cert revoke ./dr-east/dr-east.crt --ca ./ca`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("lifeboat cert revoke takes one certificate file or serial, got %d arguments; e.g. `lifeboat cert revoke ./ca/prod.crt --ca ./ca`", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			c, already, err := pki.Revoke(caDir, args[0])
			if err != nil {
				return err
			}
			site, err := pki.CertSite(c)
			if err != nil {
				site = c.Subject.CommonName
			}
			out := cmd.OutOrStdout()
			if already {
				fmt.Fprintf(out, "the certificate of site %q (subject %q, serial %s) was revoked already; %s is unchanged\n", site, c.Subject.String(), pki.Serial(c), filepath.Join(caDir, pki.CRLFile))
				return nil
			}
			fmt.Fprintf(out, "revoked the certificate of site %q (subject %q, serial %s)\n", site, c.Subject.String(), pki.Serial(c))
			fmt.Fprintf(out, "next: copy %s to every site, beside its ca.crt; each refuses %q from its next connection or call, without a restart\n", filepath.Join(caDir, pki.CRLFile), site)
			if rl, err := pki.LoadCRL(caDir); err == nil {
				fmt.Fprintf(out, "the list is number %s; its next update is due on %s: sign it again before then (`lifeboat cert crl --ca %s`)\n", rl.Number, rl.NextUpdate.UTC().Format(time.DateOnly), caDir)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&caDir, "ca", "", "`DIR` of the CA, as made by lifeboat cert ca (its ca.key signs the list)")
	cmd.MarkFlagRequired("ca")
	cmd.MarkFlagDirname("ca")
	return cmd
}

func newCertCRLCmd() *cobra.Command {
	var (
		caDir string
		days  int
	)
	cmd := &cobra.Command{
		Use:   "crl --ca DIR",
		Short: "Sign the CA's revocation list again, before its next update is due",
		Long: `Sign the CA's revocation list, DIR/ca.crl, again: the same certificates
revoked, the next number, and a next update --days from now (cut at the CA's
end). It creates an empty list if there is none yet.

A list's next update is due a year after ` + "`lifeboat cert revoke`" + ` or this command
signed it. Sites warn 30 days ahead (in their log, daily, and in ` + "`lifeboat status`" + `)
and, once it has passed, go on enforcing the list: they refuse no peer for its
age. Copy the new DIR/ca.crl to every site, beside its ca.crt: taken without a
restart. Each site remembers the highest list number it accepted and refuses
an older list, so the newest must reach every site.`,
		Example: `  lifeboat cert crl --ca ./ca --days 365`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			validity, err := daysFlag(days, "lifeboat cert crl --ca "+caDir+" --days 365")
			if err != nil {
				return err
			}
			rl, err := pki.RenewCRL(caDir, validity)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "signed revocation list %s: number %s, %d certificates revoked, next update due on %s\n",
				filepath.Join(caDir, pki.CRLFile), rl.Number, len(rl.RevokedCertificateEntries), rl.NextUpdate.UTC().Format(time.DateOnly))
			fmt.Fprintf(out, "next: copy it to every site, beside its ca.crt (taken without a restart)\n")
			return nil
		},
	}
	cmd.Flags().StringVar(&caDir, "ca", "", "`DIR` of the CA, as made by lifeboat cert ca (its ca.key signs the list)")
	cmd.Flags().IntVar(&days, "days", 365, "the list's next update is due in `N` days (cut at the CA's expiry)")
	cmd.MarkFlagRequired("ca")
	cmd.MarkFlagDirname("ca")
	return cmd
}

// daysFlag turns --days into a validity, refusing values that make no sense.
func daysFlag(days int, example string) (time.Duration, error) {
	if days < 1 || days > maxDays {
		return 0, fmt.Errorf("--days %d: must be between 1 and %d; e.g. `%s`", days, maxDays, example)
	}
	return time.Duration(days) * 24 * time.Hour, nil
}

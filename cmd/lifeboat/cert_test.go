package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/pki"
)

// runCert runs `lifeboat cert ARGS...` and returns its stdout and stderr.
func runCert(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := newCertCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err = cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestCertCommands(t *testing.T) {
	dir := t.TempDir()
	caDir, outDir := filepath.Join(dir, "ca"), filepath.Join(dir, "site-a")

	stdout, _, err := runCert(t, "ca", "--dir", caDir, "--name", "test CA", "--days", "30")
	if err != nil {
		t.Fatalf("cert ca: %v", err)
	}
	if !strings.Contains(stdout, `created CA "test CA"`) || !strings.Contains(stdout, "lifeboat cert site NAME --ca "+caDir) {
		t.Errorf("cert ca output does not say what it made and what is next:\n%s", stdout)
	}

	stdout, _, err = runCert(t, "site", "site-a", "--ca", caDir, "--out", outDir, "--host", "localhost", "--host", "127.0.0.1,a.example.com")
	if err != nil {
		t.Fatalf("cert site: %v", err)
	}
	if !strings.Contains(stdout, "localhost, a.example.com, 127.0.0.1") {
		t.Errorf("cert site output does not list the hosts:\n%s", stdout)
	}
	f := pki.SiteFiles(outDir, "site-a")
	// The files must be what the daemon loads.
	if _, err := pki.ServerTLS(f); err != nil {
		t.Errorf("ServerTLS of the issued files: %v", err)
	}
	if _, err := pki.ClientTLS(f, "a.example.com"); err != nil {
		t.Errorf("ClientTLS of the issued files: %v", err)
	}
	if fi, err := os.Stat(f.Key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("site key %s: %v, %v; want mode 0600", f.Key, fi.Mode(), err)
	}

	// A second CA in the same place is refused, and --force replaces it.
	_, _, err = runCert(t, "ca", "--dir", caDir)
	if !errors.Is(err, pki.ErrExists) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("cert ca over an existing CA: err = %v, want ErrExists saying --force", err)
	}
	_, stderr, err := runCert(t, "ca", "--dir", caDir, "--force")
	if err != nil {
		t.Fatalf("cert ca --force: %v", err)
	}
	if !strings.Contains(stderr, "issue every site") {
		t.Errorf("cert ca --force does not warn that sites need new certificates: %q", stderr)
	}
	// The site's certificate is the old CA's: the new CA must not trust it.
	_, err = pki.ServerTLS(pki.Files{CA: filepath.Join(caDir, pki.CACertFile), Cert: f.Cert, Key: f.Key})
	if err == nil || !strings.Contains(err.Error(), "not a site certificate of the CA") {
		t.Errorf("old site certificate against the replaced CA: err = %v", err)
	}
}

func TestCertUsageErrors(t *testing.T) {
	caDir := filepath.Join(t.TempDir(), "ca")
	if _, _, err := runCert(t, "ca", "--dir", caDir); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"ca without --dir", []string{"ca"}, `"dir" not set`},
		{"ca with no days", []string{"ca", "--dir", t.TempDir(), "--days", "0"}, "--days 0: must be between"},
		{"site without a name", []string{"site", "--ca", caDir, "--out", out}, "takes one site name"},
		{"site with two names", []string{"site", "a", "b", "--ca", caDir, "--out", out}, "got 2 arguments"},
		{"site with a bad name", []string{"site", "a/b", "--ca", caDir, "--out", out}, "not usable"},
		{"site without --ca", []string{"site", "a", "--out", out}, `"ca" not set`},
		{"site from no CA", []string{"site", "a", "--ca", out, "--out", out}, "lifeboat cert ca --dir " + out},
		{"site with a bad host", []string{"site", "a", "--ca", caDir, "--out", out, "--host", "a b"}, "neither an IP address nor a DNS name"},
		{"site for too long", []string{"site", "a", "--ca", caDir, "--out", out, "--days", "99999999"}, "must be between"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCert(t, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestCertExamples runs every Example line of `lifeboat cert` as written, in
// an empty directory: the help must show command lines that work.
func TestCertExamples(t *testing.T) {
	root := newCertCmd()
	// The parent's Example is the whole story, CA then a site; the
	// subcommands' Examples are the same story told one step each.
	groups := map[string][]string{"cert": strings.Split(root.Example, "\n")}
	story := map[string]int{"ca": 0, "site": 1, "revoke": 2, "crl": 3} // a revocation, then the list signed again, come last
	cmds := root.Commands()
	slices.SortFunc(cmds, func(a, b *cobra.Command) int { return story[a.Name()] - story[b.Name()] })
	for _, c := range cmds {
		groups["cert subcommands"] = append(groups["cert subcommands"], c.Example)
	}
	for _, c := range append(root.Commands(), root) {
		if c.Example == "" {
			t.Errorf("`lifeboat %s` has no Example", c.CommandPath())
		}
	}
	for name, lines := range groups {
		t.Run(name, func(t *testing.T) {
			t.Chdir(t.TempDir())
			for _, line := range lines {
				args := shellWords(strings.TrimSpace(line))
				if len(args) < 3 || args[0] != "lifeboat" || args[1] != "cert" {
					t.Fatalf("example %q is not a `lifeboat cert` command line", line)
				}
				if _, _, err := runCert(t, args[2:]...); err != nil {
					t.Errorf("example %q: %v", line, err)
				}
			}
			if _, err := pki.ServerTLS(pki.SiteFiles("dr-east", "dr-east")); err != nil {
				t.Errorf("files from the examples do not load: %v", err)
			}
		})
	}
}

// shellWords splits a command line on spaces, keeping "double quoted" words.
func shellWords(s string) []string {
	var words []string
	var cur strings.Builder
	quoted, inWord := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
			}
			inWord = false
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

// `lifeboat cert crl` signs the CA's list again: the same revocations, the
// next number, a next update --days ahead; `cert revoke` says when the next
// update is due.
func TestCertCRL(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if _, _, err := runCert(t, "ca", "--dir", caDir, "--name", "test CA"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCert(t, "site", "old", "--ca", caDir, "--out", caDir); err != nil {
		t.Fatal(err)
	}
	stdout, _, err := runCert(t, "revoke", filepath.Join(caDir, "old.crt"), "--ca", caDir)
	if err != nil || !strings.Contains(stdout, "number 1") || !strings.Contains(stdout, "next update is due on") || !strings.Contains(stdout, "lifeboat cert crl --ca "+caDir) {
		t.Errorf("cert revoke: %v\n%s\nwant the list's number, when its next update is due and how to sign it again", err, stdout)
	}
	stdout, _, err = runCert(t, "crl", "--ca", caDir, "--days", "30")
	if err != nil {
		t.Fatalf("cert crl: %v", err)
	}
	t.Log(stdout)
	rl, err := pki.LoadCRL(caDir)
	if err != nil {
		t.Fatal(err)
	}
	due := time.Now().Add(30 * 24 * time.Hour)
	if rl.Number.Int64() != 2 || len(rl.RevokedCertificateEntries) != 1 || rl.NextUpdate.Before(due.Add(-time.Hour)) || rl.NextUpdate.After(due) {
		t.Errorf("after cert crl --days 30: number %v, %d revoked, next update %v; want 2, 1, ~%v", rl.Number, len(rl.RevokedCertificateEntries), rl.NextUpdate, due)
	}
	if !strings.Contains(stdout, "number 2") || !strings.Contains(stdout, "1 certificates revoked") || !strings.Contains(stdout, "copy it to every site") {
		t.Errorf("cert crl output does not say what it signed and what is next:\n%s", stdout)
	}
	if _, _, err := runCert(t, "crl", "--ca", caDir, "--days", "0"); err == nil || !strings.Contains(err.Error(), "must be between") {
		t.Errorf("cert crl --days 0: %v", err)
	}
}

package pki

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// LoadCert reads the first certificate of a PEM file, for showing what a
// certificate says (its site, hosts and dates).
func LoadCert(path string) (*x509.Certificate, error) {
	return loadCert("cert", path, "")
}

func loadCert(role, path, hint string) (*x509.Certificate, error) {
	data, err := readPEMFile(role, path, hint)
	if err != nil {
		return nil, err
	}
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, fmt.Errorf("%s file %s: no PEM CERTIFICATE block in it; is it the right file?", role, path)
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s file %s: %w", role, path, err)
		}
		return c, nil
	}
}

func loadKey(role, path, hint string) (crypto.Signer, []byte, error) {
	data, err := readPEMFile(role, path, hint)
	if err != nil {
		return nil, nil, err
	}
	if err := checkKeyMode(role, path); err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, nil, fmt.Errorf("%s file %s: no PEM PRIVATE KEY block in it; is it the right file?", role, path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s file %s: %w", role, path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%s file %s: a %T cannot sign", role, path, k)
	}
	return s, data, nil
}

// checkKeyMode refuses a private key that every user of the machine may read,
// or that others than its owner may change: whoever reads a site's key can
// pose as that site to every other until its certificate is revoked. Readable by
// its group is allowed (a service user's group), as ssh's host keys are not.
func checkKeyMode(role, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s file %s: %w", role, path, err)
	}
	switch m := fi.Mode().Perm(); {
	case m&0o004 != 0:
		return fmt.Errorf("%s file %s is readable by every user of this machine (mode %04o): whoever reads it can pose as its owner; `chmod 600 %s` (or 640 with the group of the user lifeboat runs as)", role, path, m, path)
	case m&0o022 != 0:
		return fmt.Errorf("%s file %s may be changed by others than its owner (mode %04o): `chmod 600 %s`", role, path, m, path)
	}
	return nil
}

func readPEMFile(role, path, hint string) ([]byte, error) {
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		msg := fmt.Sprintf("%s file %s: no such file", role, path)
		if hint != "" {
			msg += "; " + hint
		}
		return nil, notExistError(msg)
	case err != nil:
		return nil, fmt.Errorf("%s file %s: %w", role, path, err)
	}
	return data, nil
}

// notExistError is a missing file, told in the user's words; it matches
// fs.ErrNotExist with errors.Is.
type notExistError string

func (e notExistError) Error() string { return string(e) }
func (e notExistError) Unwrap() error { return fs.ErrNotExist }

// checkValidity reports a certificate that is not valid at now, with its dates
// and what to do about it.
func checkValidity(role, path string, c *x509.Certificate, now time.Time, hint string) error {
	span := fmt.Sprintf("valid from %s to %s", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
	switch {
	case now.After(c.NotAfter):
		return fmt.Errorf("%s file %s: certificate %q expired on %s (%s); %s", role, path, c.Subject.CommonName, c.NotAfter.UTC().Format(time.RFC3339), span, hint)
	case now.Before(c.NotBefore):
		return fmt.Errorf("%s file %s: certificate %q is not valid yet (%s; now is %s): check this host's clock", role, path, c.Subject.CommonName, span, now.UTC().Format(time.RFC3339))
	}
	return nil
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func encodeKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// sameFile reports whether path already holds exactly data.
func sameFile(path string, data []byte) (exists, same bool, err error) {
	old, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, false, nil
	case err != nil:
		return false, false, fmt.Errorf("read %s: %w", path, err)
	}
	return true, bytes.Equal(old, data), nil
}

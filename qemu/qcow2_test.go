package qemu

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// CheckQcow2End against images qemu-img and qemu-io made: whole images of
// each refcount width and layout pass, whatever their last cluster holds (a
// subcluster image writes only the 4 KiB used of it), and the same images cut
// short by a cluster or more fail with ErrTruncated; QEMU itself reads the
// cut clusters as zeros without a word.
func TestCheckQcow2End(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-io")
	for _, tc := range []struct {
		name, opts string
		writes     []string
	}{
		{"plain, data at the end", "", []string{"write -P 0xab 0 1M", "write -P 0xcd 15M 1M"}},
		{"subclusters, 4 KiB in the last cluster", "extended_l2=on", []string{"write -P 0xab 0 1M", "write -P 0xcd 15M 4k"}},
		{"1-bit refcounts", "refcount_bits=1", []string{"write -P 0xab 0 3M"}},
		{"64-bit refcounts, 512 KiB clusters", "refcount_bits=64,cluster_size=512k", []string{"write -P 0xab 1M 2M"}},
		{"empty", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "d.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			if out, err := exec.Command("qemu-img", append(args, img, "16M")...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v: %s", err, out)
			}
			for _, w := range tc.writes {
				if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", w, img).CombinedOutput(); err != nil {
					t.Fatalf("qemu-io %s: %v: %s", w, err, out)
				}
			}
			if err := CheckQcow2End(img); err != nil {
				t.Fatalf("a whole image: %v", err)
			}
			st, err := os.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			if len(tc.writes) == 0 {
				return
			}
			for _, cut := range []int64{512 << 10, 2 << 20} {
				if cut >= st.Size() {
					continue
				}
				short := filepath.Join(t.TempDir(), fmt.Sprintf("cut%d.qcow2", cut))
				data, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(short, data[:st.Size()-cut], 0o600); err != nil {
					t.Fatal(err)
				}
				if err := CheckQcow2End(short); !errors.Is(err, ErrTruncated) {
					t.Errorf("the image cut by %d of its %d bytes: %v, want ErrTruncated", cut, st.Size(), err)
				}
			}
		})
	}
	if err := CheckQcow2End(filepath.Join(t.TempDir(), "missing.qcow2")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a missing image: %v", err)
	}
	raw := filepath.Join(t.TempDir(), "raw.img")
	if err := os.WriteFile(raw, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CheckQcow2End(raw); err == nil || errors.Is(err, ErrTruncated) {
		t.Errorf("a raw file: %v, want not a qcow2 image", err)
	}
}

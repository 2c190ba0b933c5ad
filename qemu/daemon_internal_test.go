package qemu

import (
	"slices"
	"testing"
)

func TestDaemonEnv(t *testing.T) {
	for _, c := range []struct{ in, want []string }{
		{[]string{"PATH=/bin"}, []string{"PATH=/bin", "GLIBC_TUNABLES=" + mallocTunables}},
		{[]string{"GLIBC_TUNABLES=glibc.pthread.rseq=0"}, []string{"GLIBC_TUNABLES=glibc.pthread.rseq=0:" + mallocTunables}},
		{[]string{"GLIBC_TUNABLES=glibc.malloc.trim_threshold=1"}, []string{"GLIBC_TUNABLES=glibc.malloc.trim_threshold=1"}},
	} {
		if got := daemonEnv(c.in); !slices.Equal(got, c.want) {
			t.Errorf("daemonEnv(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

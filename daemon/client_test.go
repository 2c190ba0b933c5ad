package daemon

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
)

// A plan whose site's daemon goes away mid-plan (a restart): the command
// says what the VMs started meanwhile do and where to find them. A stand-in
// for the daemon (an HTTP server on the API socket that sends one progress
// event and hangs up) forces the cut at a known point; the real daemon's
// answer is the same stream.
func TestRunPlanCutOffSaysWhatToDo(t *testing.T) {
	dir, err := os.MkdirTemp("", "lbplancut")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"progress":{"step":1,"vm":"web1","what":"QEMU running from point 3"}}` + "\n"))
		w.(http.Flusher).Flush()
		hj, ok := w.(http.Hijacker)
		if !ok {
			t.Error("no hijacker")
			return
		}
		c, _, err := hj.Hijack()
		if err == nil {
			c.Close() // the daemon is gone
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, test := range []bool{false, true} {
		var seen int
		_, err := NewClient(sock).RunPlan(ctx, "web-tier", PlanRequest{Test: test}, func(e failover.PlanEvent) { seen++ })
		if err == nil {
			t.Fatal("a plan cut off mid-way returned no error")
		}
		msg := err.Error()
		want := []string{`plan "web-tier"`, "lifeboat failover --list", "keep running"}
		if test {
			want = append(want, "lifeboat plan stop web-tier")
		} else {
			want = append(want, "lifeboat plan run web-tier")
		}
		for _, w := range want {
			if !strings.Contains(msg, w) {
				t.Errorf("test=%v: the error %q does not say %q", test, msg, w)
			}
		}
		if seen != 1 {
			t.Errorf("test=%v: %d progress events seen before the cut, want 1", test, seen)
		}
		t.Logf("test=%v: %v", test, err)
	}
}

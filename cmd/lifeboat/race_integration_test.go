package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/failover"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
)

// Commands that race each other at a recovery site, against real sites.

// deployFailedOver is vm1 replicated from prod to dr and failed over at dr
// (--force: prod is still there), under qemu-system from a definition that
// boots nothing: no guest is needed for the recovery site to own the VM.
// prod listens and dr names it among its peers, as for a failback.
func deployFailedOver(t *testing.T) (*deployment, *failover.Run) {
	t.Helper()
	testenv.RequireTools(t, "qemu-system-x86_64")
	prodAddr := freeAddr(t)
	d := deployWith(t, deployExtra{
		dr:   fmt.Sprintf("peers:\n  - {name: prod, address: %q}\n", prodAddr),
		prod: "listen: " + prodAddr + "\n",
		vm1:  "definition: {machine: q35, cpus: 1, memory_mib: 128}",
	}, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 16 << 20})
	run(t, "sync", "vm1", "-c", d.prod.config)
	run(t, "failover", "vm1", "--force", "--agent-wait", "0", "-c", d.dr.config)
	var runs []*failover.Run
	if err := json.Unmarshal([]byte(run(t, "failover", "--list", "--json", "-c", d.dr.config)), &runs); err != nil || len(runs) != 1 {
		t.Fatalf("failover --list: %v %v", runs, err)
	}
	r := runs[0]
	t.Cleanup(func() {
		syscall.Kill(r.PID, syscall.SIGCONT)
		if _, err := runErr(t, "failover", "vm1", "--undo", "-c", d.dr.config); err != nil && r.Alive() {
			syscall.Kill(r.PID, syscall.SIGKILL)
		}
	})
	return d, r
}

// A handover at the recovery site while a failover of the VM ran there
// made the named site the owner again: its cycles were taken while the VM
// ran at the recovery site, both sites running it. It is refused, naming
// the run and how to end it, and the production site stays refused.
func TestHandoverRefusedWhileFailedOver(t *testing.T) {
	d, r := deployFailedOver(t)
	out, err := runErr(t, "handover", "vm1", "--to", "prod", "-c", d.dr.config)
	if err == nil || !strings.Contains(out, r.ID) || !strings.Contains(out, "--undo") {
		t.Errorf("handover of vm1 while it runs at dr from a failover: %v\n%s\nwant it refused, naming run %s and --undo", err, out, r.ID)
	}
	if out, err := runErr(t, "sync", "vm1", "-c", d.prod.config); err == nil || !strings.Contains(out, "failed over to recovery site") {
		t.Errorf("prod's sync after the handover was asked: %v\n%s\nwant it refused: vm1 runs at dr", err, out)
	}
}

// `failover --commit` while `failover --undo` of the same run was under
// way answered "committed; it runs here from now on", and the undo went on
// and handed the VM back. The run's QEMU is stopped (SIGSTOP), so that the
// undo waits for it (10 s, then kills it), and the commit comes meanwhile:
// it is refused, saying that the undo runs, and the undo ends as asked.
func TestCommitRefusedWhileUndoRuns(t *testing.T) {
	d, r := deployFailedOver(t)
	if err := syscall.Kill(r.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	undo := exec.Command(binary, "failover", "vm1", "--undo", "-c", d.dr.config)
	var undoOut bytes.Buffer
	undo.Stdout, undo.Stderr = &undoOut, &undoOut
	if err := undo.Start(); err != nil {
		t.Fatal(err)
	}
	undone := make(chan error, 1)
	go func() { undone <- undo.Wait() }()
	time.Sleep(2 * time.Second)
	out, err := runErr(t, "failover", "vm1", "--commit", "-c", d.dr.config)
	if err == nil || !strings.Contains(out, "being undone") {
		t.Errorf("commit while the undo of the failover ran: %v\n%s\nwant it refused, saying the undo runs", err, out)
	}
	select {
	case err := <-undone:
		if err != nil {
			t.Errorf("undo: %v\n%s", err, undoOut.String())
		} else if !strings.Contains(undoOut.String(), "handed back to site prod") {
			t.Errorf("undo said:\n%s", undoOut.String())
		}
	case <-time.After(time.Minute):
		undo.Process.Kill()
		t.Fatalf("the undo did not end in a minute:\n%s", undoOut.String())
	}
	if out := run(t, "failover", "--list", "-c", d.dr.config); !strings.Contains(out, "no VM runs") {
		t.Errorf("runs after the undo:\n%s", out)
	}
	if out := run(t, "status", "-c", d.dr.config); !strings.Contains(out, "handed to prod") {
		t.Errorf("status after the undo does not say vm1 was handed back:\n%s", out)
	}
}

// A finalize asked over the local API with a shutdown_timeout or wait
// that is not a duration was refused only after the failback was marked
// under way, and nothing marked it ended: status said "failing back" for
// good, and the undo, forget and every failback of the VM were refused
// until the site restarted. The options are checked first now.
func TestFinalizeWithBadOptionsLeavesNoFailbackUnderWay(t *testing.T) {
	d, _ := deployFailedOver(t)
	c := apiClient(filepath.Join(d.dir, "dr", "api.sock"))
	for _, q := range []string{"shutdown_timeout=abc", "wait=soon", "wait=-1m"} {
		resp, err := c.Post("http://lifeboat/v1/vms/vm1/failback?finalize=1&"+q, "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if _, value, _ := strings.Cut(q, "="); !strings.Contains(string(b), value) {
			t.Errorf("finalize with %s: %d %s\nwant it refused, naming %q", q, resp.StatusCode, b, value)
		}
	}
	if st := run(t, "status", "-c", d.dr.config); strings.Contains(st, "to prod since") {
		t.Errorf("status after refused finalizes says a failback runs:\n%s", st)
	}
	out := run(t, "failover", "vm1", "--undo", "-c", d.dr.config)
	if !strings.Contains(out, "handed back to site prod") {
		t.Errorf("undo said:\n%s", out)
	}
}

// A planned migration of a member of a consistency group shut it down
// and ran it at the recovery site alone; the group's cycles then failed
// for good on the member gone (its QEMU quit, its recovery site refusing
// it), so that its other members were never replicated again. It is
// refused, naming the group, and the group replicates as before.
func TestPlannedMigrationOfAGroupMemberRefused(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	d := deploy(t, 16<<20)
	sys := startSystemVM(t)
	d.prod.restartWith(t, fmt.Sprintf("vms:\n  - {name: vm1, qmp: %s}\n  - {name: vm2, qmp: %s, nbd_socket: %s}\ngroups:\n  - {name: tier1, vms: [vm1, vm2]}\n",
		sys.QMPSocket(), d.vm.QMPSocket(), d.vm.NBDSocket()))
	run(t, "sync", "tier1", "-c", d.prod.config)

	out, err := runErr(t, "failover", "vm1", "--planned", "--shutdown-timeout", "1s", "-c", d.prod.config)
	if err == nil {
		t.Cleanup(func() { runErr(t, "failover", "vm1", "--undo", "-c", d.dr.config) })
	}
	if err == nil || !strings.Contains(out, `group "tier1"`) {
		t.Errorf("planned migration of vm1, a member of group tier1: %v\n%s\nwant it refused, naming the group", err, out)
	}
	// The group itself named: it was "not protected by site prod".
	if out, err := runErr(t, "failover", "tier1", "--planned", "-c", d.prod.config); err == nil || !strings.Contains(out, "is a consistency group") {
		t.Errorf("planned migration of group tier1: %v\n%s\nwant it refused, saying it is a group", err, out)
	}
	if out, err := runErr(t, "sync", "tier1", "-c", d.prod.config); err != nil {
		t.Errorf("group sync after the migration of a member was asked: %v\n%s", err, out)
	}
}

// apiClient is an HTTP client of a site's local API socket, for requests
// the commands never send.
func apiClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
}

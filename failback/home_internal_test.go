package failback

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
)

// finishedFailback is a store in dir holding the record of vm1's failback
// from dr, finished at production: failback point 5 held, fold 3.
func finishedFailback(t *testing.T) (dir string, s *Store) {
	t.Helper()
	dir = t.TempDir()
	rec := `{"owner": "dr", "held": 5, "fold": 3, "generations": {"vda": "g"}}`
	if err := os.WriteFile(filepath.Join(dir, "vm1.home.json"), []byte(rec), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := NewStore(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	return dir, s
}

// A failback finished at production leaves a record of it. Until the VM
// has replicated from production since (MarkResumed), a restarted site
// knows to bring it home (HomePending), and a new failback from the same
// site is refused as a late retry of the finished one; after it, the record
// refuses nothing: the VM may fail over and come back again.
func TestHomeRecordResumed(t *testing.T) {
	dir, s := finishedFailback(t)
	if got := s.HomePending(); len(got) != 1 || got["vm1"] != 3 {
		t.Fatalf("HomePending = %v, want vm1 at fold 3", got)
	}
	site := &Site{Store: s, Log: s.log, VM: func(context.Context, string) (VMInfo, bool) { return VMInfo{}, false }}
	// The finished failback's failover started from point 2, before the fold.
	_, err := site.Take(context.Background(), "dr", "vm1", lifeboat.Point{VM: "vm1", ID: 2}, nil)
	if !IsFinished(err) {
		t.Errorf("a failback from dr before the VM replicated from home: %v; want it refused as finished", err)
	}
	if err := s.MarkResumed("other"); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkResumed("vm1"); err != nil {
		t.Fatal(err)
	}
	if got := s.HomePending(); len(got) != 0 {
		t.Errorf("HomePending after the VM replicated = %v, want none", got)
	}
	_, err = site.Take(context.Background(), "dr", "vm1", lifeboat.Point{VM: "vm1", ID: 7}, nil)
	if err == nil || IsFinished(err) || !strings.Contains(err.Error(), "not protected by this site") {
		t.Errorf("a failback from dr after the VM replicated from home: %v; want it taken past the record (here: refused for the VM this test does not have)", err)
	}
	s2, err := NewStore(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := s2.HomePending(); len(got) != 0 {
		t.Errorf("HomePending of the restarted store = %v, want none", got)
	}
	// A repeated Finish of the same fold still gets its generations.
	if gens, err := s2.Finish(context.Background(), "dr", "vm1", 5, lifeboat.Point{VM: "vm1", ID: 3}, nil); err != nil || gens["vda"] != "g" {
		t.Errorf("a repeated Finish: %v %v", gens, err)
	}
}

// A failback finished at production whose VM never ran there since (lost
// again first) does not refuse the failback of a new failover from the
// fold point or later: that failback is taken, and the record goes.
func TestHomeRecordSupersededByANewFailover(t *testing.T) {
	dir, s := finishedFailback(t)
	site := &Site{Store: s, Log: s.log, VM: func(context.Context, string) (VMInfo, bool) { return VMInfo{}, false }}
	_, err := site.Take(context.Background(), "dr", "vm1", lifeboat.Point{VM: "vm1", ID: 3}, nil)
	if err == nil || IsFinished(err) || !strings.Contains(err.Error(), "not protected by this site") {
		t.Errorf("the failback of a new failover from the fold point: %v; want it taken past the record (here: refused for the VM this test does not have)", err)
	}
	if got := s.HomePending(); len(got) != 0 {
		t.Errorf("HomePending after a new failover's failback = %v, want none", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "vm1.home.json")); !os.IsNotExist(err) {
		t.Errorf("the finished failback's record is still there: %v", err)
	}
}

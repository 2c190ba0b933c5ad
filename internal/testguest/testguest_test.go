package testguest_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testguest"
	"github.com/lifeboat-dr/lifeboat/qga"
)

func TestCheckWriterFile(t *testing.T) {
	body := []byte("some body\x00\xff")
	good := func(name string) []byte {
		return fmt.Appendf(nil, "lifeboat-w %s %d %x\n%s", name, len(body), sha256.Sum256(body), body)
	}
	tests := []struct {
		name string
		data []byte
		ok   bool
	}{
		{"000042", good("000042"), true},
		{"000043", good("000042"), false},                                                     // header names another file
		{"000042", good("000042")[:len(good("000042"))-1], false},                             // torn write
		{"000042", append(good("000042"), 'x'), false},                                        // longer than the header says
		{"000042", []byte(strings.Replace(string(good("000042")), "some", "Some", 1)), false}, // changed byte
		{"000042", []byte("no header"), false},
		{"abc", good("abc"), false},
	}
	for i, tt := range tests {
		err := testguest.CheckWriterFile(tt.name, tt.data)
		if (err == nil) != tt.ok {
			t.Errorf("case %d (%s): %v, want ok=%v", i, tt.name, err, tt.ok)
		}
	}
}

func TestCounterGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	g := testguest.Boot(t, testguest.Options{Workload: testguest.Counter, Name: "counter", DiskSize: 64 << 20})
	for _, s := range []string{g.AgentSocket(), g.StorageQMPSocket(), g.StorageNBDSocket(), g.VMQMPSocket()} {
		if c, err := net.Dial("unix", s); err != nil {
			t.Errorf("%s: %v", s, err)
		} else {
			c.Close()
		}
	}
	if !strings.Contains(g.Console(), "lifeboat-guest: ready") {
		t.Fatalf("console lacks the ready line:\n%s", g.Console())
	}

	for i := 1; i <= 3; i++ {
		if err := g.SendCounter(fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.WaitCounter(ctx, "3"); err != nil {
		t.Fatal(err)
	}
	if out, err := g.Shell(ctx, "cat /data/counter"); err != nil || out != "1\n2\n3\n" {
		t.Fatalf("/data/counter holds %q, %v; want 1 2 3", out, err)
	}
	if err := g.SendCounter("a\nb"); err == nil {
		t.Fatal("a counter line with a line break was sent")
	}
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	if err := g.WaitCounter(short, "never sent"); err == nil {
		t.Fatal("WaitCounter returned for a line never sent")
	}

	// Stopped, the disk keeps what the guest fsynced and a clean copy of
	// its persistent bitmaps, and a guest booted on it (as on a restored
	// point) finds the data.
	if err := g.Storage().Monitor().AddBitmap(ctx, g.DiskNode(), "b0", true, false); err != nil {
		t.Fatal(err)
	}
	g.Stop()
	info, err := exec.Command("qemu-img", "info", "--output=json", g.DiskImage()).CombinedOutput()
	if err != nil || !strings.Contains(string(info), `"name": "b0"`) || strings.Contains(string(info), "in-use") {
		t.Fatalf("after Stop, qemu-img info %s: %v\n%s\nwant bitmap b0 saved, not in-use", g.DiskImage(), err, info)
	}
	select {
	case <-g.Storage().Exited():
	default:
		t.Fatal("storage daemon still running after Stop")
	}
	// The comma in the name puts one in the console's path, which QEMU's
	// option syntax must not split.
	t.Run("reboot, same disk", func(t *testing.T) {
		g2 := testguest.Boot(t, testguest.Options{Name: "again", Image: g.DiskImage()})
		if out, err := g2.Shell(ctx, "cat /data/counter"); err != nil || out != "1\n2\n3\n" {
			t.Fatalf("rebooted on the same disk, /data/counter holds %q, %v", out, err)
		}
	})
}

// The Go checker and the guest's writer agree on the file format.
func TestWriterFilesCheckOnTheHost(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	g := testguest.Boot(t, testguest.Options{Workload: testguest.FsyncWriter, Name: "writer"})
	a, err := qga.Dial(ctx, g.AgentSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var names []string
	for len(names) < 3 {
		out, err := a.Output(ctx, "ls", "/data/w")
		if err != nil {
			t.Fatal(err)
		}
		names = strings.Fields(string(out))
		time.Sleep(100 * time.Millisecond)
	}
	for _, name := range names[:3] {
		data, err := a.Output(ctx, "cat", "/data/w/"+name)
		if err != nil {
			t.Fatal(err)
		}
		if err := testguest.CheckWriterFile(name, data); err != nil {
			t.Error(err)
		}
	}
	if _, err := os.Stat(g.DiskImage()); err != nil {
		t.Fatal(err)
	}
}

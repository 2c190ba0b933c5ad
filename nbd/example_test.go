package nbd_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/lifeboat-dr/lifeboat/nbd"
)

// Reading the dirty extents of a fleece export and the data under them, the way
// a replication cycle does.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := nbd.Dial(ctx, "nbd+unix:///fleece?socket=/run/lifeboat/vm1.sock", "", nbd.Options{
		MetaContexts: []string{nbd.ContextBaseAllocation, nbd.ContextDirtyBitmap + "lifeboat-3"},
		Connections:  4,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	err = c.BlockStatus(ctx, nbd.ContextDirtyBitmap+"lifeboat-3", 0, c.Size(), func(e nbd.Extent) error {
		if e.Flags&nbd.StateDirty == 0 {
			return nil
		}
		for off := e.Offset; off < e.End(); off += int64(len(buf)) {
			p := buf[:min(int64(len(buf)), e.End()-off)]
			if err := c.Read(ctx, p, off); err != nil {
				return err
			}
			fmt.Println("dirty block at", off) // hash, compress, send...
		}
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
}

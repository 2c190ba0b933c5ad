package wire

import (
	"google.golang.org/grpc/experimental"

	"github.com/lifeboat-dr/lifeboat/internal/bufpool"
)

// gRPC's default buffer pool clears every buffer it hands out, and a buffer
// over 1 MiB (every full Blocks message) comes from a pool that clears it
// too: for a transfer that is one memclr per byte received and another per
// byte sent, 13% of an incremental cycle's CPU in `make bench`'s profile.
// Every buffer gRPC takes from the pool is filled before it is read (a
// message is encoded into it, or read into it whole), so the clearing
// protects nothing here: gRPC shares the point stream's pool, which does
// not clear.
func init() { experimental.SetDefaultBufferPool(bufpool.Shared) }

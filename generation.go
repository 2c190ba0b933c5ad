package lifeboat

import (
	"crypto/rand"
	"encoding/hex"
	"strconv"
)

// A generation is a dirty bitmap that holds every write to a disk since the
// instant of one point. Its name says whose it is and which instant:
//
//	lifeboat.<lineage>.<point>.<nonce>@<recovery site>
//
// The recovery site's point records the name of the generation its instant
// started, and the next delta is taken from exactly that generation. A bitmap
// of that name exists only in an image that descends from the disk at that
// instant: a disk restored from an older copy, reverted or swapped carries
// other names, and is resynchronised by hashes instead of being trusted. The
// nonce tells apart two instants of the same point number (a failed cycle's
// and its retry's). Generations kept for other recovery sites (another
// deployment protecting the same VM) are never touched; '@' is not allowed in
// site names, so the suffix is unambiguous.
const GenerationPrefix = "lifeboat."

// NewGeneration names a new generation of lineage that point's instant starts
// for site peer. A cycle starts one at each instant; a failover starts one on
// each overlay of the recovered VM as it resumes from point, for the site
// that owned the VM, so that a failback cycle (whose target is that site,
// holding point) takes it as its base and sends only what changed since.
func NewGeneration(peer, lineage string, point uint64) string {
	nonce := make([]byte, 4)
	rand.Read(nonce)
	return GenerationPrefix + lineage + "." + strconv.FormatUint(point, 10) + "." + hex.EncodeToString(nonce) + "@" + peer
}

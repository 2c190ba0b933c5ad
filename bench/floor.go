package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"runtime"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// floorCost is what the work costs, on this machine, that no design of
// lifeboat's can skip for each byte of an initial sync, beyond what nbdcopy
// does too (read the export, write the copy): hashing it at both sites (the
// sender to name the block, the recovery site to check it before writing:
// DESIGN.md's invariant) and sealing and opening it (the mutual TLS between
// the sites: AES-128-GCM, in TLS's 16 KiB records). Measured in this process
// on one CPU, over 64 MiB taken from one 1 MiB chunk (a chunk a reader of
// lifeboat's holds: hot in the CPU's cache, the cheapest case), scaled to the
// data's size.
type floorCost struct {
	Hash  time.Duration // BLAKE3 of the data, once
	Crypt time.Duration // seal and open of the data, once each
}

// Total is the floor's CPU time: the hash at both sites, seal and open.
func (f floorCost) Total() time.Duration { return 2*f.Hash + f.Crypt }

// limit is the least CPU time lifeboat can spend on the data where a peer
// spent peerCPU (its reads and writes, which lifeboat must do too) and the
// least wall time that takes with both sites on this machine's CPUs.
func (f floorCost) limit(peerCPU float64) (cpu, wall float64) {
	cpu = peerCPU + f.Total().Seconds()
	return cpu, cpu / float64(runtime.NumCPU())
}

// measureFloor measures floorCost for data bytes (the best of 3 passes: noise
// only ever adds time).
func measureFloor(data int64) floorCost {
	const sample, chunk = 64 << 20, 1 << 20
	buf := make([]byte, chunk)
	rand.Read(buf)
	best := func(f func()) time.Duration {
		var min time.Duration
		for i := range 3 {
			start := time.Now()
			f()
			if d := time.Since(start); i == 0 || d < min {
				min = d
			}
		}
		return min * time.Duration(data) / sample
	}
	var sink lifeboat.Hash
	hash := best(func() {
		for o := 0; o < sample; o += lifeboat.BlockSize {
			sink = lifeboat.HashBlock(buf[o%chunk : o%chunk+lifeboat.BlockSize])
		}
	})
	_ = sink
	key := make([]byte, 16)
	rand.Read(key)
	block, _ := aes.NewCipher(key)
	gcm, _ := cipher.NewGCM(block)
	nonce := make([]byte, gcm.NonceSize())
	const record = 16 << 10
	rec := make([]byte, 0, record+gcm.Overhead())
	crypt := best(func() {
		for o := 0; o < sample; o += record {
			sealed := gcm.Seal(rec[:0], nonce, buf[o%chunk:o%chunk+record], nil)
			if _, err := gcm.Open(sealed[:0], nonce, sealed, nil); err != nil {
				panic(err) // a record it sealed itself
			}
		}
	})
	return floorCost{Hash: hash, Crypt: crypt}
}

package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"

	"github.com/lifeboat-dr/lifeboat/wire"
)

type wireRow struct {
	Content     contentKind
	Compression wire.Compression
	Written     int64
	Changed     int64 // blocks the cycle considered
	Data        int64 // of which sent as block data (before compression)
	Zero        int64 // of which sent as zero ranges
	Sent        int64 // on the wire, after compression
	// ZstdAlone is the content compressed by zstd at lifeboat's level in 1 MiB
	// pieces (lifeboat's chunk), each on its own: what compression could save.
	ZstdAlone int64
	M         measured
	Identical string
}

type wireResult struct{ Rows []wireRow }

// benchWire: how many bytes cross the wire for a change of each content kind,
// with zstd and without. One cycle per content kind, each after writing that
// content sequentially into a region of its own.
func benchWire(ctx context.Context, e *env) (*wireResult, error) {
	c := e.cfg
	res := &wireResult{}
	diskSize := int64(len(contentKinds)) * c.WireChange * 2
	for _, comp := range []wire.Compression{wire.CompressionZstd, wire.CompressionNone} {
		name := "wire-" + string(comp)
		vm, err := startVM(ctx, e.path(name+"-vm"), diskSize, 3)
		if err != nil {
			return nil, err
		}
		rows, err := wireOn(ctx, e, vm, name, comp)
		e.stop("source VM", vm.Stop)
		if err != nil {
			return nil, err
		}
		res.Rows = append(res.Rows, rows...)
	}
	return res, nil
}

func wireOn(ctx context.Context, e *env, vm *sourceVM, name string, comp wire.Compression) ([]wireRow, error) {
	c := e.cfg
	rep, err := startReplication(ctx, e.path(name+"-site"), "bench-wire", vm, comp, e.log)
	if err != nil {
		return nil, err
	}
	defer e.stop("recovery site", rep.Stop)
	if _, _, _, err := rep.Cycle(ctx); err != nil { // the initial sync of the empty disk
		return nil, err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, err
	}
	defer enc.Close()
	var rows []wireRow
	for i, kind := range contentKinds {
		e.progress("bytes on the wire, %s: %s of %s content, then one cycle", comp, size(c.WireChange), kind)
		src, err := newContent(kind, uint64(i+1))
		if err != nil {
			return nil, err
		}
		zc := &zstdCounter{r: src, enc: enc}
		src = zc
		// Each kind in a region of its own, so a cycle sees only its kind.
		if err := vm.WriteContent(ctx, src, int64(i)*2*c.WireChange, c.WireChange); err != nil {
			return nil, err
		}
		pt, m, _, err := rep.Cycle(ctx)
		if err != nil {
			return nil, err
		}
		if err := vm.Flush(ctx); err != nil {
			return nil, err
		}
		ok, err := rep.Identical(ctx, pt.ID, vm.Image)
		if err != nil {
			return nil, fmt.Errorf("compare the replica with the source: %w", err)
		}
		s := pt.Stats
		rows = append(rows, wireRow{Content: kind, Compression: comp, Written: c.WireChange, Changed: s.BytesChanged,
			Data: s.BytesData, Zero: s.BytesZero, Sent: s.BytesSent, ZstdAlone: zc.n, M: m, Identical: yesNo(ok)})
	}
	return rows, nil
}

func (r *wireResult) print(e *env) {
	e.printf("\n## 3. Bytes on the wire vs bytes changed (one cycle after writing each kind of content)\n\n")
	t := e.table("content", "compression", "written", "changed", "sent as data", "sent as zero ranges", "on the wire", "wire / changed", "zstd alone / changed", "cycle", "replica identical")
	for _, row := range r.Rows {
		t.row(string(row.Content), string(row.Compression), size(row.Written), size(row.Changed), size(row.Data), size(row.Zero),
			size(row.Sent), fmt.Sprintf("%.3f", float64(row.Sent)/float64(max(row.Changed, 1))),
			fmt.Sprintf("%.3f", float64(row.ZstdAlone)/float64(max(row.Changed, 1))), secs(row.M.Wall.Seconds()), row.Identical)
	}
	t.flush()
	e.printf("\nrandom: incompressible (encrypted or already compressed data). os-files: the files under /usr/lib and /usr/share of\n" +
		"this machine in directory order, each padded to 4 KiB as a file system lays it out (what installing an OS writes).\n" +
		"text-log: generated log lines. \"on the wire\" counts block data and hashes after compression; zero blocks travel as ranges.\n" +
		"\"zstd alone\" is the written content compressed by zstd at lifeboat's level (fastest) in 1 MiB pieces, each on its own,\n" +
		"outside lifeboat: what the link could save at that level (lifeboat sends a chunk raw where compressing it does not pay).\n")
}

// zstdCounter passes content through and counts its size compressed by zstd,
// one read at a time: it fills each read whole, and WriteContent reads 1 MiB
// pieces, so each is compressed as lifeboat's 1 MiB chunk would be.
type zstdCounter struct {
	r   io.Reader
	enc *zstd.Encoder
	buf []byte
	n   int64
}

func (z *zstdCounter) Read(b []byte) (int, error) {
	n, err := io.ReadFull(z.r, b)
	if n > 0 {
		z.buf = z.enc.EncodeAll(b[:n], z.buf[:0])
		z.n += int64(min(len(z.buf), n)) // a chunk that does not shrink is sent as it is
	}
	return n, err
}

func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

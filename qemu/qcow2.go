package qemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// ErrTruncated marks a qcow2 image whose file ends before clusters its own
// refcounts say are in use: QEMU reads such clusters as zeros, with no error.
var ErrTruncated = errors.New("qcow2 image is truncated")

// CheckQcow2End checks, by reading a few metadata clusters whatever the
// image's size (its header, the refcount table and its last refcount block),
// that the file holds the start of the last cluster the image's refcounts say
// is in use. A file cut short (a failing disk, an operator's truncate, a copy
// that stopped) otherwise reads as zeros where its data was, which `qemu-img
// check` reports only by reading every table. The last cluster itself may
// end before its size: a subcluster image writes only the subclusters used.
// It returns an error wrapping ErrTruncated, naming the file and the offsets,
// or the error that kept it from reading the metadata.
func CheckQcow2End(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	var h [104]byte
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, size), h[:72]); err != nil {
		return fmt.Errorf("%w: %s: its %d-byte file holds no whole header", ErrTruncated, path, size)
	}
	be := binary.BigEndian
	if string(h[:4]) != "QFI\xfb" {
		return fmt.Errorf("%s is not a qcow2 image", path)
	}
	version := be.Uint32(h[4:])
	clusterBits := be.Uint32(h[20:])
	if clusterBits < 9 || clusterBits > 21 {
		return fmt.Errorf("%s: qcow2 header gives %d cluster bits", path, clusterBits)
	}
	cluster := int64(1) << clusterBits
	tableOff := int64(be.Uint64(h[48:]))
	tableLen := int64(be.Uint32(h[56:])) * cluster
	refBits := int64(16)
	if version >= 3 {
		if _, err := f.ReadAt(h[72:104], 72); err != nil {
			return fmt.Errorf("%w: %s: its %d-byte file holds no whole header", ErrTruncated, path, size)
		}
		order := be.Uint32(h[96:])
		if order > 6 {
			return fmt.Errorf("%s: qcow2 header gives refcount order %d", path, order)
		}
		refBits = 1 << order
	}
	if tableOff <= 0 || tableLen <= 0 || tableLen > 1<<30 {
		return fmt.Errorf("%s: qcow2 header gives a refcount table of %d bytes at %d", path, tableLen, tableOff)
	}
	past := func(what string, off, n int64) error {
		return fmt.Errorf("%w: %s: its %s (%d bytes at offset %d) lies past the file's end at %d", ErrTruncated, path, what, n, off, size)
	}
	if tableOff+tableLen > size {
		return past("refcount table", tableOff, tableLen)
	}
	table := make([]byte, tableLen)
	if _, err := f.ReadAt(table, tableOff); err != nil {
		return fmt.Errorf("%s: reading the refcount table: %w", path, err)
	}
	last := int64(-1) // the last refcount block
	var blockOff int64
	for i := tableLen/8 - 1; i >= 0; i-- {
		if o := int64(be.Uint64(table[i*8:]) &^ 0x1ff); o != 0 {
			last, blockOff = i, o
			break
		}
	}
	if last < 0 {
		return fmt.Errorf("%s: the refcount table names no refcount block", path)
	}
	if blockOff+cluster > size {
		return past("last refcount block", blockOff, cluster)
	}
	block := make([]byte, cluster)
	if _, err := f.ReadAt(block, blockOff); err != nil {
		return fmt.Errorf("%s: reading refcount block at %d: %w", path, blockOff, err)
	}
	perBlock := cluster * 8 / refBits
	for j := perBlock - 1; j >= 0; j-- {
		if refcount(block, j, refBits) != 0 {
			start := (last*perBlock + j) * cluster
			if start >= size {
				return past("last cluster in use", start, cluster)
			}
			return nil
		}
	}
	return fmt.Errorf("%s: the last refcount block (at %d) counts no cluster", path, blockOff)
}

// refcount is entry j of a refcount block of bits-wide entries (1 to 64:
// big-endian from 8 bits up, packed from each byte's least significant bit
// below).
func refcount(block []byte, j, bits int64) uint64 {
	switch bits {
	case 64:
		return binary.BigEndian.Uint64(block[j*8:])
	case 32:
		return uint64(binary.BigEndian.Uint32(block[j*4:]))
	case 16:
		return uint64(binary.BigEndian.Uint16(block[j*2:]))
	case 8:
		return uint64(block[j])
	}
	bit := j * bits
	return uint64(block[bit/8]>>(bit%8)) & (1<<bits - 1)
}

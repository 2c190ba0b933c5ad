package wire

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/lifeboat-dr/lifeboat/wire/wirepb"
)

func blocksFrame(b *wirepb.Blocks) []byte {
	out, err := proto.Marshal(&wirepb.Frame{Body: &wirepb.Frame_Blocks{Blocks: b}})
	if err != nil {
		panic(err)
	}
	return out
}

// sameBlocks compares as protobuf does: an empty bytes field is absent.
func sameBlocks(a, b *wirepb.Blocks) bool {
	return a.Disk == b.Disk && a.Offset == b.Offset && a.Length == b.Length && a.Zstd == b.Zstd &&
		bytes.Equal(a.Hashes, b.Hashes) && bytes.Equal(a.Data, b.Data)
}

// Every Blocks frame the protected site sends takes the fast path, and reads
// exactly as protobuf reads it.
func TestDecodeBlocksFrameTakesEverySentFrame(t *testing.T) {
	for _, b := range []*wirepb.Blocks{
		{Disk: "vda", Offset: 1 << 40, Hashes: bytes.Repeat([]byte{7}, 64), Length: 128 << 10, Data: bytes.Repeat([]byte{1}, 128<<10)},
		{Disk: "vdb", Offset: 0, Hashes: make([]byte, 32), Length: 65536, Zstd: true, Data: []byte{0x28, 0xb5}},
		{}, // every field at its zero value: an empty Blocks
		{Disk: "dåta", Offset: -1, Length: 1<<32 - 1},
	} {
		raw := blocksFrame(b)
		got, ok := decodeBlocksFrame(raw)
		if !ok {
			t.Fatalf("frame %+v: fast path refused a frame protobuf wrote", b)
		}
		if !sameBlocks(got, b) {
			t.Fatalf("decoded %+v, sent %+v", got, b)
		}
		if len(b.Data) > 0 && &got.Data[0] != &raw[len(raw)-len(b.Data)] {
			t.Fatalf("frame %+v: data was copied, not left in the buffer", b)
		}
	}
}

// What the fast path refuses goes to protobuf; what it takes, it reads as
// protobuf does. Frames of other kinds are never taken.
func TestDecodeBlocksFrameRefusesOthers(t *testing.T) {
	zeroes, _ := proto.Marshal(&wirepb.Frame{Body: &wirepb.Frame_Zeroes{Zeroes: &wirepb.Zeroes{Disk: "vda", Length: 4096}}})
	commit, _ := proto.Marshal(&wirepb.Frame{Body: &wirepb.Frame_Commit{Commit: &wirepb.Commit{}}})
	one := blocksFrame(&wirepb.Blocks{Disk: "vda", Data: []byte("a")})
	two := append(append([]byte{}, one...), blocksFrame(&wirepb.Blocks{Offset: 5})...) // a merge of two bodies
	badUTF8 := blocksFrame(&wirepb.Blocks{Data: []byte("x")})
	badUTF8 = append(badUTF8[:1:1], append([]byte{byte(badUTF8[1] + 3), 0x0a, 1, 0xff}, badUTF8[2:]...)...)
	for name, raw := range map[string][]byte{"zeroes": zeroes, "commit": commit, "merged bodies": two, "invalid utf-8 disk": badUTF8, "truncated": one[:len(one)-1], "empty": nil} {
		if _, ok := decodeBlocksFrame(raw); ok {
			t.Errorf("%s: fast path took a frame it must leave to protobuf", name)
		}
	}
}

func FuzzDecodeBlocksFrame(f *testing.F) {
	f.Add(blocksFrame(&wirepb.Blocks{Disk: "vda", Offset: 65536, Hashes: make([]byte, 32), Length: 3, Data: []byte("abc")}))
	f.Add(blocksFrame(&wirepb.Blocks{Zstd: true}))
	f.Add([]byte{0x12, 0x02, 0x28, 0x01})
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, ok := decodeBlocksFrame(raw)
		if !ok {
			return
		}
		var want wirepb.Frame
		if err := proto.Unmarshal(raw, &want); err != nil {
			t.Fatalf("fast path took %x, which protobuf refuses: %v", raw, err)
		}
		wb := want.GetBlocks()
		if wb == nil || !sameBlocks(got, wb) {
			t.Fatalf("fast path read %x as %+v, protobuf as %+v", raw, got, want.Body)
		}
	})
}

func TestDirtyPool(t *testing.T) {
	p := newDirtyPool()
	for _, n := range []int{1, 255, 256, 257, 16 << 10, 1<<20 + 1, 5 << 20, 8 << 20, 8<<20 + 1} {
		b := p.Get(n)
		if len(*b) != n || cap(*b) < n {
			t.Fatalf("Get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		p.Put(b)
		if c := p.Get(n); len(*c) != n || cap(*c) < n {
			t.Fatalf("Get(%d) after Put: len %d cap %d", n, len(*c), cap(*c))
		}
	}
	odd := make([]byte, 3000) // a buffer gRPC did not get from us: pooled by what it can hold
	p.Put(&odd)
	if c := p.Get(2048); cap(*c) < 2048 {
		t.Fatalf("cap %d", cap(*c))
	}
}

package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

var sampleHeaders = []Header{
	{},
	{Type: 1, Volume: "vol-1", Epoch: 7, Seq: 1 << 40, Gen: 3, Offset: 1 << 30, Length: 4096, Flags: 1},
	{Type: TypePing},
	{Type: math.MaxUint8, Volume: strings.Repeat("v", MaxVolumeLen), Epoch: math.MaxUint64, Seq: math.MaxUint64,
		Gen: math.MaxUint64, Offset: math.MinInt64, Length: math.MaxUint32, Flags: math.MaxUint32,
		Status: math.MaxUint16, Aux: [4]uint64{math.MaxUint64, math.MaxUint64, math.MaxUint64, math.MaxUint64}},
	{Type: 2, Volume: "db", Offset: -1, Status: StatusHandlerError, Aux: [4]uint64{0, 5}},
}

// TestHeaderInterop: the transport's encoding is what the msgpack library
// makes of a Header, and each decodes the other's.
func TestHeaderInterop(t *testing.T) {
	c := newFrameCodec()
	for _, h := range sampleHeaders {
		lib, err := msgpack.Marshal(&h)
		if err != nil {
			t.Fatal(err)
		}
		frame, err := c.encode(1, &h, 0)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(lib, frame[prefixLen:]) {
			t.Errorf("%+v: library encodes %x, transport %x", h, lib, frame[prefixLen:])
		}
		var fromLib, fromUs Header
		if err := c.decodeHeader(lib, &fromLib); err != nil || fromLib != h {
			t.Errorf("%+v: transport decodes the library's bytes to %+v, %v", h, fromLib, err)
		}
		if err := msgpack.Unmarshal(frame[prefixLen:], &fromUs); err != nil || fromUs != h {
			t.Errorf("%+v: library decodes the transport's bytes to %+v, %v", h, fromUs, err)
		}
	}
}

func TestHeaderRejects(t *testing.T) {
	enc := func(fields ...any) []byte {
		b, err := msgpack.Marshal(fields)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	valid := func() []any { return []any{1, "v", 0, 0, 0, 0, 0, 0, 0, []uint64{}} }
	with := func(i int, v any) []byte {
		f := valid()
		f[i] = v
		return enc(f...)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"not an array", enc("hello")[0:1]},
		{"nine fields", enc(valid()[:9]...)},
		{"eleven fields", enc(append(valid(), 0)...)},
		{"type above 255", with(0, 256)},
		{"length above 32 bits", with(6, uint64(1)<<32)},
		{"status above 16 bits", with(8, 1<<16)},
		{"volume too long", with(1, strings.Repeat("x", MaxVolumeLen+1))},
		{"volume a number", with(1, 5)},
		{"five aux fields", with(9, []uint64{1, 2, 3, 4, 5})},
		{"a float", with(3, 1.5)},
		{"trailing bytes", append(enc(valid()...), 0)},
		{"truncated", enc(valid()...)[:5]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Header
			before := Header{Seq: 42}
			h = before
			err := newFrameCodec().decodeHeader(tc.b, &h)
			if !errors.Is(err, errFrame) {
				t.Errorf("decode %x: %v, want a malformed frame", tc.b, err)
			}
			if h != before {
				t.Errorf("failed decode changed the header to %+v", h)
			}
		})
	}
}

// TestDecodeAllocs: decoding a frame header allocates nothing once the
// volume name has been seen.
func TestDecodeAllocs(t *testing.T) {
	c := newFrameCodec()
	h := sampleHeaders[1]
	frame, err := c.encode(9, &h, 4096)
	if err != nil {
		t.Fatal(err)
	}
	frame = bytes.Clone(frame)
	var r bytes.Reader
	var got Header
	allocs := testing.AllocsPerRun(1000, func() {
		r.Reset(frame)
		if _, _, err := c.readHeader(&r, &got, 1<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := c.encode(9, &got, 4096); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 || got != h {
		t.Errorf("%v allocations per decode and encode, header %+v", allocs, got)
	}
}

func TestPayloadBuffers(t *testing.T) {
	for _, tc := range []struct{ n, capacity int }{
		{0, 4096}, {1, 4096}, {4096, 4096}, {4097, 8192}, {1 << 20, 1 << 20}, {1<<20 + 1, 2 << 20}, {maxPayloadLimit, maxPayloadLimit},
	} {
		p := getPayload(tc.n)
		if len(p.b) != tc.n || cap(p.b) != tc.capacity {
			t.Errorf("getPayload(%d): len %d cap %d, want cap %d", tc.n, len(p.b), cap(p.b), tc.capacity)
		}
		putPayload(p)
	}
}

// fuzzMaxPayload is the payload limit under fuzzing: small enough that a
// frame announcing more is refused before anything is read.
const fuzzMaxPayload = 1 << 16

func frameSeeds(t testing.TB) [][]byte {
	c := newFrameCodec()
	var seeds [][]byte
	for i, h := range sampleHeaders {
		payload := bytes.Repeat([]byte{byte(i)}, i*100)
		b, err := c.encode(uint64(i)<<16|uint64(i), &h, len(payload))
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, append(bytes.Clone(b), payload...))
	}
	prefix := func(hlen, plen uint32, id uint64) []byte {
		b := binary.BigEndian.AppendUint32(nil, hlen)
		b = binary.BigEndian.AppendUint32(b, plen)
		return binary.BigEndian.AppendUint64(b, id)
	}
	return append(seeds,
		prefix(0, 0, 0),
		prefix(maxHeaderLen+1, 0, 1),
		append(prefix(1, math.MaxUint32, 1), 0x90),
		append(prefix(1, 0, 1), 0xc1),
		append(prefix(3, 0, 1), 0xdd, 0xff, 0xff), // an array of 2^32-1 elements, truncated
		append(prefix(12, 10, 1), 0x9a, 0x01, 0xdb, 0xff, 0xff, 0xff, 0xff, 'v', 'o', 'l', 0, 0), // a 4 GiB string
		seeds[1][:20],
	)
}

var writeSeeds = flag.Bool("write-seeds", false, "rewrite testdata/fuzz/FuzzFrame from frameSeeds")

// TestWriteFuzzSeeds keeps the committed corpus in step with frameSeeds
// when run with -write-seeds.
func TestWriteFuzzSeeds(t *testing.T) {
	if !*writeSeeds {
		t.Skip("run with -write-seeds to rewrite the corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzFrame")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range frameSeeds(t) {
		data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzFrame: any input either fails to decode or decodes to a header and
// payload whose re-encoding decodes to the same; nothing panics, and
// decoding allocates at most a volume name and an error, never what a
// length in the input asks for.
func FuzzFrame(f *testing.F) {
	for _, s := range frameSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c := newFrameCodec()
		var h Header
		r := bytes.NewReader(data)
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		before := ms.TotalAlloc
		id, n, err := c.readHeader(r, &h, fuzzMaxPayload)
		runtime.ReadMemStats(&ms)
		if grew := ms.TotalAlloc - before; grew > 64<<10 {
			t.Fatalf("decoding allocated %d bytes", grew)
		}
		if err != nil {
			if !errors.Is(err, errFrame) && !errors.Is(err, errTooLarge) && err != io.EOF && err != io.ErrUnexpectedEOF {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if n > fuzzMaxPayload || len(h.Volume) > MaxVolumeLen {
			t.Fatalf("payload %d, volume of %d bytes: beyond the bounds", n, len(h.Volume))
		}
		payload := getPayload(n)
		defer putPayload(payload)
		if _, err := io.ReadFull(r, payload.b); err != nil {
			return // truncated payload
		}
		frame, err := c.encode(id, &h, n)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", h, err)
		}
		frame = append(bytes.Clone(frame), payload.b...)
		var h2 Header
		r2 := bytes.NewReader(frame)
		id2, n2, err := newFrameCodec().readHeader(r2, &h2, fuzzMaxPayload)
		if err != nil || id2 != id || n2 != n || h2 != h {
			t.Fatalf("re-encoded frame decodes to id %d, %d bytes, %+v, %v; want id %d, %d bytes, %+v", id2, n2, h2, err, id, n, h)
		}
		if rest, _ := io.ReadAll(r2); !bytes.Equal(rest, payload.b) {
			t.Fatal("re-encoded payload differs")
		}
	})
}

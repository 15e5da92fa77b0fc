package ublk

import (
	"encoding/binary"
	"errors"
	"syscall"
	"testing"

	"github.com/blockd/blockd/pipeline"
)

const (
	testSize  = 1 << 30
	testMaxIO = 512 << 10
)

func TestDecodeTable(t *testing.T) {
	buf := make([]byte, testMaxIO)
	for _, tc := range []struct {
		name    string
		d       ioDesc
		wantErr error
		want    pipeline.Request
	}{
		{"read", ioDesc{OpFlags: opRead, NrSectors: 8, StartSector: 16}, nil,
			pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: 4096}},
		{"write fua", ioDesc{OpFlags: opWrite | ioFlagFUA, NrSectors: 1024, StartSector: 0}, nil,
			pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Offset: 0, Length: testMaxIO}},
		{"write at the last sector", ioDesc{OpFlags: opWrite, NrSectors: 8, StartSector: testSize/512 - 8}, nil,
			pipeline.Request{Op: pipeline.OpWrite, Offset: testSize - 4096, Length: 4096}},
		{"flush ignores junk range", ioDesc{OpFlags: opFlush, NrSectors: 0xffffffff, StartSector: 1 << 60}, nil,
			pipeline.Request{Op: pipeline.OpFlush}},
		{"discard", ioDesc{OpFlags: opDiscard, NrSectors: 1 << 20, StartSector: 0}, nil,
			pipeline.Request{Op: pipeline.OpTrim, Length: 512 << 20}},
		{"write zeroes unmap", ioDesc{OpFlags: opWriteZeroes, NrSectors: 8, StartSector: 8}, nil,
			pipeline.Request{Op: pipeline.OpWriteZeroes, Offset: 4096, Length: 4096}},
		{"write zeroes nounmap", ioDesc{OpFlags: opWriteZeroes | ioFlagNoUnmap, NrSectors: 8}, nil,
			pipeline.Request{Op: pipeline.OpWriteZeroes, Flags: pipeline.FlagNoHole, Length: 4096}},
		{"write same unsupported", ioDesc{OpFlags: opWriteSame, NrSectors: 8}, pipeline.ErrNotSupported, pipeline.Request{}},
		{"zone op unsupported", ioDesc{OpFlags: 13, NrSectors: 8}, pipeline.ErrNotSupported, pipeline.Request{}},
		{"bad op 0xff", ioDesc{OpFlags: 0xff, NrSectors: 8}, pipeline.ErrNotSupported, pipeline.Request{}},
		{"read past end", ioDesc{OpFlags: opRead, NrSectors: 16, StartSector: testSize/512 - 8}, pipeline.ErrOutOfRange, pipeline.Request{}},
		{"start past end", ioDesc{OpFlags: opRead, NrSectors: 8, StartSector: testSize / 512}, pipeline.ErrOutOfRange, pipeline.Request{}},
		{"start overflows int64", ioDesc{OpFlags: opWrite, NrSectors: 8, StartSector: 1<<64 - 1}, pipeline.ErrOutOfRange, pipeline.Request{}},
		{"read larger than the buffer", ioDesc{OpFlags: opRead, NrSectors: testMaxIO/512 + 8}, pipeline.ErrTooLarge, pipeline.Request{}},
		{"read of 1 GiB", ioDesc{OpFlags: opRead, NrSectors: 1 << 21}, pipeline.ErrTooLarge, pipeline.Request{}},
		{"zero-length write", ioDesc{OpFlags: opWrite}, pipeline.ErrMisaligned, pipeline.Request{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r pipeline.Request
			err := decode(&tc.d, testSize, buf, &r)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				if res := result(&r, err); res >= 0 {
					t.Fatalf("error result %d is not a negative errno", res)
				}
				return
			}
			if r.Op != tc.want.Op || r.Flags != tc.want.Flags || r.Offset != tc.want.Offset || r.Length != tc.want.Length {
				t.Fatalf("got %+v, want %+v", r, tc.want)
			}
			if r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite {
				if len(r.Buf) != int(r.Length) || &r.Buf[0] != &buf[0] {
					t.Fatalf("buf len %d for length %d", len(r.Buf), r.Length)
				}
			} else if r.Buf != nil {
				t.Fatalf("%v request has a buffer", r.Op)
			}
		})
	}
}

func TestResult(t *testing.T) {
	rd := &pipeline.Request{Op: pipeline.OpRead, Length: 4096}
	if got := result(rd, nil); got != 4096 {
		t.Fatalf("read result %d", got)
	}
	fl := &pipeline.Request{Op: pipeline.OpFlush}
	if got := result(fl, nil); got != 0 {
		t.Fatalf("flush result %d", got)
	}
	if got := result(rd, pipeline.ErrNoSpace); got != -int32(syscall.ENOSPC) {
		t.Fatalf("ENOSPC result %d", got)
	}
	if got := result(rd, errors.New("disk on fire")); got != -int32(syscall.EIO) {
		t.Fatalf("unknown error result %d", got)
	}
}

// FuzzDecode feeds arbitrary descriptor bytes: decode must never panic,
// and what it accepts must lie inside the device and the buffer.
func FuzzDecode(f *testing.F) {
	seed := func(op, n uint32, start uint64) []byte {
		b := make([]byte, ioDescSize)
		binary.LittleEndian.PutUint32(b[0:], op)
		binary.LittleEndian.PutUint32(b[4:], n)
		binary.LittleEndian.PutUint64(b[8:], start)
		return b
	}
	f.Add(seed(opRead, 8, 0))
	f.Add(seed(opWrite|ioFlagFUA, 1024, 100))
	f.Add(seed(opDiscard, 0xffffffff, 1<<63))
	f.Add(seed(0xfe, 1, 1))
	buf := make([]byte, testMaxIO)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < ioDescSize {
			return
		}
		var d ioDesc
		d.get(b)
		var r pipeline.Request
		err := decode(&d, testSize, buf, &r)
		if err != nil {
			if result(&r, err) >= 0 {
				t.Fatalf("error %v gave non-negative result", err)
			}
			return
		}
		if r.Offset < 0 || r.End() > testSize {
			t.Fatalf("accepted out-of-range %+v", r)
		}
		if (r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite) && len(r.Buf) != int(r.Length) {
			t.Fatalf("buffer %d for %+v", len(r.Buf), r)
		}
	})
}

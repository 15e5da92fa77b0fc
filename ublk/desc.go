package ublk

import (
	"github.com/blockd/blockd/pipeline"
)

const sectorShift = 9

// decode turns the kernel's descriptor d into r. buf is the tag's data
// buffer (its length is the device's maximum request size); size is the
// device size in bytes. Every field of d is checked, since a descriptor we
// misread must cost one failed request, never a crash or a wild access.
func decode(d *ioDesc, size int64, buf []byte, r *pipeline.Request) error {
	*r = pipeline.Request{}
	op := d.OpFlags & 0xff
	flags := d.OpFlags >> 8 << 8
	switch op {
	case opRead:
		r.Op = pipeline.OpRead
	case opWrite:
		r.Op = pipeline.OpWrite
	case opFlush:
		r.Op = pipeline.OpFlush
		return nil
	case opDiscard:
		r.Op = pipeline.OpTrim
	case opWriteZeroes:
		r.Op = pipeline.OpWriteZeroes
		if flags&ioFlagNoUnmap != 0 {
			r.Flags |= pipeline.FlagNoHole
		}
	default:
		return pipeline.ErrNotSupported
	}
	if flags&ioFlagFUA != 0 {
		r.Flags |= pipeline.FlagFUA
	}
	length := uint64(d.NrSectors) << sectorShift
	if d.StartSector > uint64(size)>>sectorShift {
		return pipeline.ErrOutOfRange
	}
	off := d.StartSector << sectorShift
	if off+length > uint64(size) {
		return pipeline.ErrOutOfRange
	}
	if length == 0 {
		return pipeline.ErrMisaligned
	}
	if length > 1<<32-1 {
		return pipeline.ErrTooLarge
	}
	r.Offset = int64(off)
	r.Length = uint32(length)
	if r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite {
		if length > uint64(len(buf)) {
			return pipeline.ErrTooLarge
		}
		r.Buf = buf[:length]
	}
	return nil
}

// result is the value committed for a request: the byte count for reads
// and writes (the kernel requeues a read/write completed with 0 bytes), 0
// for other ops, a negative errno on failure.
func result(r *pipeline.Request, err error) int32 {
	if err != nil {
		return -int32(pipeline.Errno(err))
	}
	if r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite {
		return int32(r.Length)
	}
	return 0
}

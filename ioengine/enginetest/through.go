package enginetest

import (
	"context"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// Through is an Engine whose reads, writes, flushes, trims and zeroing go
// through a pipeline Handler that ends in E (a stage wrapped around
// ioengine.Handler(E)), so that the suite runs against the stage. Size,
// Resize, Close and Map are E's.
type Through struct {
	ioengine.Engine
	H pipeline.Handler
	// Ref: reads offer to be answered by reference (pipeline.FlagRef,
	// with room for as many slices as the NBD server gives), and what
	// comes back by reference is copied into the caller's buffer.
	Ref bool
}

func (s *Through) do(op pipeline.Op, flags pipeline.Flags, p []byte, off, n int64) error {
	r := pipeline.Request{Op: op, Flags: flags, Offset: off, Length: uint32(n), Buf: p}
	return s.H.Handle(context.Background(), &r)
}

// ReadAt implements ioengine.Engine.
func (s *Through) ReadAt(p []byte, off int64) (int, error) {
	if s.Ref {
		r := pipeline.Request{Op: pipeline.OpRead, Flags: pipeline.FlagRef, Offset: off, Length: uint32(len(p)), Buf: p,
			Ref: make([][]byte, 0, len(p)>>20+2)}
		if err := s.H.Handle(context.Background(), &r); err != nil {
			return 0, err
		}
		n := 0
		for _, q := range r.Ref {
			n += copy(p[n:], q)
		}
		return len(p), nil
	}
	if err := s.do(pipeline.OpRead, 0, p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements ioengine.Engine.
func (s *Through) WriteAt(p []byte, off int64) (int, error) {
	if err := s.do(pipeline.OpWrite, 0, p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush implements ioengine.Engine.
func (s *Through) Flush() error { return s.do(pipeline.OpFlush, 0, nil, 0, 0) }

// Trim implements ioengine.Engine.
func (s *Through) Trim(off, n int64) error { return s.do(pipeline.OpTrim, 0, nil, off, n) }

// WriteZeroes implements ioengine.Engine.
func (s *Through) WriteZeroes(off, n int64, noHole bool) error {
	var f pipeline.Flags
	if noHole {
		f = pipeline.FlagNoHole
	}
	return s.do(pipeline.OpWriteZeroes, f, nil, off, n)
}

// Map is E's map, when E has one.
func (s *Through) Map(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
	if m, ok := s.Engine.(pipeline.Mapper); ok {
		return m.Map(dst, off, n)
	}
	dst, _ = pipeline.AppendExtent(dst, n, false)
	return dst, nil
}

package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
)

// A frame is a 16-byte prefix, the msgpack Header, then the raw payload:
//
//	offset 0  u32 big endian  header length, 1..maxHeaderLen
//	offset 4  u32 big endian  payload length, 0..MaxPayload
//	offset 8  u64 big endian  call id
//	offset 16 header, then payload
//
// A response carries the id of its request; ids are never 0.
const prefixLen = 16

var (
	errFrame    = errors.New("malformed frame")
	errTooLarge = errors.New("frame too large")
)

// frameCodec encodes and decodes frames for one goroutine at a time. It
// keeps every buffer it needs, so that in steady state neither direction
// allocates; only a volume name it has not seen recently costs a string.
type frameCodec struct {
	enc  *msgpack.Encoder
	out  appendWriter
	dec  *msgpack.Decoder
	in   bytes.Reader
	buf  [prefixLen + maxHeaderLen]byte
	name [MaxVolumeLen]byte

	// recent volume names, so that decoding reuses a string instead of
	// allocating one per message
	names [8]string
	next  int
}

// appendWriter is the msgpack.Encoder's writer: it appends to b and never
// fails.
type appendWriter struct{ b []byte }

func (w *appendWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	return len(p), nil
}

func (w *appendWriter) WriteByte(c byte) error {
	w.b = append(w.b, c)
	return nil
}

var codecs = sync.Pool{New: func() any { return newFrameCodec() }}

func newFrameCodec() *frameCodec {
	c := &frameCodec{}
	c.out.b = make([]byte, 0, prefixLen+maxHeaderLen+coalesceMax)
	c.enc = msgpack.NewEncoder(&c.out)
	c.dec = msgpack.NewDecoder(&c.in)
	return c
}

func getCodec() *frameCodec  { return codecs.Get().(*frameCodec) }
func putCodec(c *frameCodec) { codecs.Put(c) }

// encode encodes the prefix and h of a frame with a payload of
// payloadLen bytes. The result is valid until the next call.
func (c *frameCodec) encode(id uint64, h *Header, payloadLen int) ([]byte, error) {
	c.out.b = append(c.out.b[:0], make([]byte, prefixLen)...)
	if err := h.EncodeMsgpack(c.enc); err != nil {
		return nil, err
	}
	b := c.out.b
	hlen := len(b) - prefixLen
	if hlen > maxHeaderLen {
		return nil, fmt.Errorf("encode header of %d bytes: %w", hlen, errTooLarge)
	}
	binary.BigEndian.PutUint32(b[0:], uint32(hlen))
	binary.BigEndian.PutUint32(b[4:], uint32(payloadLen))
	binary.BigEndian.PutUint64(b[8:], id)
	return b, nil
}

// coalesceMax is the largest payload that encode's buffer takes in (see
// writeFrame).
const coalesceMax = 16 << 10

// appendPayload appends p to the frame that encode returned and returns
// the whole.
func (c *frameCodec) appendPayload(p []byte) []byte {
	c.out.b = append(c.out.b, p...)
	return c.out.b
}

// readHeader reads a frame's prefix and header from r into h and returns
// the call id and the payload length, which the caller reads next. A
// stream that ends cleanly before the frame returns io.EOF; one that ends
// inside it returns io.ErrUnexpectedEOF. Nothing it reads can make it
// allocate: both lengths are checked before anything is read.
func (c *frameCodec) readHeader(r io.Reader, h *Header, maxPayload int) (id uint64, payloadLen int, err error) {
	p := c.buf[:prefixLen]
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, 0, err
	}
	hlen := binary.BigEndian.Uint32(p[0:])
	plen := binary.BigEndian.Uint32(p[4:])
	id = binary.BigEndian.Uint64(p[8:])
	if hlen == 0 || hlen > maxHeaderLen {
		return 0, 0, fmt.Errorf("header length %d: %w", hlen, errFrame)
	}
	if uint64(plen) > uint64(maxPayload) {
		return 0, 0, fmt.Errorf("payload of %d bytes, limit %d: %w", plen, maxPayload, errTooLarge)
	}
	hb := c.buf[prefixLen : prefixLen+hlen]
	if _, err := io.ReadFull(r, hb); err != nil {
		return 0, 0, noEOF(err)
	}
	if err := c.decodeHeader(hb, h); err != nil {
		return 0, 0, err
	}
	return id, int(plen), nil
}

// decodeHeader decodes exactly b into h; on error h is unchanged.
func (c *frameCodec) decodeHeader(b []byte, h *Header) error {
	c.in.Reset(b)
	var v Header
	vol, err := decodeHeader(c.dec, &v, c.name[:])
	if err != nil {
		if !errors.Is(err, errHeader) {
			err = fmt.Errorf("%w: %w", errHeader, err)
		}
		return fmt.Errorf("%w: %w", errFrame, err)
	}
	if c.in.Len() != 0 {
		return fmt.Errorf("%d bytes after the header: %w", c.in.Len(), errFrame)
	}
	v.Volume = c.intern(vol)
	*h = v
	return nil
}

func (c *frameCodec) intern(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	for _, s := range c.names {
		if s == string(b) {
			return s
		}
	}
	s := string(b)
	c.names[c.next] = s
	c.next = (c.next + 1) % len(c.names)
	return s
}

// noEOF turns io.EOF into io.ErrUnexpectedEOF: the stream ended inside a
// frame.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Payload buffers. Requests are read into buffers of power-of-two classes
// from 4 KiB to maxPayloadLimit, each class its own sync.Pool, so a 4 KiB
// write never holds a 32 MiB buffer and the steady state allocates nothing.
const (
	minBufShift     = 12
	maxBufShift     = 26
	maxPayloadLimit = 1 << maxBufShift // the largest Config.MaxPayload
)

type payloadBuf struct {
	b     []byte
	class int
}

var payloadPools [maxBufShift - minBufShift + 1]sync.Pool

// getPayload returns a buffer of n bytes (n <= maxPayloadLimit), to be
// returned with putPayload.
func getPayload(n int) *payloadBuf {
	class := 0
	if n > 1<<minBufShift {
		class = bits.Len(uint(n-1)) - minBufShift
	}
	p, _ := payloadPools[class].Get().(*payloadBuf)
	if p == nil {
		p = &payloadBuf{b: make([]byte, 1<<(class+minBufShift)), class: class}
	}
	p.b = p.b[:n]
	return p
}

func putPayload(p *payloadBuf) {
	p.b = p.b[:cap(p.b)]
	payloadPools[p.class].Put(p)
}

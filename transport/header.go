package transport

import (
	"errors"
	"fmt"
	"math"

	"github.com/vmihailenco/msgpack/v5"
)

// Header is the msgpack-encoded part of every request and response. The
// transport interprets only Type (its own TypePing) and, in responses,
// Status; every other field belongs to the layer above (replication), which
// defines the message types and what each field means for them.
//
// On the wire a Header is a msgpack array of exactly headerFields elements
// in the field order below, integers in their shortest msgpack form and Aux
// as a nested array of 0 to len(Aux) integers (trailing zeros omitted). A
// different layout is a different protocol: it gets a new ALPN, never a
// longer array that old peers would have to skip.
type Header struct {
	Type   uint8     // message type; TypePing is the transport's own
	Volume string    // volume name, at most MaxVolumeLen bytes
	Epoch  uint64    // owner epoch (fencing), carried as is
	Seq    uint64    // sequence number
	Gen    uint64    // generation
	Offset int64     // byte offset
	Length uint32    // byte length (not necessarily the payload length)
	Flags  uint32    // message-type specific flags
	Status uint16    // responses: StatusOK, or a numeric code; never text
	Aux    [4]uint64 // spare fields, e.g. a bitmap range or a checksum
}

// TypePing is answered by the transport itself (an empty response with
// StatusOK) and never reaches a Handler; see Transport.Ping.
const TypePing uint8 = 0xff

// Response status codes. Codes below StatusTransportBase are the
// replication layer's to define; the transport sets the codes from
// StatusTransportBase up itself.
const (
	StatusOK            uint16 = 0
	StatusTransportBase uint16 = 0xff00
	// StatusHandlerError: the Handler returned an error and left Status 0.
	StatusHandlerError uint16 = 0xff01
)

// MaxVolumeLen bounds Header.Volume (volume names are at most 63 bytes).
const MaxVolumeLen = 255

// maxHeaderLen bounds an encoded Header. The largest valid one is about
// 330 bytes (a 255-byte volume name and every integer at 9 bytes).
const maxHeaderLen = 1024

const headerFields = 10

var errHeader = errors.New("malformed header")

// EncodeMsgpack implements msgpack.CustomEncoder.
func (h *Header) EncodeMsgpack(e *msgpack.Encoder) error {
	if len(h.Volume) > MaxVolumeLen {
		return fmt.Errorf("encode header: volume name of %d bytes: %w", len(h.Volume), errHeader)
	}
	naux := len(h.Aux)
	for naux > 0 && h.Aux[naux-1] == 0 {
		naux--
	}
	err := e.EncodeArrayLen(headerFields)
	put := func(v uint64) {
		if err == nil {
			err = e.EncodeUint(v)
		}
	}
	put(uint64(h.Type))
	if err == nil {
		err = e.EncodeString(h.Volume)
	}
	put(h.Epoch)
	put(h.Seq)
	put(h.Gen)
	if err == nil {
		err = e.EncodeInt(h.Offset)
	}
	put(uint64(h.Length))
	put(uint64(h.Flags))
	put(uint64(h.Status))
	if err == nil {
		err = e.EncodeArrayLen(naux)
	}
	for _, v := range h.Aux[:naux] {
		put(v)
	}
	return err
}

// DecodeMsgpack implements msgpack.CustomDecoder. It allocates a string
// for Volume; the transport's own decoder (headerDecoder) does not.
func (h *Header) DecodeMsgpack(d *msgpack.Decoder) error {
	var name [MaxVolumeLen]byte
	v, err := decodeHeader(d, h, name[:])
	if err != nil {
		return err
	}
	h.Volume = string(v)
	return nil
}

// decodeHeader decodes every field but Volume into h and returns the volume
// name's bytes, read into scratch (len(scratch) >= MaxVolumeLen). It reads
// nothing beyond the header, allocates nothing once d's internal buffer has
// grown to 8 bytes, and rejects what EncodeMsgpack would not produce: an
// array of another length, a narrow field out of its range, a volume name
// or an Aux array too long. On error h is unchanged.
func decodeHeader(d *msgpack.Decoder, h *Header, scratch []byte) ([]byte, error) {
	x := fieldDecoder{d: d}
	if n := x.arrayLen(); x.err == nil && n != headerFields {
		return nil, fmt.Errorf("header of %d fields, want %d: %w", n, headerFields, errHeader)
	}
	var v Header
	v.Type = uint8(x.uint(math.MaxUint8))
	vol := x.bytes(scratch[:MaxVolumeLen])
	v.Epoch = x.uint(math.MaxUint64)
	v.Seq = x.uint(math.MaxUint64)
	v.Gen = x.uint(math.MaxUint64)
	if x.err == nil {
		v.Offset, x.err = d.DecodeInt64()
	}
	v.Length = uint32(x.uint(math.MaxUint32))
	v.Flags = uint32(x.uint(math.MaxUint32))
	v.Status = uint16(x.uint(math.MaxUint16))
	if n := x.arrayLen(); x.err == nil && n > len(v.Aux) {
		return nil, fmt.Errorf("aux of %d fields: %w", n, errHeader)
	} else {
		for i := range max(n, 0) {
			v.Aux[i] = x.uint(math.MaxUint64)
		}
	}
	if x.err != nil {
		return nil, x.err
	}
	*h = v
	return vol, nil
}

// fieldDecoder reads header fields with a sticky error: after the first
// failure every read returns zero.
type fieldDecoder struct {
	d   *msgpack.Decoder
	err error
}

func (x *fieldDecoder) arrayLen() int {
	if x.err != nil {
		return 0
	}
	var n int
	n, x.err = x.d.DecodeArrayLen()
	return n
}

func (x *fieldDecoder) uint(limit uint64) uint64 {
	if x.err != nil {
		return 0
	}
	var v uint64
	if v, x.err = x.d.DecodeUint64(); x.err == nil && v > limit {
		x.err = fmt.Errorf("header field %d above %d: %w", v, limit, errHeader)
	}
	return v
}

// bytes reads a string (or nil, as empty) of at most len(buf) bytes into buf.
func (x *fieldDecoder) bytes(buf []byte) []byte {
	if x.err != nil {
		return nil
	}
	var n int
	if n, x.err = x.d.DecodeBytesLen(); x.err != nil {
		return nil
	}
	if n > len(buf) {
		x.err = fmt.Errorf("string of %d bytes in header: %w", n, errHeader)
		return nil
	}
	b := buf[:max(n, 0)]
	x.err = x.d.ReadFull(b)
	return b
}

package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Bounds that keep a hostile client from making the server allocate or loop
// without limit during option haggling.
const (
	maxOptLen     = 64 << 10 // largest option payload read into memory
	maxSkipOptLen = 1 << 20  // larger ones up to this are skipped, then refused
	maxOptions    = 1024     // options per connection before a hard disconnect
	maxNameLen    = 4096     // proto.md: strings MUST be no longer than 4096 bytes
	maxErrMsgLen  = 256
)

var (
	errAbort    = errors.New("client aborted negotiation")
	errBadMagic = errors.New("bad magic")
)

// handshake runs fixed-newstyle option haggling and returns the export the
// client chose. A nil export with a nil error never happens.
func (c *conn) handshake() (Export, error) {
	s := c.srv
	c.nc.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	defer c.nc.SetDeadline(time.Time{})
	if c.stopping.Load() {
		return nil, ErrServerClosed
	}

	bw := bufio.NewWriterSize(c.nc, 4096)
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	bw.Write(b[:])
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, fmt.Errorf("handshake: client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		return nil, fmt.Errorf("handshake: unknown client flags %#x", cflags)
	}
	noZeroes := cflags&clientNoZeroes != 0

	h := handshaker{c: c, bw: bw}
	for i := 0; i < maxOptions; i++ {
		var hdr [16]byte
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return nil, fmt.Errorf("handshake: option header: %w", err)
		}
		if binary.BigEndian.Uint64(hdr[0:]) != optMagic {
			return nil, fmt.Errorf("handshake: %w", errBadMagic)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		n := binary.BigEndian.Uint32(hdr[12:])
		if n > maxOptLen {
			if opt == optExportName || n > maxSkipOptLen {
				return nil, fmt.Errorf("handshake: option %d length %d too large", opt, n)
			}
			if _, err := c.br.Discard(int(n)); err != nil {
				return nil, fmt.Errorf("handshake: %w", err)
			}
			if err := h.reply(opt, repErrTooBig, nil); err != nil {
				return nil, err
			}
			continue
		}
		data := h.buf(int(n))
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("handshake: option %d data: %w", opt, err)
		}
		if s.shutting.Load() && opt != optAbort {
			if opt == optExportName {
				return nil, ErrServerClosed
			}
			if err := h.reply(opt, repErrShut, nil); err != nil {
				return nil, err
			}
			continue
		}
		e, err := h.option(opt, data, noZeroes)
		if err != nil || e != nil {
			return e, err
		}
	}
	return nil, fmt.Errorf("handshake: more than %d options", maxOptions)
}

type handshaker struct {
	c       *conn
	bw      *bufio.Writer
	scratch []byte
}

func (h *handshaker) buf(n int) []byte {
	if cap(h.scratch) < n {
		h.scratch = make([]byte, n)
	}
	return h.scratch[:n]
}

// option handles one option; it returns a non-nil Export when the client
// enters transmission.
func (h *handshaker) option(opt uint32, data []byte, noZeroes bool) (Export, error) {
	c := h.c
	switch opt {
	case optExportName:
		e, err := c.srv.acquire(string(data))
		if err != nil {
			// The spec leaves no way to refuse EXPORT_NAME but closing.
			return nil, fmt.Errorf("handshake: export %q: %w", data, err)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(e.Size()))
		binary.BigEndian.PutUint16(b[8:], c.transmissionFlags(e))
		out := b[:]
		if noZeroes {
			out = b[:10]
		}
		h.bw.Write(out)
		if err := h.bw.Flush(); err != nil {
			return nil, fmt.Errorf("handshake: %w", err)
		}
		return e, nil

	case optAbort:
		// Best effort: the client may already have gone.
		h.reply(opt, repAck, nil)
		return nil, errAbort

	case optList:
		if len(data) != 0 {
			return nil, h.replyErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, name := range c.srv.exps.ExportNames() {
			// The description follows the name, for humans (nbdinfo
			// --list shows it).
			var desc string
			if e, ok := c.srv.exps.Export(name); ok {
				desc = e.Description()
			}
			if len(desc) > maxNameLen {
				desc = desc[:maxNameLen]
			}
			p := make([]byte, 4, 4+len(name)+len(desc))
			binary.BigEndian.PutUint32(p, uint32(len(name)))
			p = append(append(p, name...), desc...)
			if err := h.send(opt, repServer, p); err != nil {
				return nil, err
			}
		}
		return nil, h.reply(opt, repAck, nil)

	case optStructuredReply:
		if len(data) != 0 {
			return nil, h.replyErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return nil, h.reply(opt, repAck, nil)

	case optInfo, optGo:
		return h.infoGo(opt, data, noZeroes)

	case optListMetaContext, optSetMetaContext:
		return nil, h.metaContext(opt, data)

	case optStartTLS:
		return nil, h.replyErr(opt, repErrUnsup, "TLS is not supported")
	}
	return nil, h.replyErr(opt, repErrUnsup, "option not supported")
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (h *handshaker) infoGo(opt uint32, data []byte, _ bool) (Export, error) {
	c := h.c
	if len(data) < 6 {
		return nil, h.replyErr(opt, repErrInvalid, "option too short")
	}
	nameLen := binary.BigEndian.Uint32(data)
	if nameLen > maxNameLen || uint64(nameLen)+6 > uint64(len(data)) {
		return nil, h.replyErr(opt, repErrInvalid, "bad name length")
	}
	name := data[4 : 4+nameLen]
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return nil, h.replyErr(opt, repErrInvalid, "bad information request count")
	}
	var e Export
	if a, ok := c.srv.exps.(Acquirer); ok && opt == optGo {
		var err error
		if e, err = a.Acquire(string(name)); err != nil {
			typ := uint32(repErrPolicy)
			if a.NotFound(err) {
				typ = repErrUnknown
			}
			msg := err.Error()
			if len(msg) > maxNameLen {
				msg = msg[:maxNameLen]
			}
			return nil, h.replyErr(opt, typ, msg)
		}
	} else if e, ok = c.srv.exps.Export(string(name)); !ok {
		return nil, h.replyErr(opt, repErrUnknown, "unknown export")
	}
	if opt == optGo && c.metaName != string(name) {
		c.metaAlloc = false // the selection was for another export
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	var p [18]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], uint64(e.Size()))
	binary.BigEndian.PutUint16(p[10:], c.transmissionFlags(e))
	if err := h.send(opt, repInfo, p[:12]); err != nil {
		return nil, err
	}
	if wantName {
		b := make([]byte, 2+len(name))
		binary.BigEndian.PutUint16(b, infoName)
		copy(b[2:], name)
		if err := h.send(opt, repInfo, b); err != nil {
			return nil, err
		}
	}
	if d := e.Description(); wantDesc && d != "" {
		if len(d) > maxNameLen {
			d = d[:maxNameLen]
		}
		b := make([]byte, 2+len(d))
		binary.BigEndian.PutUint16(b, infoDescription)
		copy(b[2:], d)
		if err := h.send(opt, repInfo, b); err != nil {
			return nil, err
		}
	}
	// Block sizes are always sent: the spec lets a server volunteer them
	// and clients that care (qemu, libnbd) honour them.
	minBS, prefBS, maxBS := c.blockSizes(e)
	binary.BigEndian.PutUint16(p[0:], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:], minBS)
	binary.BigEndian.PutUint32(p[6:], prefBS)
	binary.BigEndian.PutUint32(p[10:], maxBS)
	if err := h.send(opt, repInfo, p[:14]); err != nil {
		return nil, err
	}
	if err := h.reply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return e, nil
	}
	return nil, nil
}

// send queues one option reply without flushing.
func (h *handshaker) send(opt, typ uint32, data []byte) error {
	var b [20]byte
	binary.BigEndian.PutUint64(b[0:], repMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	h.bw.Write(b[:])
	_, err := h.bw.Write(data)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	return nil
}

// reply sends one option reply and flushes.
func (h *handshaker) reply(opt, typ uint32, data []byte) error {
	if err := h.send(opt, typ, data); err != nil {
		return err
	}
	if err := h.bw.Flush(); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	return nil
}

func (h *handshaker) replyErr(opt, typ uint32, msg string) error {
	return h.reply(opt, typ, []byte(msg))
}

// transmissionFlags are the flags sent for export e on this connection.
func (c *conn) transmissionFlags(e Export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendCache | tflagCanMultiConn)
	if e.ReadOnly() {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes
	}
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

// blockSizes returns the minimum, preferred and maximum block size for e.
func (c *conn) blockSizes(e Export) (minBS, prefBS, maxBS uint32) {
	minBS = e.MinBlockSize()
	if minBS == 0 {
		minBS = 1
	}
	prefBS = max(e.PreferredBlockSize(), minBS, 512)
	if prefBS < minBS {
		prefBS = minBS
	}
	maxBS = c.srv.opts.MaxPayload / minBS * minBS
	return minBS, prefBS, maxBS
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The server knows one context, base:allocation.
func (h *handshaker) metaContext(opt uint32, data []byte) error {
	c := h.c
	if !c.structured {
		return h.replyErr(opt, repErrInvalid, "structured replies not negotiated")
	}
	name, rest, ok := cutString(data)
	if !ok || len(rest) < 4 {
		return h.replyErr(opt, repErrInvalid, "malformed meta context request")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for range n {
		q, r, ok := cutString(rest)
		if !ok {
			return h.replyErr(opt, repErrInvalid, "malformed meta context query")
		}
		queries = append(queries, q)
		rest = r
	}
	if len(rest) != 0 {
		return h.replyErr(opt, repErrInvalid, "trailing bytes in meta context request")
	}
	if _, ok := c.srv.exps.Export(name); !ok {
		return h.replyErr(opt, repErrUnknown, "unknown export")
	}
	match := false
	for _, q := range queries {
		if q == metaBaseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	if opt == optSetMetaContext {
		c.metaAlloc, c.metaName = match, name
	}
	if match {
		id := uint32(0) // LIST: "reserved and SHOULD be set to zero"
		if opt == optSetMetaContext {
			id = metaIDBaseAllocation
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := h.send(opt, repMetaContext, append(p, metaBaseAllocation...)); err != nil {
			return err
		}
	}
	return h.reply(opt, repAck, nil)
}

// cutString splits a 32-bit length-prefixed string off b.
func cutString(b []byte) (string, []byte, bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(b)
	if n > maxNameLen || uint64(n) > uint64(len(b)-4) {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}

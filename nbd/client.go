package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// Client is a small NBD client: the fixed-newstyle handshake with
// NBD_OPT_GO and the transmission phase with simple replies, one request
// at a time. It is for tests, tools and checkers that need to speak NBD to
// a server from Go; the data path's clients are the kernel, qemu and
// libnbd. It is safe for concurrent use (requests are serialized).
type Client struct {
	nc     net.Conn
	br     *bufio.Reader
	size   int64
	tflags uint16

	mu     sync.Mutex // serializes requests
	cookie uint64
	hdr    [28]byte
}

// ReplyError is an error reply from the server: the request failed and the
// connection lives on.
type ReplyError struct{ Errno syscall.Errno }

func (e *ReplyError) Error() string { return "nbd server replied " + e.Errno.Error() }

// Is lets errors.Is(err, syscall.EIO) and the like match.
func (e *ReplyError) Is(target error) bool { return target == e.Errno }

// Dial connects to export on a server at addr (network "tcp" or "unix")
// and negotiates with NBD_OPT_GO. ctx bounds the dial and the handshake.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	c := &Client{nc: nc, br: bufio.NewReader(nc)}
	if err := c.handshake(export); err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", addr, err)
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

func (c *Client) handshake(export string) error {
	var b [18]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != optMagic {
		return errors.New("not a fixed-newstyle NBD server")
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	cflags := uint32(clientFixedNewstyle)
	if hflags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	// NBD_OPT_GO: name length, name, no information requests.
	opt := binary.BigEndian.AppendUint32(nil, cflags)
	opt = binary.BigEndian.AppendUint64(opt, optMagic)
	opt = binary.BigEndian.AppendUint32(opt, optGo)
	opt = binary.BigEndian.AppendUint32(opt, uint32(4+len(export)+2))
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(export)))
	opt = append(opt, export...)
	opt = binary.BigEndian.AppendUint16(opt, 0)
	if _, err := c.nc.Write(opt); err != nil {
		return err
	}
	for {
		var rh [20]byte
		if _, err := io.ReadFull(c.br, rh[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(rh[0:]) != repMagic {
			return errors.New("bad option reply magic")
		}
		typ := binary.BigEndian.Uint32(rh[12:])
		n := binary.BigEndian.Uint32(rh[16:])
		if n > 64<<10 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return err
		}
		switch {
		case typ == repAck:
			if c.tflags == 0 {
				return errors.New("server acknowledged NBD_OPT_GO without describing the export")
			}
			return nil
		case typ == repInfo && len(data) >= 12 && binary.BigEndian.Uint16(data) == infoExport:
			c.size = int64(binary.BigEndian.Uint64(data[2:]))
			c.tflags = binary.BigEndian.Uint16(data[10:])
		case typ&(1<<31) != 0:
			return fmt.Errorf("export %q refused (reply type %#x): %s", export, typ, data)
		}
	}
}

// Size is the export size the server announced.
func (c *Client) Size() int64 { return c.size }

// ReadOnly reports whether the server announced the export read-only.
func (c *Client) ReadOnly() bool { return c.tflags&tflagReadOnly != 0 }

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := c.do(cmdRead, 0, off, uint32(len(p)), nil, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.do(cmdWrite, 0, off, uint32(len(p)), p, nil); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteFUA writes p at off with NBD_CMD_FLAG_FUA: durable on reply.
func (c *Client) WriteFUA(p []byte, off int64) error {
	return c.do(cmdWrite, cmdFlagFUA, off, uint32(len(p)), p, nil)
}

// Flush makes every write replied to so far durable.
func (c *Client) Flush() error { return c.do(cmdFlush, 0, 0, 0, nil, nil) }

// Trim discards n bytes at off.
func (c *Client) Trim(off, n int64) error { return c.do(cmdTrim, 0, off, uint32(n), nil, nil) }

// WriteZeroes zeroes n bytes at off.
func (c *Client) WriteZeroes(off, n int64) error {
	return c.do(cmdWriteZeroes, 0, off, uint32(n), nil, nil)
}

func (c *Client) do(cmd, flags uint16, off int64, n uint32, payload, into []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cookie++
	h := c.hdr[:]
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], cmd)
	binary.BigEndian.PutUint64(h[8:], c.cookie)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], n)
	bufs := net.Buffers{h}
	if payload != nil {
		bufs = append(bufs, payload)
	}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		return err
	}
	var r [16]byte
	if _, err := io.ReadFull(c.br, r[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(r[0:]) != simpleMagic || binary.BigEndian.Uint64(r[8:]) != c.cookie {
		return errors.New("nbd: unexpected reply")
	}
	if e := binary.BigEndian.Uint32(r[4:]); e != 0 {
		return &ReplyError{Errno: syscall.Errno(e)}
	}
	if into != nil {
		if _, err := io.ReadFull(c.br, into); err != nil {
			return err
		}
	}
	return nil
}

// Close ends the session with NBD_CMD_DISC and closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[6:], cmdDisc)
	c.nc.Write(h[:]) // the server may be gone already; closing is what matters
	return c.nc.Close()
}

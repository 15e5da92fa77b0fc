// Package nbdnl drives the kernel NBD client (/dev/nbdN) over the "nbd"
// generic netlink family: it hands already-negotiated sockets to the kernel
// (NBD_CMD_CONNECT), swaps in fresh sockets after a server restart
// (NBD_CMD_RECONFIGURE), tears devices down (NBD_CMD_DISCONNECT) and asks
// whether they are connected (NBD_CMD_STATUS).
//
// The kernel does no handshake on these sockets: the server side must speak
// the transmission phase directly (simple replies only). Attribute numbers
// follow include/uapi/linux/nbd-netlink.h, which is ABI.
package nbdnl

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Server flags (transmission flags, NBD protocol) the kernel honours.
const (
	FlagHasFlags        uint64 = 1 << 0
	FlagReadOnly        uint64 = 1 << 1
	FlagSendFlush       uint64 = 1 << 2 // enables the kernel write cache
	FlagSendFUA         uint64 = 1 << 3
	FlagRotational      uint64 = 1 << 4
	FlagSendTrim        uint64 = 1 << 5
	FlagSendWriteZeroes uint64 = 1 << 6
	FlagCanMultiConn    uint64 = 1 << 8 // required for more than one socket

	// FlagsDefault is what a writable blockd volume advertises: flush/FUA
	// for durability, trim and write-zeroes, and multi-connection (one
	// hardware queue per socket).
	FlagsDefault = FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim |
		FlagSendWriteZeroes | FlagCanMultiConn
)

// Client flags (NBD_ATTR_CLIENT_FLAGS).
const (
	// ClientDestroyOnDisconnect removes the device when it disconnects.
	ClientDestroyOnDisconnect uint64 = 1 << 0
	// ClientDisconnectOnClose disconnects when the last opener closes it.
	ClientDisconnectOnClose uint64 = 1 << 1
)

// Generic netlink commands and attributes (nbd-netlink.h).
const (
	familyName    = "nbd"
	familyVersion = 1

	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdStatus      = 5

	attrIndex           = 1
	attrSizeBytes       = 2
	attrBlockSizeBytes  = 3
	attrTimeout         = 4
	attrServerFlags     = 5
	attrClientFlags     = 6
	attrSockets         = 7
	attrDeadConnTimeout = 8
	attrDeviceList      = 9
	attrBackendID       = 10

	sockItem = 1
	sockFD   = 1

	deviceItem      = 1
	deviceIndex     = 1
	deviceConnected = 2
)

// ErrNoFamily reports that the kernel has no "nbd" generic netlink family,
// i.e. the nbd module is not loaded.
var ErrNoFamily = errors.New("nbd generic netlink family not found (is the nbd module loaded?)")

// ErrNoDeadSocket reports that Reconfigure found no dead socket to replace
// (the kernel's ENOSPC): the old server's sockets are still alive, or the
// kernel has not yet noticed they died. A restarted server retries briefly.
var ErrNoDeadSocket = errors.New("no dead socket to replace")

// ErrNoDevice reports that no /dev/nbdN with the given index exists.
var ErrNoDevice = errors.New("no such nbd device")

// AnyIndex asks Connect for any free device.
const AnyIndex = -1

// Config describes a kernel NBD device for Connect.
type Config struct {
	// Index is the N of /dev/nbdN, or AnyIndex for the first free one.
	Index int
	// Socks are the connected sockets, one per hardware queue. More than
	// one requires FlagCanMultiConn. The kernel takes its own references:
	// the caller may close its copies after Connect returns.
	Socks []*os.File
	// SizeBytes is the device size.
	SizeBytes uint64
	// BlockSize is the logical block size (512..4096); 0 keeps the
	// kernel default.
	BlockSize uint64
	// ServerFlags are the transmission flags (Flag* constants).
	ServerFlags uint64
	// ClientFlags are Client* constants.
	ClientFlags uint64
	// Timeout is the per-request timeout (whole seconds, rounded up); 0
	// keeps the kernel default.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for Reconfigure after all
	// sockets died before it fails; 0 fails I/O at once.
	DeadConnTimeout time.Duration
	// BackendID is an opaque identifier shown in /sys/block/nbdN/backend
	// (kernel 5.16+), so a restarted daemon can find its devices.
	BackendID string
}

// DeviceStatus is one device as NBD_CMD_STATUS reports it.
type DeviceStatus struct {
	Index     int
	Connected bool
}

// SocketPair returns a connected AF_UNIX stream pair: kernel is for
// Config.Socks (blocking, as the kernel client expects; close it after
// Connect), server is for the NBD server and is non-blocking so the Go
// runtime polls it and Close interrupts a blocked Read.
func SocketPair() (kernel, server *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("nbd socketpair: %w", err)
	}
	if err := unix.SetNonblock(fds[1], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("nbd socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "nbd-kernel"), os.NewFile(uintptr(fds[1]), "nbd-server"), nil
}

// DevicePath returns the block device node for index.
func DevicePath(index int) string { return fmt.Sprintf("/dev/nbd%d", index) }

// Backend returns the BackendID a device was connected with, from
// /sys/block/nbdN/backend (empty when none was set). A restarted daemon
// uses it with List to find the devices it owns before Reconfigure.
func Backend(index int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", index))
	if err != nil {
		return "", fmt.Errorf("nbd backend %d: %w", index, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Client is a generic netlink connection to the nbd family. It is safe
// for concurrent use: requests are serialized, one reply at a time.
type Client struct {
	mu     sync.Mutex // serializes Execute so replies match requests
	c      *genetlink.Conn
	family genetlink.Family
}

// Dial opens a netlink connection and resolves the nbd family.
func Dial() (*Client, error) { return dialFamily(familyName) }

// dialFamily is Dial of the generic netlink family called name, so that
// tests can check the ErrNoFamily mapping with a family that cannot exist
// instead of asking the host for nbd (which may autoload the module).
func dialFamily(name string) (*Client, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink dial: %w", err)
	}
	f, err := c.GetFamily(name)
	if err != nil {
		c.Close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("nbd netlink dial: family %q: %w", name, ErrNoFamily)
		}
		return nil, fmt.Errorf("nbd netlink dial: get family %q: %w", name, err)
	}
	return &Client{c: c, family: f}, nil
}

// Close closes the netlink connection; devices stay as they are.
func (c *Client) Close() error { return c.c.Close() }

// Connect configures a device with cfg's sockets and returns its index.
func (c *Client) Connect(cfg Config) (int, error) {
	data, err := encodeConnect(cfg)
	if err != nil {
		return 0, fmt.Errorf("nbd connect: %w", err)
	}
	msgs, err := c.execute(cmdConnect, data)
	if err != nil {
		return 0, fmt.Errorf("nbd connect: %w", err)
	}
	for _, m := range msgs {
		idx, ok, err := decodeIndex(m.Data)
		if err != nil {
			return 0, fmt.Errorf("nbd connect: reply: %w", err)
		}
		if ok {
			return idx, nil
		}
	}
	if cfg.Index >= 0 {
		return cfg.Index, nil
	}
	return 0, errors.New("nbd connect: reply has no device index")
}

// Reconfigure hands new sockets to a connected device, replacing the dead
// ones (the kernel only swaps sockets it has marked dead, e.g. after the
// server process died). Zero durations and flags leave settings alone.
// A device connected with a BackendID needs ReconfigureBackend.
func (c *Client) Reconfigure(index int, socks []*os.File, timeout, deadConnTimeout time.Duration, clientFlags uint64) error {
	return c.ReconfigureBackend(index, "", socks, timeout, deadConnTimeout, clientFlags)
}

// ReconfigureBackend is Reconfigure for a device connected with a
// BackendID: the kernel refuses to reconfigure such a device ("must specify
// backend", EINVAL) unless the request carries the same identifier.
func (c *Client) ReconfigureBackend(index int, backendID string, socks []*os.File, timeout, deadConnTimeout time.Duration, clientFlags uint64) error {
	data, err := encodeReconfigure(index, backendID, socks, timeout, deadConnTimeout, clientFlags)
	if err != nil {
		return fmt.Errorf("nbd reconfigure %d: %w", index, err)
	}
	if _, err := c.execute(cmdReconfigure, data); err != nil {
		if errors.Is(err, unix.ENOSPC) {
			return fmt.Errorf("nbd reconfigure %d: %w: %w", index, ErrNoDeadSocket, err)
		}
		return fmt.Errorf("nbd reconfigure %d: %w", index, err)
	}
	return nil
}

func encodeReconfigure(index int, backendID string, socks []*os.File, timeout, deadConnTimeout time.Duration, clientFlags uint64) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	if backendID != "" {
		ae.String(attrBackendID, backendID)
	}
	if timeout > 0 {
		ae.Uint64(attrTimeout, seconds(timeout))
	}
	if deadConnTimeout > 0 {
		ae.Uint64(attrDeadConnTimeout, seconds(deadConnTimeout))
	}
	if clientFlags != 0 {
		ae.Uint64(attrClientFlags, clientFlags)
	}
	encodeSockets(ae, socks)
	return ae.Encode()
}

// Resize changes the size of a connected device to size bytes
// (NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES and no sockets): the
// kernel's nbd_genl_reconfigure applies the size through
// nbd_genl_size_set and tells the block layer, so a mounted filesystem
// can grow into it. backendID as for ReconfigureBackend.
func (c *Client) Resize(index int, backendID string, size uint64) error {
	data, err := encodeResize(index, backendID, size)
	if err != nil {
		return fmt.Errorf("nbd resize %d: %w", index, err)
	}
	if _, err := c.execute(cmdReconfigure, data); err != nil {
		return fmt.Errorf("nbd resize %d: %w", index, err)
	}
	return nil
}

func encodeResize(index int, backendID string, size uint64) ([]byte, error) {
	if size == 0 {
		return nil, errors.New("size 0")
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	if backendID != "" {
		ae.String(attrBackendID, backendID)
	}
	ae.Uint64(attrSizeBytes, size)
	return ae.Encode()
}

// Disconnect tears down the device's connections; queued and new I/O fail
// and the size drops to zero.
func (c *Client) Disconnect(index int) error {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	data, err := ae.Encode()
	if err != nil {
		return fmt.Errorf("nbd disconnect %d: %w", index, err)
	}
	if _, err := c.execute(cmdDisconnect, data); err != nil {
		return fmt.Errorf("nbd disconnect %d: %w", index, err)
	}
	return nil
}

// Status reports whether device index exists and is connected; a missing
// device is ErrNoDevice.
func (c *Client) Status(index int) (DeviceStatus, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(index))
	data, err := ae.Encode()
	if err != nil {
		return DeviceStatus{}, fmt.Errorf("nbd status %d: %w", index, err)
	}
	list, err := c.status(data)
	if err != nil {
		return DeviceStatus{}, fmt.Errorf("nbd status %d: %w", index, err)
	}
	for _, d := range list {
		if d.Index == index {
			return d, nil
		}
	}
	return DeviceStatus{}, fmt.Errorf("nbd status %d: %w", index, ErrNoDevice)
}

// List reports every nbd device the kernel has.
func (c *Client) List() ([]DeviceStatus, error) {
	list, err := c.status(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd status: %w", err)
	}
	return list, nil
}

func (c *Client) status(data []byte) ([]DeviceStatus, error) {
	msgs, err := c.execute(cmdStatus, data)
	if err != nil {
		return nil, err
	}
	var all []DeviceStatus
	for _, m := range msgs {
		l, err := decodeStatus(m.Data)
		if err != nil {
			return nil, err
		}
		all = append(all, l...)
	}
	return all, nil
}

// execute sends one command. CONNECT and STATUS answer with a message of
// their own; DISCONNECT and RECONFIGURE answer nothing unless asked for an
// ACK. Asking for an ACK on the former would leave a stray ACK queued
// behind the reply, so the flag depends on the command.
func (c *Client) execute(cmd uint8, data []byte) ([]genetlink.Message, error) {
	flags := netlink.Request
	if cmd == cmdDisconnect || cmd == cmdReconfigure {
		flags |= netlink.Acknowledge
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   data,
	}, c.family.ID, flags)
}

func encodeConnect(cfg Config) ([]byte, error) {
	if len(cfg.Socks) == 0 {
		return nil, errors.New("no sockets")
	}
	if len(cfg.Socks) > 1 && cfg.ServerFlags&FlagCanMultiConn == 0 {
		return nil, fmt.Errorf("%d sockets without FlagCanMultiConn", len(cfg.Socks))
	}
	if cfg.SizeBytes == 0 {
		return nil, errors.New("zero size")
	}
	ae := netlink.NewAttributeEncoder()
	if cfg.Index >= 0 {
		ae.Uint32(attrIndex, uint32(cfg.Index))
	}
	ae.Uint64(attrSizeBytes, cfg.SizeBytes)
	if cfg.BlockSize != 0 {
		ae.Uint64(attrBlockSizeBytes, cfg.BlockSize)
	}
	ae.Uint64(attrServerFlags, cfg.ServerFlags)
	if cfg.ClientFlags != 0 {
		ae.Uint64(attrClientFlags, cfg.ClientFlags)
	}
	if cfg.Timeout > 0 {
		ae.Uint64(attrTimeout, seconds(cfg.Timeout))
	}
	if cfg.DeadConnTimeout > 0 {
		ae.Uint64(attrDeadConnTimeout, seconds(cfg.DeadConnTimeout))
	}
	if cfg.BackendID != "" {
		ae.String(attrBackendID, cfg.BackendID)
	}
	encodeSockets(ae, cfg.Socks)
	return ae.Encode()
}

func encodeSockets(ae *netlink.AttributeEncoder, socks []*os.File) {
	if len(socks) == 0 {
		return
	}
	ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, s := range socks {
			// The kernel resolves the fd in the calling process; Fd keeps
			// it valid until s is closed.
			fd := uint32(s.Fd())
			nae.Nested(sockItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(sockFD, fd)
				return nil
			})
		}
		return nil
	})
}

func decodeIndex(b []byte) (int, bool, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, false, err
	}
	idx, ok := 0, false
	for ad.Next() {
		if ad.Type() == attrIndex {
			idx, ok = int(ad.Uint32()), true
		}
	}
	return idx, ok, ad.Err()
}

func decodeStatus(b []byte) ([]DeviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var list []DeviceStatus
	for ad.Next() {
		if ad.Type() != attrDeviceList {
			continue
		}
		ad.Nested(func(items *netlink.AttributeDecoder) error {
			for items.Next() {
				if items.Type() != deviceItem {
					continue
				}
				items.Nested(func(d *netlink.AttributeDecoder) error {
					var s DeviceStatus
					for d.Next() {
						switch d.Type() {
						case deviceIndex:
							s.Index = int(d.Uint32())
						case deviceConnected:
							s.Connected = d.Uint8() != 0
						}
					}
					list = append(list, s)
					return d.Err()
				})
			}
			return items.Err()
		})
	}
	return list, ad.Err()
}

// seconds rounds up: a sub-second timeout must not become "no timeout".
func seconds(d time.Duration) uint64 {
	return uint64((d + time.Second - 1) / time.Second)
}

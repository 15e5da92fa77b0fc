package nbdnl

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func socks(t *testing.T, n int) []*os.File {
	t.Helper()
	var fs []*os.File
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
		t.Cleanup(func() { a.Close(); b.Close() })
		fs = append(fs, a)
	}
	return fs
}

func TestEncodeConnect(t *testing.T) {
	ss := socks(t, 2)
	b, err := encodeConnect(Config{
		Index: AnyIndex, Socks: ss, SizeBytes: 512 << 20, BlockSize: 4096,
		ServerFlags: FlagsDefault, Timeout: 1500 * time.Millisecond,
		DeadConnTimeout: time.Minute, BackendID: "vol1",
	})
	if err != nil {
		t.Fatal(err)
	}
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint16]uint64{}
	var fds []uint32
	var backend string
	for ad.Next() {
		switch ad.Type() {
		case attrIndex:
			t.Error("AnyIndex must omit NBD_ATTR_INDEX")
		case attrSizeBytes, attrBlockSizeBytes, attrServerFlags, attrTimeout, attrDeadConnTimeout:
			got[ad.Type()] = ad.Uint64()
		case attrBackendID:
			backend = ad.String()
		case attrSockets:
			ad.Nested(func(items *netlink.AttributeDecoder) error {
				for items.Next() {
					if items.Type() != sockItem {
						t.Errorf("socket list item type %d", items.Type())
					}
					items.Nested(func(d *netlink.AttributeDecoder) error {
						for d.Next() {
							if d.Type() == sockFD {
								fds = append(fds, d.Uint32())
							}
						}
						return nil
					})
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	want := map[uint16]uint64{
		attrSizeBytes: 512 << 20, attrBlockSizeBytes: 4096, attrServerFlags: 0x16d,
		attrTimeout: 2, attrDeadConnTimeout: 60,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("attr %d = %d, want %d", k, got[k], v)
		}
	}
	if len(fds) != 2 || fds[0] != uint32(ss[0].Fd()) || fds[1] != uint32(ss[1].Fd()) {
		t.Errorf("socket fds = %v", fds)
	}
	if backend != "vol1" {
		t.Errorf("backend = %q", backend)
	}
}

// The kernel refuses RECONFIGURE of a device connected with a backend id
// unless the request names it ("must specify backend").
func TestEncodeReconfigureBackend(t *testing.T) {
	for _, backend := range []string{"blockd:vol1", ""} {
		b, err := encodeReconfigure(3, backend, socks(t, 1), 0, time.Minute, 0)
		if err != nil {
			t.Fatal(err)
		}
		ad, err := netlink.NewAttributeDecoder(b)
		if err != nil {
			t.Fatal(err)
		}
		var got string
		var index uint32
		seen := map[uint16]bool{}
		for ad.Next() {
			seen[ad.Type()] = true
			switch ad.Type() {
			case attrBackendID:
				got = ad.String()
			case attrIndex:
				index = ad.Uint32()
			}
		}
		if err := ad.Err(); err != nil {
			t.Fatal(err)
		}
		if got != backend || seen[attrBackendID] != (backend != "") {
			t.Errorf("backend %q encoded as %q (present %v)", backend, got, seen[attrBackendID])
		}
		if index != 3 || !seen[attrSockets] || !seen[attrDeadConnTimeout] || seen[attrTimeout] {
			t.Errorf("reconfigure attrs: index %d, seen %v", index, seen)
		}
	}
}

func TestEncodeResize(t *testing.T) {
	b, err := encodeResize(5, "blockd:d:v", 3<<30)
	if err != nil {
		t.Fatal(err)
	}
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint16]bool{}
	var index uint32
	var size uint64
	var backend string
	for ad.Next() {
		seen[ad.Type()] = true
		switch ad.Type() {
		case attrIndex:
			index = ad.Uint32()
		case attrSizeBytes:
			size = ad.Uint64()
		case attrBackendID:
			backend = ad.String()
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	if index != 5 || size != 3<<30 || backend != "blockd:d:v" || seen[attrSockets] || len(seen) != 3 {
		t.Errorf("resize attrs: index %d size %d backend %q seen %v", index, size, backend, seen)
	}
	if _, err := encodeResize(5, "", 0); err == nil {
		t.Error("size 0 encoded")
	}
}

func TestEncodeConnectRejects(t *testing.T) {
	ss := socks(t, 2)
	for name, cfg := range map[string]Config{
		"no sockets":         {Index: AnyIndex, SizeBytes: 1 << 20},
		"multi without flag": {Index: AnyIndex, Socks: ss, SizeBytes: 1 << 20, ServerFlags: FlagHasFlags},
		"zero size":          {Index: 3, Socks: ss[:1]},
	} {
		if _, err := encodeConnect(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestDecodeStatus(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(attrDeviceList, func(l *netlink.AttributeEncoder) error {
		for i, conn := range []uint8{1, 0} {
			l.Nested(deviceItem, func(d *netlink.AttributeEncoder) error {
				d.Uint32(deviceIndex, uint32(i+4))
				d.Uint8(deviceConnected, conn)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeStatus(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceStatus{{4, true}, {5, false}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("status = %v, want %v", got, want)
	}
}

func TestDialWithoutFamily(t *testing.T) {
	// A family no kernel has: Dial's error must say so in a way callers can
	// test for. The host's own nbd family is never asked for here (that
	// could autoload the module); the VM tests dial the real one.
	c, err := dialFamily("blockd_nofam")
	if err == nil {
		c.Close()
		t.Fatal("dial of a family that does not exist succeeded")
	}
	if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
		t.Skipf("no generic netlink socket on this host: %v", err)
	}
	if !errors.Is(err, ErrNoFamily) {
		t.Fatalf("err = %v, want ErrNoFamily", err)
	}
	if !strings.Contains(err.Error(), "blockd_nofam") {
		t.Errorf("error %q does not name the family", err)
	}
}

func TestDevicePath(t *testing.T) {
	if p := DevicePath(12); p != "/dev/nbd12" {
		t.Errorf("DevicePath(12) = %q", p)
	}
}

func FuzzDecodeStatus(f *testing.F) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(attrDeviceList, func(l *netlink.AttributeEncoder) error {
		l.Nested(deviceItem, func(d *netlink.AttributeEncoder) error {
			d.Uint32(deviceIndex, 7)
			d.Uint8(deviceConnected, 1)
			return nil
		})
		return nil
	})
	seed, _ := ae.Encode()
	f.Add(seed)
	f.Add([]byte{})
	f.Add([]byte{4, 0, 9, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		// Kernel replies are trusted, but a malformed one must be an
		// error, never a panic in the daemon.
		_, _ = decodeStatus(b)
		_, _, _ = decodeIndex(b)
	})
}

func TestSocketPairCloseUnblocksRead(t *testing.T) {
	k, srv, err := SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	done := make(chan error, 1)
	go func() { // owner: this test; exits when Read returns
		var b [1]byte
		_, err := srv.Read(b[:])
		done <- err
	}()
	if _, err := k.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("read across the pair: %v", err)
	}
	go func() {
		var b [1]byte
		_, err := srv.Read(b[:])
		done <- err
	}()
	srv.Close()
	if err := <-done; !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Read after Close = %v, want os.ErrClosed", err)
	}
}

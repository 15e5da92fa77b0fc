package blockd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/nbd"
)

// Attachment records that a volume is exposed as a kernel block device. It
// is part of the volume's metadata, so a restarted daemon finds the device
// again and hands it new sockets.
type Attachment struct {
	Frontend    string `json:"frontend"` // "nbd" or "ublk"
	Device      string `json:"device"`   // /dev/nbdN, /dev/ublkbN
	Index       int    `json:"index"`
	Connections int    `json:"connections,omitempty"` // nbd sockets
	Queues      int    `json:"queues,omitempty"`      // ublk
	Depth       int    `json:"depth,omitempty"`       // ublk
}

// Frontends a volume can be attached with.
const FrontendNBD = "nbd"

// maxKernelConns caps the default connection count (one blk-mq hardware
// queue each): past a handful, more queues only add scheduling overhead.
const maxKernelConns = 8

// multiConnKernel is the oldest kernel (major, minor) on which an attach
// defaults to more than one connection. Debian's 6.1 now and then leaves
// the first request on a device's second socket uncompleted although the
// server answered it, until the request timeout (--nbd-timeout, 30s)
// marks that socket dead and requeues the request: in the vm/ tests, with
// a minimal responder and with blockd alike, in about one attach in eight
// and in half the boots; never on 6.12. Data stays correct (the daemon
// replaces the socket), but a 30s stall of mkfs or mount is a poor
// default, so older kernels get one socket unless --connections asks.
var multiConnKernel = [2]int{6, 12}

// defaultKernelConns is the connection count of an attach that names
// none: one per CPU up to maxKernelConns on kernels from multiConnKernel
// on, one before (or when the release cannot be parsed).
func defaultKernelConns(release string, cpus int) int {
	var major, minor int
	if _, err := fmt.Sscanf(release, "%d.%d", &major, &minor); err != nil ||
		major < multiConnKernel[0] || (major == multiConnKernel[0] && minor < multiConnKernel[1]) {
		return 1
	}
	return max(1, min(cpus, maxKernelConns))
}

// kernelRelease is uname -r.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// KernelOptions tune kernel attachments.
type KernelOptions struct {
	// Timeout is the kernel's per-request timeout. When it expires the
	// kernel marks that socket dead and requeues the request; the daemon
	// then hands the device a fresh socket. Default 30s.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O while every socket
	// is dead (the daemon is restarting) before failing it. Default 2m.
	DeadConnTimeout time.Duration
	// LoadModule loads a kernel module; default kernel/module.Load.
	LoadModule func(name string) error
}

// backendPrefix marks our devices in /sys/block/nbdN/backend.
const backendPrefix = "blockd:"

// kernelNBD owns the kernel side of NBD attachments: the netlink client
// and, per attached volume, the goroutines serving its sockets.
type kernelNBD struct {
	opts KernelOptions
	srv  *nbd.Server
	m    *Manager
	log  *slog.Logger

	bg sync.WaitGroup // socket replacements in progress

	mu       sync.Mutex // serializes attach, detach and recovery; guards below
	nl       *nbdnl.Client
	attached map[string]*kattach
	closing  bool
}

// kattach is one attached volume's live state.
type kattach struct {
	vol       *Volume
	index     int
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup // one per socket being served
	detaching bool           // guarded by kernelNBD.mu
}

func newKernelNBD(srv *nbd.Server, m *Manager, log *slog.Logger, opts KernelOptions) *kernelNBD {
	if opts.Timeout == 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.DeadConnTimeout == 0 {
		opts.DeadConnTimeout = 2 * time.Minute
	}
	if opts.LoadModule == nil {
		opts.LoadModule = module.Load
	}
	return &kernelNBD{opts: opts, srv: srv, m: m, log: log, attached: map[string]*kattach{}}
}

// netlinkLocked loads nbd and dials its netlink family on first use.
func (k *kernelNBD) netlinkLocked() (*nbdnl.Client, error) {
	if k.nl != nil {
		return k.nl, nil
	}
	if err := k.opts.LoadModule("nbd"); err != nil {
		return nil, fmt.Errorf("kernel nbd driver unavailable: %w", err)
	}
	nl, err := nbdnl.Dial()
	if err != nil {
		return nil, fmt.Errorf("kernel nbd driver unavailable: %w", err)
	}
	k.nl = nl
	return nl, nil
}

// socketPairs makes n connected unix socket pairs: the daemon serves one end
// of each, the kernel gets the other.
func socketPairs(n int) (ours []net.Conn, theirs []*os.File, err error) {
	defer func() {
		if err != nil {
			for _, c := range ours {
				c.Close()
			}
			for _, f := range theirs {
				f.Close()
			}
			ours, theirs = nil, nil
		}
	}()
	for i := 0; i < n; i++ {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return ours, theirs, fmt.Errorf("socketpair: %w", err)
		}
		f := os.NewFile(uintptr(fds[0]), "nbd-server")
		c, err := net.FileConn(f) // dups the fd
		f.Close()
		theirs = append(theirs, os.NewFile(uintptr(fds[1]), "nbd-kernel"))
		if err != nil {
			return ours, theirs, fmt.Errorf("socketpair: %w", err)
		}
		ours = append(ours, c)
	}
	return ours, theirs, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

func (k *kernelNBD) serverFlags(v *Volume) uint64 {
	f := nbdnl.FlagsDefault
	if v.ReadOnly() {
		f |= nbdnl.FlagReadOnly
	}
	return f
}

// Attach exposes a volume as /dev/nbdN over conns sockets.
func (k *kernelNBD) Attach(name string, conns int) (Spec, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closing {
		return Spec{}, fmt.Errorf("attach %s: daemon is shutting down", name)
	}
	v, err := k.m.Get(name)
	if err != nil {
		return Spec{}, err
	}
	if a := v.Spec().Attachment; a != nil {
		return Spec{}, fmt.Errorf("attach %s: %w: already attached as %s", name, ErrConflict, a.Device)
	}
	if conns == 0 {
		conns = defaultKernelConns(kernelRelease(), runtime.NumCPU())
	}
	if conns < 1 || conns > 64 {
		return Spec{}, fmt.Errorf("attach %s: %w: --connections %d: want 1 to 64", name, ErrInvalid, conns)
	}
	nl, err := k.netlinkLocked()
	if err != nil {
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	ka := k.newAttach(v)
	ours, theirs, err := socketPairs(conns)
	if err != nil {
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	// Serve before connecting: the kernel reads the partition table as
	// soon as the device is configured.
	for _, c := range ours {
		k.serve(ka, c)
	}
	idx, err := nl.Connect(nbdnl.Config{
		Index:           nbdnl.AnyIndex,
		Socks:           theirs,
		SizeBytes:       uint64(v.Size()),
		BlockSize:       uint64(v.PreferredBlockSize()),
		ServerFlags:     k.serverFlags(v),
		Timeout:         k.opts.Timeout,
		DeadConnTimeout: k.opts.DeadConnTimeout,
		BackendID:       backendPrefix + name,
	})
	closeFiles(theirs)
	if err != nil {
		ka.cancel()
		for _, c := range ours {
			c.Close()
		}
		ka.wg.Wait()
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	ka.index = idx
	if err := setReadAhead(idx, v.EffectiveProfile()); err != nil {
		k.log.Warn("attach: read-ahead not set for io_profile", "volume", name, "err", err)
	}
	v.kernelLive.Store(true)
	att := &Attachment{Frontend: FrontendNBD, Device: nbdnl.DevicePath(idx), Index: idx, Connections: conns}
	s, err := k.m.setAttachment(name, att)
	if err != nil {
		nl.Disconnect(idx)
		ka.cancel()
		ka.wg.Wait()
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	k.attached[name] = ka
	k.log.Info("volume attached", "volume", name, "device", att.Device, "connections", conns)
	return s, nil
}

func (k *kernelNBD) newAttach(v *Volume) *kattach {
	ctx, cancel := context.WithCancel(context.Background())
	return &kattach{vol: v, ctx: ctx, cancel: cancel}
}

// serve runs the NBD transmission phase on one kernel socket. When the
// socket ends while the volume is still attached (the kernel timed a
// request out and marked the socket dead), it hands the device a new one.
func (k *kernelNBD) serve(ka *kattach, c net.Conn) {
	ka.wg.Add(1)
	go func() {
		defer ka.wg.Done()
		err := k.srv.ServeKernel(ka.ctx, c, ka.vol)
		if ka.ctx.Err() != nil || errors.Is(err, nbd.ErrServerClosed) {
			return
		}
		if err != nil {
			k.log.Warn("kernel nbd socket failed; replacing it", "volume", ka.vol.Name(), "err", err)
		} else {
			// The kernel shuts a socket down when a request on it timed
			// out (--nbd-timeout); it requeues the request elsewhere.
			k.log.Warn("kernel closed an nbd socket (request timeout); replacing it", "volume", ka.vol.Name())
		}
		k.bg.Add(1)
		go func() {
			defer k.bg.Done()
			k.replaceSocket(ka)
		}()
	}()
}

// replaceSocket gives a device one new socket in place of a dead one.
func (k *kernelNBD) replaceSocket(ka *kattach) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closing || ka.detaching || ka.ctx.Err() != nil || k.attached[ka.vol.Name()] != ka {
		return
	}
	// Give the kernel a moment to mark the socket dead: it only swaps
	// dead sockets.
	time.Sleep(100 * time.Millisecond)
	if err := k.reconfigureLocked(ka, 1); err != nil {
		k.log.Error("replacing kernel nbd socket", "volume", ka.vol.Name(), "err", err)
	}
}

func (k *kernelNBD) reconfigureLocked(ka *kattach, n int) error {
	ours, theirs, err := socketPairs(n)
	if err != nil {
		return err
	}
	for _, c := range ours {
		k.serve(ka, c)
	}
	// The kernel swaps only sockets it has marked dead; right after a
	// crash it may not have noticed yet.
	for try := 0; ; try++ {
		err = k.nl.ReconfigureBackend(ka.index, backendPrefix+ka.vol.Name(), theirs, k.opts.Timeout, k.opts.DeadConnTimeout, 0)
		if !errors.Is(err, nbdnl.ErrNoDeadSocket) || try == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	closeFiles(theirs)
	if err != nil {
		for _, c := range ours {
			c.Close()
		}
	}
	return err
}

// Detach disconnects a volume's device and clears its attachment.
func (k *kernelNBD) Detach(name string) (Spec, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	v, err := k.m.Get(name)
	if err != nil {
		return Spec{}, err
	}
	att := v.Spec().Attachment
	if att == nil {
		return Spec{}, fmt.Errorf("detach %s: %w: volume is not attached", name, ErrConflict)
	}
	nl, err := k.netlinkLocked()
	if err != nil {
		return Spec{}, fmt.Errorf("detach %s: %w", name, err)
	}
	ka := k.attached[name]
	if ka != nil {
		ka.detaching = true
	}
	v.kernelLive.Store(false)
	if err := nl.Disconnect(att.Index); err != nil && !errors.Is(err, nbdnl.ErrNoDevice) {
		return Spec{}, fmt.Errorf("detach %s: %w", name, err)
	}
	if ka != nil {
		// The kernel closes its ends; the servers see EOF and finish
		// what is in flight.
		done := make(chan struct{})
		go func() { ka.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			k.log.Warn("kernel sockets still open 30s after disconnect; closing", "volume", name)
			ka.cancel()
			<-done
		}
		ka.cancel()
		delete(k.attached, name)
	}
	return k.m.detached(name, att)
}

// Recover re-attaches every volume recorded as attached: a device the
// kernel still holds (the daemon was killed or restarted) gets new
// sockets through NBD_CMD_RECONFIGURE, so I/O that waited completes; a
// device the kernel no longer has (the node rebooted) is connected again
// at the same index. Devices of ours that no volume records are
// disconnected.
func (k *kernelNBD) Recover() {
	k.mu.Lock()
	defer k.mu.Unlock()
	want := k.m.attachedWith(FrontendNBD)
	orphans := ourNBDDevices()
	if len(want) == 0 && len(orphans) == 0 {
		return
	}
	nl, err := k.netlinkLocked()
	if err != nil {
		k.log.Error("cannot recover kernel attachments", "err", err)
		return
	}
	for _, s := range want {
		delete(orphans, s.Attachment.Index)
		if err := k.recoverOneLocked(nl, s); err != nil {
			k.log.Error("recovering attachment failed; volume left detached", "volume", s.Name, "device", s.Attachment.Device, "err", err)
			// A device of ours that cannot get sockets would hold its
			// I/O for dead_conn_timeout and then fail it; fail it now
			// and free the index, as the metadata says detached.
			if deviceBackend(s.Attachment.Index) == backendPrefix+s.Name {
				nl.Disconnect(s.Attachment.Index)
			}
			k.m.setAttachment(s.Name, nil)
		}
	}
	for idx, backend := range orphans {
		k.log.Warn("disconnecting nbd device of ours that no volume records", "device", nbdnl.DevicePath(idx), "backend", backend)
		nl.Disconnect(idx)
	}
}

func (k *kernelNBD) recoverOneLocked(nl *nbdnl.Client, s Spec) error {
	v, err := k.m.Get(s.Name)
	if err != nil {
		return err
	}
	att := s.Attachment
	ka := k.newAttach(v)
	ka.index = att.Index
	st, err := nl.Status(att.Index)
	if err == nil && st.Connected {
		if b := deviceBackend(att.Index); b != "" && b != backendPrefix+s.Name {
			return fmt.Errorf("%s now belongs to %q", att.Device, b)
		}
		if err := k.reconfigureLocked(ka, att.Connections); err != nil {
			ka.cancel()
			return err
		}
		k.attached[s.Name] = ka
		// The kernel kept the device's read-ahead; setting it now would
		// wait for the requests still queued on the dead sockets.
		v.kernelLive.Store(true)
		k.log.Info("reattached live device", "volume", s.Name, "device", att.Device, "connections", att.Connections)
		return nil
	}
	ours, theirs, err := socketPairs(att.Connections)
	if err != nil {
		return err
	}
	for _, c := range ours {
		k.serve(ka, c)
	}
	_, err = nl.Connect(nbdnl.Config{
		Index: att.Index, Socks: theirs, SizeBytes: uint64(v.Size()), BlockSize: uint64(v.PreferredBlockSize()),
		ServerFlags: k.serverFlags(v), Timeout: k.opts.Timeout, DeadConnTimeout: k.opts.DeadConnTimeout,
		BackendID: backendPrefix + s.Name,
	})
	closeFiles(theirs)
	if err != nil {
		ka.cancel()
		for _, c := range ours {
			c.Close()
		}
		ka.wg.Wait()
		return err
	}
	if err := setReadAhead(att.Index, v.EffectiveProfile()); err != nil {
		k.log.Warn("reconnect: read-ahead not set for io_profile", "volume", s.Name, "err", err)
	}
	v.kernelLive.Store(true)
	k.attached[s.Name] = ka
	k.log.Info("reconnected device", "volume", s.Name, "device", att.Device)
	return nil
}

// deviceBackend reads the backend id the kernel shows for /dev/nbdN.
func deviceBackend(idx int) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", idx))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ourNBDDevices lists connected nbd devices whose backend id marks them as
// blockd's.
func ourNBDDevices() map[int]string {
	out := map[int]string{}
	ms, _ := filepath.Glob("/sys/block/nbd*/backend")
	for _, p := range ms {
		idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(p)), "nbd"))
		if err != nil {
			continue
		}
		if b := deviceBackend(idx); strings.HasPrefix(b, backendPrefix) {
			out[idx] = b
		}
	}
	return out
}

// beginClose stops attaches and socket replacement; call it before the nbd
// server shuts down so that sockets it closes are not replaced.
func (k *kernelNBD) beginClose() {
	k.mu.Lock()
	k.closing = true
	for _, ka := range k.attached {
		ka.vol.kernelLive.Store(false)
	}
	k.mu.Unlock()
}

// Close stops serving kernel sockets without disconnecting the devices:
// the kernel holds their I/O until a restarted daemon reconfigures them.
// The nbd server's Shutdown has already drained the connections.
func (k *kernelNBD) Close() {
	k.beginClose()
	k.bg.Wait()
	k.mu.Lock()
	as := make([]*kattach, 0, len(k.attached))
	for _, ka := range k.attached {
		as = append(as, ka)
	}
	nl := k.nl
	k.mu.Unlock()
	for _, ka := range as {
		ka.cancel()
		ka.wg.Wait()
	}
	if nl != nil {
		nl.Close()
	}
}

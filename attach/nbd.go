package attach

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

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/volume"
)

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

// backendPrefix marks blockd's devices in /sys/block/nbdN/backend:
// blockd:DAEMON:VOLUME, or blockd:VOLUME from daemons that had no id.
const backendPrefix = "blockd:"

// ownPrefix starts the backend id of every device this daemon connects.
func (k *nbdFrontend) ownPrefix() string { return backendPrefix + k.opts.DaemonID + ":" }

// recordedBackend is the backend id a recorded attachment's device was
// connected with.
func recordedBackend(s api.Spec) string {
	if b := s.Attachment.Backend; b != "" {
		return b
	}
	return backendPrefix + s.Name // attached by a daemon without an id
}

// nbdNetlink is the kernel nbd driver's netlink interface as the nbd
// frontend uses it; *nbdnl.Client in the daemon, a fake in tests.
type nbdNetlink interface {
	Connect(cfg nbdnl.Config) (int, error)
	ReconfigureBackend(index int, backendID string, socks []*os.File, timeout, deadConnTimeout time.Duration, clientFlags uint64) error
	Disconnect(index int) error
	Resize(index int, backendID string, size uint64) error
	Status(index int) (nbdnl.DeviceStatus, error)
	Close() error
}

// nbdFrontend owns the kernel side of NBD attachments: the netlink client
// and, per attached volume, the goroutines serving its sockets.
type nbdFrontend struct {
	d    *Devices
	opts Options
	srv  *nbd.Server
	log  *slog.Logger

	bg       sync.WaitGroup // socket replacements and read-ahead updates in progress (goBackground)
	stopping chan struct{}  // closed by beginClose: background work ends

	// Guarded by d.mu:
	nl       nbdNetlink
	attached map[string]*kattach

	liveMu sync.Mutex // guards closed; never held across I/O
	closed bool       // no new background work
}

// kattach is one attached volume's live state.
type kattach struct {
	vol     *volume.Volume
	backend string // backend id of the device
	index   int
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup // one per socket being served

	// Guarded by Devices.mu:
	detaching bool
	dead      int  // sockets the kernel dropped that await a replacement
	replacing bool // a replaceSockets goroutine runs for this device
}

// ksock is the daemon's end of one kernel socket. Only a socket the
// kernel took can die and want a replacement: one whose hand-over
// failed is closed and forgotten.
type ksock struct {
	mu     sync.Mutex
	handed bool // the kernel took the other end
	ended  bool // serving it ended while the volume was attached
}

func newNBD(d *Devices, srv *nbd.Server, opts Options) *nbdFrontend {
	return &nbdFrontend{d: d, opts: opts, srv: srv, log: opts.Log, stopping: make(chan struct{}),
		attached: map[string]*kattach{}}
}

// goBackground runs f on a goroutine owned by the frontend (close waits
// for it), unless the frontend is closing.
func (k *nbdFrontend) goBackground(f func()) {
	k.liveMu.Lock()
	defer k.liveMu.Unlock()
	if k.closed {
		return
	}
	k.bg.Add(1)
	go func() {
		defer k.bg.Done()
		f()
	}()
}

// netlinkLocked loads nbd and dials its netlink family on first use.
func (k *nbdFrontend) netlinkLocked() (nbdNetlink, error) {
	if k.nl != nil {
		return k.nl, nil
	}
	if err := k.opts.LoadModule("nbd"); err != nil {
		return nil, api.Errorf(api.CodeUnavailable, "kernel nbd driver unavailable: %w", err)
	}
	nl, err := k.opts.dialNetlink()
	if err != nil {
		return nil, api.Errorf(api.CodeUnavailable, "kernel nbd driver unavailable: %w", err)
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
			closeFiles(theirs)
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

func serverFlags(v *volume.Volume) uint64 {
	f := nbdnl.FlagsDefault
	if v.ReadOnly() {
		f |= nbdnl.FlagReadOnly
	}
	return f
}

// connect serves conns new sockets for ka and connects them to the kernel
// at index (nbdnl.AnyIndex: the kernel picks); it returns the index.
func (k *nbdFrontend) connect(nl nbdNetlink, ka *kattach, index, conns int) (int, error) {
	ours, theirs, err := socketPairs(conns)
	if err != nil {
		return 0, err
	}
	// Serve before connecting: the kernel reads the partition table as
	// soon as the device is configured.
	socks := make([]*ksock, len(ours))
	for i, c := range ours {
		socks[i] = k.serve(ka, c)
	}
	v := ka.vol
	idx, err := nl.Connect(nbdnl.Config{
		Index:           index,
		Socks:           theirs,
		SizeBytes:       uint64(v.Size()),
		BlockSize:       uint64(v.PreferredBlockSize()),
		ServerFlags:     serverFlags(v),
		Timeout:         k.opts.Timeout,
		DeadConnTimeout: k.opts.DeadConnTimeout,
		BackendID:       ka.backend,
	})
	closeFiles(theirs)
	if err != nil {
		ka.cancel()
		for _, c := range ours {
			c.Close()
		}
		ka.wg.Wait()
		return 0, err
	}
	k.handed(ka, socks)
	return idx, nil
}

// attach exposes a volume as /dev/nbdN over req.Connections sockets.
func (k *nbdFrontend) attach(v *volume.Volume, req api.AttachRequest) (*api.Attachment, error) {
	name := v.Name()
	conns := req.Connections
	if conns == 0 {
		conns = defaultKernelConns(kernelRelease(), runtime.NumCPU())
	}
	if conns < 1 || conns > 64 {
		return nil, api.Errorf(api.CodeInvalid, "attach %s: --connections %d: want 1 to 64", name, conns)
	}
	nl, err := k.netlinkLocked()
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	ka := k.newAttach(v, k.ownPrefix()+name)
	idx, err := k.connect(nl, ka, nbdnl.AnyIndex, conns)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	ka.index = idx
	k.attached[name] = ka
	k.d.ra.serve(name, nbdDev(idx))
	if err := k.d.ra.set(nbdDev(idx), v.EffectiveProfile()); err != nil {
		k.log.Warn("attach: read-ahead not set for io_profile", "volume", name, "err", err)
	}
	return &api.Attachment{Frontend: api.FrontendNBD, Device: nbdnl.DevicePath(idx), Index: idx, Connections: conns, Backend: ka.backend}, nil
}

func (k *nbdFrontend) newAttach(v *volume.Volume, backend string) *kattach {
	ctx, cancel := context.WithCancel(context.Background())
	return &kattach{vol: v, backend: backend, ctx: ctx, cancel: cancel}
}

// serve runs the NBD transmission phase on one kernel socket. When a
// socket the kernel took ends while the volume is still attached (the
// kernel timed a request out and marked the socket dead), the device gets
// a new one (socketDied).
func (k *nbdFrontend) serve(ka *kattach, c net.Conn) *ksock {
	s := &ksock{}
	ka.wg.Add(1)
	go func() {
		defer ka.wg.Done()
		err := k.srv.ServeKernel(ka.ctx, c, ka.vol)
		if ka.ctx.Err() != nil || errors.Is(err, nbd.ErrServerClosed) {
			return
		}
		s.mu.Lock()
		s.ended = true
		handed := s.handed
		s.mu.Unlock()
		if !handed {
			return // never the kernel's: closed by a failed hand-over
		}
		k.socketDied(ka, err)
	}()
	return s
}

// handed records that the kernel took socks; one that already ended died
// in the kernel's hands and is replaced.
func (k *nbdFrontend) handed(ka *kattach, socks []*ksock) {
	for _, s := range socks {
		s.mu.Lock()
		s.handed = true
		ended := s.ended
		s.mu.Unlock()
		if ended {
			k.socketDied(ka, nil)
		}
	}
}

// socketDied schedules the replacement of a socket of ka's device that the
// kernel dropped. It never blocks (it may run with Devices.mu held): the
// count is taken on a background goroutine, which becomes the device's
// replacer unless one runs already.
func (k *nbdFrontend) socketDied(ka *kattach, err error) {
	k.goBackground(func() {
		k.d.mu.Lock()
		if !k.replaceWantedLocked(ka) {
			k.d.mu.Unlock()
			return // detached (the kernel closed its ends) or closing
		}
		if err != nil {
			k.log.Warn("kernel nbd socket failed; replacing it", "volume", ka.vol.Name(), "err", err)
		} else {
			// The kernel shuts a socket down when a request on it timed
			// out (--nbd-timeout); it requeues the request elsewhere.
			k.log.Warn("kernel closed an nbd socket (request timeout); replacing it", "volume", ka.vol.Name())
		}
		ka.dead++
		if ka.replacing {
			k.d.mu.Unlock()
			return
		}
		ka.replacing = true
		k.d.mu.Unlock()
		k.replaceSockets(ka)
	})
}

func (k *nbdFrontend) replaceWantedLocked(ka *kattach) bool {
	return !k.d.closing && !ka.detaching && ka.ctx.Err() == nil && k.attached[ka.vol.Name()] == ka
}

// replaceSockets hands ka's device one new socket per socket the kernel
// dropped. Each attempt waits first, without the lock (the kernel marks a
// socket dead a moment after closing it, and swaps only dead ones), the
// wait doubling after each failure; detach and close end it at once. After
// opts.replaceAttempts failures in a row it gives up, once, with an error:
// the device keeps the sockets it has, or fails I/O after its
// dead-connection timeout if it has none. A later socket death starts
// anew.
func (k *nbdFrontend) replaceSockets(ka *kattach) {
	name := ka.vol.Name()
	wait := k.opts.replaceBackoff
	failures := 0
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-ka.ctx.Done():
		case <-k.stopping:
		}
		k.d.mu.Lock()
		if !k.replaceWantedLocked(ka) {
			ka.dead, ka.replacing = 0, false
			k.d.mu.Unlock()
			return
		}
		err := k.reconfigureLocked(ka, 1, 1)
		if err == nil {
			failures, wait = 0, k.opts.replaceBackoff
			if ka.dead--; ka.dead == 0 {
				ka.replacing = false
				k.d.mu.Unlock()
				k.log.Info("replaced kernel nbd socket", "volume", name, "device", nbdnl.DevicePath(ka.index))
				return
			}
		} else if failures++; failures == k.opts.replaceAttempts {
			dead := ka.dead
			ka.dead, ka.replacing = 0, false
			k.d.mu.Unlock()
			k.log.Error("gave up replacing the kernel nbd sockets the kernel dropped; the device keeps the sockets it has, "+
				"or fails I/O after --nbd-dead-conn-timeout if none is left", "volume", name, "device", nbdnl.DevicePath(ka.index),
				"sockets", dead, "attempts", failures, "err", err)
			return
		} else {
			k.log.Debug("replacing kernel nbd socket failed; retrying", "volume", name, "attempt", failures, "retry_in", 2*wait, "err", err)
			wait *= 2
		}
		k.d.mu.Unlock()
		t.Reset(wait)
	}
}

// recoverTries bounds the ErrNoDeadSocket retries of a device recovered at
// start (5s): the kernel may not yet have noticed the old daemon's death.
const recoverTries = 50

// reconfigureLocked hands the device of ka n new sockets, trying up to
// tries times 100ms apart while the kernel has no dead socket to swap
// (right after a crash it may not have noticed yet).
func (k *nbdFrontend) reconfigureLocked(ka *kattach, n, tries int) error {
	ours, theirs, err := socketPairs(n)
	if err != nil {
		return err
	}
	socks := make([]*ksock, len(ours))
	for i, c := range ours {
		socks[i] = k.serve(ka, c)
	}
	for try := 1; ; try++ {
		err = k.nl.ReconfigureBackend(ka.index, ka.backend, theirs, k.opts.Timeout, k.opts.DeadConnTimeout, 0)
		if !errors.Is(err, nbdnl.ErrNoDeadSocket) || try >= tries {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	closeFiles(theirs)
	if err != nil {
		for _, c := range ours {
			c.Close()
		}
		return err
	}
	k.handed(ka, socks)
	return nil
}

// detach disconnects a volume's device.
func (k *nbdFrontend) detach(v *volume.Volume, att *api.Attachment) error {
	name := v.Name()
	nl, err := k.netlinkLocked()
	if err != nil {
		return fmt.Errorf("detach %s: %w", name, err)
	}
	ka := k.attached[name]
	if ka != nil {
		ka.detaching = true
	}
	k.d.ra.stop(name)
	if err := nl.Disconnect(att.Index); err != nil && !errors.Is(err, nbdnl.ErrNoDevice) {
		return fmt.Errorf("detach %s: %w", name, err)
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
	return nil
}

// recover re-attaches every volume recorded as attached: a device the
// kernel still holds (the daemon was killed or restarted) gets new
// sockets through NBD_CMD_RECONFIGURE, so I/O that waited completes; a
// device the kernel no longer has (the node rebooted) is connected again
// at the same index. Devices of this daemon (backend ids with its prefix)
// that no volume records are disconnected; other daemons' are left alone.
func (k *nbdFrontend) recover(want []api.Spec) {
	orphans := k.ourNBDDevices()
	if len(want) == 0 && len(orphans) == 0 {
		return
	}
	nl, err := k.netlinkLocked()
	if err != nil {
		k.log.Error("cannot recover kernel attachments", "err", err)
		return
	}
	for _, s := range want {
		backend := recordedBackend(s)
		if orphans[s.Attachment.Index] == backend {
			delete(orphans, s.Attachment.Index)
		}
		if v, err := k.d.vols.Get(s.Name); err == nil && v.InMemory() {
			k.abandonLocked(nl, s, backend)
			continue
		}
		att, err := k.recoverOneLocked(nl, s)
		if err != nil {
			k.log.Error("recovering attachment failed; volume left detached", "volume", s.Name, "device", s.Attachment.Device, "err", err)
			// A device of ours that cannot get sockets would hold its
			// I/O for dead_conn_timeout and then fail it; fail it now
			// and free the index, as the metadata says detached.
			if k.deviceBackend(s.Attachment.Index) == backend {
				nl.Disconnect(s.Attachment.Index)
			}
			k.d.forget(s.Name)
			continue
		}
		if *att != *s.Attachment {
			if _, err := k.d.vols.SetAttachment(s.Name, att); err != nil {
				k.log.Warn("reconnected device, but its new backend id is not recorded", "volume", s.Name, "backend", att.Backend, "err", err)
			}
		}
	}
	for idx, backend := range orphans {
		k.log.Warn("disconnecting nbd device of ours that no volume records", "device", nbdnl.DevicePath(idx), "backend", backend)
		nl.Disconnect(idx)
	}
}

// abandonLocked detaches the recorded device of a memory volume instead
// of recovering it: the volume starts empty, so its data is gone.
// NBD_CMD_DISCONNECT makes the kernel fail the requests queued and waiting
// for a reconnect (EIO), and any later I/O; see Devices.memoryLost.
func (k *nbdFrontend) abandonLocked(nl nbdNetlink, s api.Spec, backend string) {
	att := s.Attachment
	st, err := nl.Status(att.Index)
	b := k.deviceBackend(att.Index)
	live := err == nil && st.Connected && (b == "" || b == backend)
	if live {
		if err := nl.Disconnect(att.Index); err != nil {
			// Its sockets are dead: I/O still fails, once the
			// dead-connection timeout runs out.
			k.log.Error("disconnecting the kernel device of a memory volume", "volume", s.Name, "device", att.Device, "err", err)
		}
	}
	k.d.memoryLost(s.Name, att.Device, live)
}

// recoverOneLocked re-attaches a recorded device and returns the
// attachment as it now is: a device connected anew gets this daemon's
// backend id.
func (k *nbdFrontend) recoverOneLocked(nl nbdNetlink, s api.Spec) (*api.Attachment, error) {
	v, err := k.d.vols.Get(s.Name)
	if err != nil {
		return nil, err
	}
	att := *s.Attachment
	st, err := nl.Status(att.Index)
	if err == nil && st.Connected {
		backend := recordedBackend(s)
		if b := k.deviceBackend(att.Index); b != "" && b != backend {
			return nil, fmt.Errorf("%s now belongs to %q", att.Device, b)
		}
		ka := k.newAttach(v, backend)
		ka.index = att.Index
		if err := k.reconfigureLocked(ka, att.Connections, recoverTries); err != nil {
			ka.cancel()
			return nil, err
		}
		k.attached[s.Name] = ka
		// The kernel kept the device's read-ahead; setting it now would
		// wait for the requests still queued on the dead sockets.
		k.d.ra.serve(s.Name, nbdDev(att.Index))
		k.log.Info("reattached live device", "volume", s.Name, "device", att.Device, "connections", att.Connections)
		return &att, nil
	}
	ka := k.newAttach(v, k.ownPrefix()+s.Name)
	ka.index = att.Index
	if _, err := k.connect(nl, ka, att.Index, att.Connections); err != nil {
		return nil, err
	}
	if err := k.d.ra.set(nbdDev(att.Index), v.EffectiveProfile()); err != nil {
		k.log.Warn("reconnect: read-ahead not set for io_profile", "volume", s.Name, "err", err)
	}
	k.d.ra.serve(s.Name, nbdDev(att.Index))
	k.attached[s.Name] = ka
	att.Backend = ka.backend
	k.log.Info("reconnected device", "volume", s.Name, "device", att.Device)
	return &att, nil
}

// deviceBackend reads the backend id the kernel shows for /dev/nbdN.
func (k *nbdFrontend) deviceBackend(idx int) string {
	b, err := os.ReadFile(filepath.Join(k.opts.sysBlock, fmt.Sprintf("nbd%d", idx), "backend"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ourNBDDevices lists the nbd devices whose backend id marks them as this
// daemon's (ownPrefix), by index.
func (k *nbdFrontend) ourNBDDevices() map[int]string {
	out := map[int]string{}
	ms, _ := filepath.Glob(filepath.Join(k.opts.sysBlock, "nbd*", "backend"))
	for _, p := range ms {
		idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(p)), "nbd"))
		if err != nil {
			continue
		}
		if b := k.deviceBackend(idx); strings.HasPrefix(b, k.ownPrefix()) {
			out[idx] = b
		}
	}
	return out
}

// nbdDev is the kernel's name of /dev/nbdIDX.
func nbdDev(idx int) string { return fmt.Sprintf("nbd%d", idx) }

// beginClose starts no more background work and wakes the socket
// replacements that wait, so that they end.
func (k *nbdFrontend) beginClose() {
	k.liveMu.Lock()
	if !k.closed {
		k.closed = true
		close(k.stopping)
	}
	k.liveMu.Unlock()
}

// close stops serving kernel sockets without disconnecting the devices:
// the kernel holds their I/O until a restarted daemon reconfigures them.
// The nbd server's Shutdown has already drained the connections.
func (k *nbdFrontend) close() {
	k.waitBackground()
	k.d.mu.Lock()
	as := make([]*kattach, 0, len(k.attached))
	for _, ka := range k.attached {
		as = append(as, ka)
	}
	nl := k.nl
	k.nl = nil
	k.d.mu.Unlock()
	for _, ka := range as {
		ka.cancel()
		ka.wg.Wait()
	}
	if nl != nil {
		nl.Close()
	}
}

// waitBackground waits for socket replacements (which end at once once
// beginClose ran) and read-ahead updates. A read-ahead write waits for the
// device's queue to drain: do not let one stuck behind a dead device hold
// up shutdown for long.
func (k *nbdFrontend) waitBackground() {
	done := make(chan struct{})
	go func() { k.bg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		k.log.Warn("a kernel read-ahead update is still blocked; closing anyway")
	}
}

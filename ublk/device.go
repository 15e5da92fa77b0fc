// Package ublk is blockd's ublk frontend: it creates /dev/ublkbN block
// devices whose requests the kernel's ublk_drv hands to this process over
// io_uring, and turns them into pipeline requests.
//
// Shape: one Control (an io_uring on /dev/ublk-control) per device for
// ADD/SET_PARAMS/START/STOP/DEL and recovery; one goroutine per hardware
// queue, locked to its OS thread, owning that queue's ring on /dev/ublkcN
// and its descriptor mapping; a bounded set of workers that run the
// pipeline Handler. A worker hands the result back to the queue goroutine
// through a done list and a channel send; a watcher goroutine parked in
// Go's netpoller on the ring fd sends on the same channel when the driver
// posts completions. So one wait covers both, a finished request costs no
// syscall and no kernel round trip to reach the queue, and an idle queue
// holds no P (a goroutine blocked in io_uring_enter would keep its P).
//
// Daemon start: Recover the ublk ids the registry recorded (a failure with
// ErrNotRecoverable means attach afresh), then Cleanup with keep reporting
// the recovered ids, then Attach new volumes. Application I/O to an
// orphaned device waits (USER_RECOVERY without FAIL_IO) until Recover, or
// fails once Cleanup/Remove deletes the device.
//
// Data moves through per-tag buffers in one anonymous mapping per queue
// (the driver copies into/out of them), not UBLK_F_USER_COPY: the copy
// costs the same either way, and this saves a pread/pwrite syscall per
// request; the mapping is only populated where requests touch it.
//
// Devices are created with UBLK_F_USER_RECOVERY|UBLK_F_USER_RECOVERY_REISSUE
// and marked in ublksrv_flags with their daemon's tag (Config.Owner), so a
// restarted daemon can Recover them without I/O errors and Cleanup the
// ones it no longer wants, and never touches another daemon's.
package ublk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/pipeline"
)

// Config describes a device.
type Config struct {
	// ID is the device number wanted (N in /dev/ublkbN); -1 lets the
	// kernel choose.
	ID int
	// Queues is the number of hardware queues (default: CPUs, at most 4;
	// the kernel allows at most the number of CPUs).
	Queues int
	// Depth is the number of requests in flight per queue (default 64).
	Depth int
	// MaxIO is the largest request in bytes (default 512 KiB).
	MaxIO int
	// Size of the device in bytes, a multiple of 4096.
	Size int64
	// Workers bounds concurrent Handler calls (default Queues*Depth).
	Workers int
	// Handler performs requests.
	Handler pipeline.Handler
	// Logger (default slog.Default()).
	Logger *slog.Logger
	// LoadModule loads a kernel module by name when /dev/ublk-control is
	// missing (default module.Load).
	LoadModule func(name string) error
	// ReadOnly marks the block device read-only.
	ReadOnly bool
	// Owner tags the device (in its ServerFlags) as created by one
	// daemon among several on the node: Recover takes over only devices
	// with this tag (or untagged ones of older blockd), and
	// Cleanup(owner, ...) deletes only devices with it.
	Owner uint32
}

func (c *Config) defaults() error {
	if c.Queues <= 0 {
		c.Queues = min(runtime.NumCPU(), 4)
	}
	if c.Depth <= 0 {
		c.Depth = 64
	}
	if c.MaxIO <= 0 {
		c.MaxIO = 512 << 10
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.LoadModule == nil {
		c.LoadModule = module.Load
	}
	switch {
	case c.Handler == nil:
		return errors.New("ublk: no handler")
	case c.Queues > maxQueues || c.Depth > maxQueueDepth:
		return fmt.Errorf("ublk: %d queues of depth %d exceed the driver's limits", c.Queues, c.Depth)
	case c.MaxIO%4096 != 0 || c.MaxIO > 1<<maxIOBufBits:
		return fmt.Errorf("ublk: max io %d not a multiple of 4096 up to 32 MiB", c.MaxIO)
	}
	return nil
}

// Device is a served ublk device.
type Device struct {
	id     uint32
	info   DevInfo
	size   int64
	ctrl   *Control
	charFd int
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	work   chan *slot
	queues []*queue
	maps   [][]byte // descriptor and buffer mappings, unmapped at the end
	qwg    sync.WaitGroup
	wwg    sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// ID returns the device number N.
func (d *Device) ID() int { return int(d.id) }

// Path returns the block device path, /dev/ublkbN.
func (d *Device) Path() string { return BlockPath(int(d.id)) }

// Info returns the kernel's description of the device as of attach.
func (d *Device) Info() DevInfo { return d.info }

// BlockPath and CharPath name the device nodes of device id.
func BlockPath(id int) string { return "/dev/ublkb" + strconv.Itoa(id) }

// CharPath names the character device of device id.
func CharPath(id int) string { return "/dev/ublkc" + strconv.Itoa(id) }

// Attach creates a new ublk device served by cfg.Handler and returns when
// its block device exists. ctx is the parent of the context handlers get;
// cancelling it later does not stop the device (Detach does).
func Attach(ctx context.Context, cfg Config) (*Device, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if cfg.Size <= 0 || cfg.Size%4096 != 0 {
		return nil, fmt.Errorf("ublk: size %d not a positive multiple of 4096", cfg.Size)
	}
	ctrl, err := OpenControl(cfg.LoadModule)
	if err != nil {
		return nil, err
	}
	want := uint64(FlagUserRecovery | FlagUserRecoveryReissue | FlagCmdIoctlEncode)
	if feats, err := ctrl.Features(); err == nil {
		want &= feats
	} else {
		// GET_FEATURES appeared in 6.5; older drivers still recover.
		want = FlagUserRecovery | FlagUserRecoveryReissue
	}
	info := DevInfo{NrHwQueues: uint16(cfg.Queues), QueueDepth: uint16(cfg.Depth),
		MaxIOBufBytes: uint32(cfg.MaxIO), DevID: uint32(cfg.ID), Flags: want, ServerFlags: serverFlags(cfg.Owner)}
	if cfg.ID < 0 {
		info.DevID = ^uint32(0)
	}
	if err := ctrl.AddDev(&info); err != nil {
		ctrl.Close()
		return nil, err
	}
	fail := func(err error) (*Device, error) {
		if derr := ctrl.DelDev(info.DevID); derr != nil {
			cfg.Logger.Warn("ublk attach cleanup", "dev", info.DevID, "err", derr)
		}
		ctrl.Close()
		return nil, err
	}
	if info.ServerFlags != serverFlags(cfg.Owner) {
		return fail(fmt.Errorf("ublk add dev: server flags not kept (%#x)", info.ServerFlags))
	}
	maxIO := int(info.MaxIOBufBytes) / 4096 * 4096
	if maxIO < 4096 {
		return fail(fmt.Errorf("ublk add dev: kernel max io %d", info.MaxIOBufBytes))
	}
	p := Params{
		LogicalBSShift: 12, PhysicalBSShift: 12, IOMinShift: 12, IOOptShift: 12,
		Attrs:      attrVolatileCache | attrFUA,
		MaxSectors: uint32(maxIO >> sectorShift),
		DevSectors: uint64(cfg.Size) >> sectorShift,
		// Discard and write-zeroes are capped so their length fits the
		// pipeline's uint32.
		DiscardGranularity: 4096, MaxDiscardSectors: 1 << 22, MaxWriteZeroesSectors: 1 << 22,
		MaxDiscardSegments: 1,
	}
	if cfg.ReadOnly {
		p.Attrs |= attrReadOnly
	}
	if err := ctrl.SetParams(info.DevID, &p); err != nil {
		return fail(err)
	}
	d, err := serve(ctx, ctrl, info, cfg, cfg.Size)
	if err != nil {
		return fail(err)
	}
	if err := ctrl.StartDev(d.id, os.Getpid()); err != nil {
		d.shutdown(false)
		return fail(err)
	}
	if err := waitPath(d.Path(), 10*time.Second); err != nil {
		d.log.Warn("ublk block device node missing", "path", d.Path(), "err", err)
	}
	d.log.Info("ublk device attached", "dev", d.Path(), "queues", info.NrHwQueues,
		"depth", info.QueueDepth, "max_io", maxIO, "flags", fmt.Sprintf("%#x", info.Flags))
	return d, nil
}

// serve opens the character device and starts workers and queues; it
// returns when every queue has submitted its fetches.
func serve(ctx context.Context, ctrl *Control, info DevInfo, cfg Config, size int64) (*Device, error) {
	d := &Device{id: info.DevID, info: info, size: size, ctrl: ctrl, charFd: -1, log: cfg.Logger}
	if err := waitPath(CharPath(int(d.id)), 10*time.Second); err != nil {
		return nil, err
	}
	fd, err := unix.Open(CharPath(int(d.id)), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", CharPath(int(d.id)), err)
	}
	d.charFd = fd
	depth := int(info.QueueDepth)
	nq := int(info.NrHwQueues)
	maxIO := int(info.MaxIOBufBytes) / 4096 * 4096
	page := os.Getpagesize()
	workers := cfg.Workers
	if workers <= 0 || workers > nq*depth {
		workers = nq * depth
	}
	d.ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	d.work = make(chan *slot, nq*depth)
	for i := 0; i < workers; i++ {
		d.wwg.Add(1)
		go func() {
			defer d.wwg.Done()
			worker(d.ctx, cfg.Handler, d.work)
		}()
	}
	ready := make(chan error, nq)
	for qid := 0; qid < nq; qid++ {
		descs, err := unix.Mmap(fd, descOffset(qid, page), descLen(depth, page), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			d.shutdown(false)
			return nil, fmt.Errorf("mmap queue %d descriptors: %w", qid, err)
		}
		d.maps = append(d.maps, descs)
		mem, err := unix.Mmap(-1, 0, depth*maxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			d.shutdown(false)
			return nil, fmt.Errorf("mmap queue %d buffers: %w", qid, err)
		}
		d.maps = append(d.maps, mem)
		bufs := make([][]byte, depth)
		for t := range bufs {
			bufs[t] = mem[t*maxIO : (t+1)*maxIO : (t+1)*maxIO]
		}
		qid := qid
		q := newQueue(d.ctx, qid, size, descs, bufs, cfg.Handler, d.work, d.log, func() (qring, error) {
			return newKernelRing(fd, qid, depth)
		})
		d.queues = append(d.queues, q)
		d.qwg.Add(1)
		go func() {
			defer d.qwg.Done()
			q.run(ready)
		}()
	}
	for range nq {
		if err := <-ready; err != nil {
			d.shutdown(false)
			return nil, err
		}
	}
	return d, nil
}

// shutdown stops the queues (each once no request is in its handler),
// then the workers, and releases mappings and the character device. With
// stopped, STOP_DEV already aborted every fetch.
func (d *Device) shutdown(stopped bool) {
	for _, q := range d.queues {
		q.requestStop()
	}
	d.qwg.Wait()
	if d.work != nil {
		close(d.work)
	}
	d.wwg.Wait()
	if d.cancel != nil {
		d.cancel()
	}
	for _, m := range d.maps {
		if err := unix.Munmap(m); err != nil {
			d.log.Warn("ublk munmap", "err", err)
		}
	}
	d.maps = nil
	if d.charFd >= 0 {
		unix.Close(d.charFd)
		d.charFd = -1
	}
}

// Detach removes the device: STOP_DEV (the kernel finishes in-flight
// requests through the queues), then the queue goroutines and workers
// exit, every fd and mapping is released, and the device is deleted
// without waiting for openers of the disk (deleteDev).
func (d *Device) Detach() error {
	d.closeOnce.Do(func() {
		serr := d.ctrl.StopDev(d.id)
		d.shutdown(serr == nil)
		derr := deleteDev(d.ctrl, d.id)
		d.closeErr = errors.Join(serr, derr, d.ctrl.Close())
		d.log.Info("ublk device detached", "dev", d.Path(), "err", d.closeErr)
	})
	return d.closeErr
}

// ErrResizeNotSupported is the answer of Resize on a driver without
// FlagUpdateSize (every kernel up to 6.15, Debian's 6.12 included).
var ErrResizeNotSupported = errors.New("this kernel's ublk driver cannot resize a live device " +
	"(UBLK_F_UPDATE_SIZE needs Linux 6.16 or newer)")

// Resize changes the size of the live device to size bytes (a multiple of
// 4096), on drivers that offer FlagUpdateSize; the handler must already
// serve the new size.
func (d *Device) Resize(size int64) error {
	if size <= 0 || size%4096 != 0 {
		return fmt.Errorf("ublk resize: size %d not a positive multiple of 4096", size)
	}
	feats, err := d.ctrl.Features()
	if err != nil || feats&FlagUpdateSize == 0 {
		return ErrResizeNotSupported
	}
	return d.ctrl.UpdateSize(d.id, uint64(size)>>sectorShift)
}

// CanResize reports whether the driver can resize a live device (nil) or
// ErrResizeNotSupported.
func CanResize(load func(string) error) error {
	ctrl, err := OpenControl(load)
	if err != nil {
		return err
	}
	defer ctrl.Close()
	if feats, err := ctrl.Features(); err != nil || feats&FlagUpdateSize == 0 {
		return ErrResizeNotSupported
	}
	return nil
}

// Release stops serving but leaves the device in the kernel, quiesced, for
// a later Recover by this or another process: requests issued meanwhile
// wait. Release and Detach are exclusive; the first one called wins.
func (d *Device) Release() error {
	d.closeOnce.Do(func() {
		d.shutdown(false)
		// The driver quiesces the device asynchronously, once the rings'
		// teardown has cancelled the fetches. Return only then, so that
		// the caller's next step (Recover, or I/O that must wait) meets a
		// settled device.
		var err error
		deadline := time.Now().Add(10 * time.Second)
		for {
			var info DevInfo
			info, err = d.ctrl.DevInfo(d.id)
			if err != nil || info.State != StateLive {
				break
			}
			if time.Now().After(deadline) {
				err = fmt.Errorf("ublk release %d: device still live after 10s", d.id)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		d.closeErr = errors.Join(err, d.ctrl.Close())
		d.log.Info("ublk device released for recovery", "dev", d.Path(), "err", d.closeErr)
	})
	return d.closeErr
}

// Recover re-attaches device id after its server died (or Released it):
// the block device and its open files survive and applications see no
// error. cfg supplies Handler, Logger, Workers and LoadModule; queues,
// depth and size are the device's own (cfg.Size, if set, must match).
func Recover(ctx context.Context, id int, cfg Config) (*Device, error) {
	if cfg.Handler == nil {
		return nil, errors.New("ublk: no handler")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.LoadModule == nil {
		cfg.LoadModule = module.Load
	}
	ctrl, err := OpenControl(cfg.LoadModule)
	if err != nil {
		return nil, err
	}
	d, err := recoverDev(ctx, ctrl, uint32(id), cfg)
	if err != nil {
		ctrl.Close()
		return nil, fmt.Errorf("ublk recover %d: %w", id, err)
	}
	return d, nil
}

// ErrNotRecoverable means the device is not one blockd can take over.
var ErrNotRecoverable = errors.New("device not recoverable")

func recoverDev(ctx context.Context, ctrl *Control, id uint32, cfg Config) (*Device, error) {
	// The old server's files are released asynchronously after it dies;
	// until then the device is LIVE and START_USER_RECOVERY says EBUSY.
	deadline := time.Now().Add(30 * time.Second)
	var info DevInfo
	for {
		var err error
		info, err = ctrl.DevInfo(id)
		if err != nil {
			return nil, err
		}
		if err := checkTakeOver(info, cfg.Owner); err != nil {
			return nil, err
		}
		if info.Flags&FlagUserRecovery == 0 {
			return nil, fmt.Errorf("%w: flags %#x", ErrNotRecoverable, info.Flags)
		}
		if info.State == StateDead {
			return nil, fmt.Errorf("%w: device not started", ErrNotRecoverable)
		}
		if info.State == StateQuiesced || info.State == StateFailIO {
			if err = ctrl.StartUserRecovery(id); err == nil {
				break
			}
			if !errors.Is(err, unix.EBUSY) {
				return nil, err
			}
		} else if info.DaemonPID != int32(os.Getpid()) && processAlive(int(info.DaemonPID)) {
			return nil, fmt.Errorf("%w: server pid %d is alive", ErrNotRecoverable, info.DaemonPID)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("device stays in state %d", info.State)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	p, err := ctrl.Params(id)
	if err != nil {
		return nil, err
	}
	size := int64(p.DevSectors) << sectorShift
	if cfg.Size != 0 && cfg.Size != size {
		return nil, fmt.Errorf("%w: device has %d bytes, config %d", ErrNotRecoverable, size, cfg.Size)
	}
	d, err := serve(ctx, ctrl, info, cfg, size)
	if err != nil {
		return nil, err
	}
	if err := ctrl.EndUserRecovery(id, os.Getpid()); err != nil {
		d.shutdown(false)
		return nil, err
	}
	d.log.Info("ublk device recovered", "dev", d.Path(), "queues", info.NrHwQueues, "depth", info.QueueDepth)
	return d, nil
}

// checkTakeOver returns ErrNotRecoverable unless the daemon owner may
// take device info over.
func checkTakeOver(info DevInfo, owner uint32) error {
	switch {
	case mayTakeOver(info, owner):
		return nil
	case IsBlockd(info):
		return fmt.Errorf("%w: another blockd daemon's device (server flags %#x, ours %#x)", ErrNotRecoverable, info.ServerFlags, serverFlags(owner))
	}
	return fmt.Errorf("%w: not a blockd device (server flags %#x)", ErrNotRecoverable, info.ServerFlags)
}

// processAlive reports whether pid is a running process. A zombie is dead:
// its files, and so its hold on the device, are already released or about
// to be.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

// List returns the ublk devices in the kernel, blockd's or not. load
// loads ublk_drv if needed (nil: module.Load).
func List(load func(string) error) ([]DevInfo, error) {
	if load == nil {
		load = module.Load
	}
	ctrl, err := OpenControl(load)
	if err != nil {
		return nil, err
	}
	defer ctrl.Close()
	ids, err := deviceIDs()
	if err != nil {
		return nil, err
	}
	var out []DevInfo
	for _, id := range ids {
		info, err := ctrl.DevInfo(uint32(id))
		if errors.Is(err, unix.ENODEV) {
			continue // deleted meanwhile
		}
		if err != nil {
			return out, err
		}
		out = append(out, info)
	}
	return out, nil
}

func deviceIDs() ([]int, error) {
	// The class exists while ublk_drv is loaded, which OpenControl ensured.
	ents, err := os.ReadDir("/sys/class/ublk-char")
	if err != nil {
		return nil, fmt.Errorf("list ublk devices: %w", err)
	}
	var ids []int
	for _, e := range ents {
		if rest, ok := strings.CutPrefix(e.Name(), "ublkc"); ok {
			if n, err := strconv.Atoi(rest); err == nil {
				ids = append(ids, n)
			}
		}
	}
	return ids, nil
}

// Remove stops and deletes device id, which no process may be serving.
// I/O waiting on it, and later I/O on files still open on it, fails; it
// does not wait for those files to close (deleteDev).
func Remove(id int, load func(string) error) error {
	return withControl(load, func(ctrl *Control) error { return remove(ctrl, uint32(id)) })
}

// withControl runs f with a control of its own; load as for OpenControl
// (nil: module.Load).
func withControl(load func(string) error, f func(*Control) error) error {
	if load == nil {
		load = module.Load
	}
	ctrl, err := OpenControl(load)
	if err != nil {
		return err
	}
	defer ctrl.Close()
	return f(ctrl)
}

// Abandon removes device id, recorded by the daemon owner, instead of
// recovering it: its data is gone (a memory volume after a restart), so
// the I/O that waits for a new server must fail rather than be served
// from an empty volume. STOP_DEV first: the kernel fails the requests it
// queued while no server ran (EIO) and removes the block device, so later
// I/O on files still open on it fails too; then the device is deleted
// without waiting for those files (deleteDev). A device that is not the
// owner's, or that a live process serves, is left alone (ErrNotRecoverable);
// one that does not exist is os.ErrNotExist.
func Abandon(id int, owner uint32, load func(string) error) error {
	return withControl(load, func(ctrl *Control) error {
		info, err := ctrl.DevInfo(uint32(id))
		if errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("ublk abandon %d: %w", id, os.ErrNotExist)
		}
		if err != nil {
			return err
		}
		if err := checkTakeOver(info, owner); err != nil {
			return fmt.Errorf("ublk abandon %d: %w", id, err)
		}
		if servedByOther(info) {
			return fmt.Errorf("ublk abandon %d: %w: server pid %d is alive", id, ErrNotRecoverable, info.DaemonPID)
		}
		return remove(ctrl, uint32(id))
	})
}

// servedByOther reports whether a live process other than this one serves
// the device.
func servedByOther(info DevInfo) bool {
	return info.State == StateLive && info.DaemonPID != int32(os.Getpid()) && processAlive(int(info.DaemonPID))
}

func remove(ctrl *Control, id uint32) error {
	serr := ctrl.StopDev(id)
	if err := deleteDev(ctrl, id); err != nil {
		return errors.Join(serr, err)
	}
	return nil
}

// delDevWait bounds the wait of a DEL_DEV on kernels without
// DEL_DEV_ASYNC.
const delDevWait = 5 * time.Second

// deleteDev deletes a stopped device without waiting for the last opener
// of its disk: a mounted filesystem or an application's open file would
// otherwise hold DEL_DEV, and whoever issued it, until closed. The block
// and character devices are gone when it returns; the kernel frees the id
// once the last opener closes. Kernels before 6.9 lack DEL_DEV_ASYNC: there
// DEL_DEV runs on its own control for at most delDevWait and finishes in
// the background (its goroutine ends when the kernel completes it, or with
// the process).
func deleteDev(ctrl *Control, id uint32) error {
	err := ctrl.DelDevAsync(id)
	if !errors.Is(err, unix.EOPNOTSUPP) {
		return err
	}
	own, err := OpenControl(nil)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { // owner: none; see above
		err := own.DelDev(id)
		own.Close()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(delDevWait):
		return nil // stopped and unlinked; the kernel frees the id at the last close
	}
}

// Cleanup deletes every device of the daemon owner (marked with its tag in
// ServerFlags) that keep rejects and no live process serves: call it at
// daemon start, after recovering the devices the registry still wants,
// with keep reporting those. Devices of other daemons, and untagged ones
// of older blockd (whose they are cannot be told), are left alone. It
// returns the ids removed.
func Cleanup(owner uint32, keep func(DevInfo) bool, load func(string) error) ([]int, error) {
	if load == nil {
		load = module.Load
	}
	infos, err := List(load)
	if err != nil {
		return nil, err
	}
	ctrl, err := OpenControl(load)
	if err != nil {
		return nil, err
	}
	defer ctrl.Close()
	var removed []int
	var errs []error
	for _, info := range infos {
		if !cleanupWants(info, owner, keep) {
			continue
		}
		if err := remove(ctrl, info.DevID); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, int(info.DevID))
	}
	return removed, errors.Join(errs...)
}

// cleanupWants reports whether Cleanup removes device info.
func cleanupWants(info DevInfo, owner uint32, keep func(DevInfo) bool) bool {
	return OwnedBy(info, owner) && !keep(info) && !servedByOther(info)
}

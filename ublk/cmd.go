package ublk

import (
	"encoding/binary"
)

// ioctl number encoding (asm-generic/ioctl.h), which ublk uses for its
// io_uring command opcodes since UBLK_F_CMD_IOCTL_ENCODE.
const (
	iocNRBits    = 8
	iocTypeBits  = 8
	iocSizeBits  = 14
	iocNRShift   = 0
	iocTypeShift = iocNRShift + iocNRBits
	iocSizeShift = iocTypeShift + iocTypeBits
	iocDirShift  = iocSizeShift + iocSizeBits
	iocWrite     = 1
	iocRead      = 2
)

func ioc(dir, typ, nr, size uint32) uint32 {
	return dir<<iocDirShift | typ<<iocTypeShift | nr<<iocNRShift | size<<iocSizeShift
}
func iowr(nr, size uint32) uint32 { return ioc(iocRead|iocWrite, 'u', nr, size) }
func ior(nr, size uint32) uint32  { return ioc(iocRead, 'u', nr, size) }

// Sizes of the uapi structs (include/uapi/linux/ublk_cmd.h).
const (
	ctrlCmdSize = 32 // struct ublksrv_ctrl_cmd
	devInfoSize = 64 // struct ublksrv_ctrl_dev_info
	ioCmdSize   = 16 // struct ublksrv_io_cmd
	ioDescSize  = 24 // struct ublksrv_io_desc
)

// Control command opcodes.
var (
	cmdGetDevInfo    = ior(0x02, ctrlCmdSize)
	cmdAddDev        = iowr(0x04, ctrlCmdSize)
	cmdDelDev        = iowr(0x05, ctrlCmdSize)
	cmdStartDev      = iowr(0x06, ctrlCmdSize)
	cmdStopDev       = iowr(0x07, ctrlCmdSize)
	cmdSetParams     = iowr(0x08, ctrlCmdSize)
	cmdGetParams     = ior(0x09, ctrlCmdSize)
	cmdStartRecovery = iowr(0x10, ctrlCmdSize)
	cmdEndRecovery   = iowr(0x11, ctrlCmdSize)
	cmdGetFeatures   = ior(0x13, ctrlCmdSize)
	cmdDelDevAsync   = ior(0x14, ctrlCmdSize)  // 6.9+: DEL_DEV that does not wait for the disk's openers
	cmdUpdateSize    = iowr(0x15, ctrlCmdSize) // with FlagUpdateSize (6.16+): the size of a live device, in sectors
)

// I/O command opcodes, issued on /dev/ublkcN.
var (
	ioFetchReq       = iowr(0x20, ioCmdSize)
	ioCommitAndFetch = iowr(0x21, ioCmdSize)
)

// Device feature flags (UBLK_F_*).
const (
	FlagURingCmdCompInTask  = 1 << 1
	FlagNeedGetData         = 1 << 2
	FlagUserRecovery        = 1 << 3
	FlagUserRecoveryReissue = 1 << 4
	FlagUnprivileged        = 1 << 5
	FlagCmdIoctlEncode      = 1 << 6
	FlagUserCopy            = 1 << 7
	// FlagUpdateSize: UPDATE_SIZE changes a live device's size. Newer
	// than 6.12 (mainline 6.16): Debian's 6.12 driver does not offer it.
	FlagUpdateSize = 1 << 10
)

// Device states (UBLK_S_DEV_*).
const (
	StateDead     = 0
	StateLive     = 1
	StateQuiesced = 2
	StateFailIO   = 3
)

// Request ops and flags in ublksrv_io_desc.op_flags.
const (
	opRead        = 0
	opWrite       = 1
	opFlush       = 2
	opDiscard     = 3
	opWriteSame   = 4
	opWriteZeroes = 5

	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15
)

// ioResAbort is the fetch result meaning the queue is going away: the tag
// must not be fetched again (UBLK_IO_RES_ABORT = -ENODEV).
const ioResAbort = -19

// Limits from the uapi header.
const (
	maxQueueDepth = 4096
	maxQueues     = 4096
	maxIOBufBits  = 25 // one request is at most 32 MiB
)

// Parameter types and attributes.
const (
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1

	attrReadOnly      = 1 << 0
	attrRotational    = 1 << 1
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// ctrlCmd is struct ublksrv_ctrl_cmd.
type ctrlCmd struct {
	DevID   uint32
	QueueID uint16
	Len     uint16
	Addr    uint64
	Data    uint64
}

func (c *ctrlCmd) put(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], c.DevID)
	le.PutUint16(b[4:], c.QueueID)
	le.PutUint16(b[6:], c.Len)
	le.PutUint64(b[8:], c.Addr)
	le.PutUint64(b[16:], c.Data)
	clear(b[24:ctrlCmdSize]) // dev_path_len, pad, reserved
}

// DevInfo is struct ublksrv_ctrl_dev_info: what ADD_DEV asks for and what
// GET_DEV_INFO reports.
type DevInfo struct {
	NrHwQueues    uint16
	QueueDepth    uint16
	State         uint16
	MaxIOBufBytes uint32
	DevID         uint32
	DaemonPID     int32
	Flags         uint64
	// ServerFlags is ublksrv_flags, stored by the kernel and never
	// interpreted by it; blockd marks its devices there.
	ServerFlags uint64
	OwnerUID    uint32
	OwnerGID    uint32
}

func (d *DevInfo) put(b []byte) {
	le := binary.LittleEndian
	clear(b[:devInfoSize])
	le.PutUint16(b[0:], d.NrHwQueues)
	le.PutUint16(b[2:], d.QueueDepth)
	le.PutUint16(b[4:], d.State)
	le.PutUint32(b[8:], d.MaxIOBufBytes)
	le.PutUint32(b[12:], d.DevID)
	le.PutUint32(b[16:], uint32(d.DaemonPID))
	le.PutUint64(b[24:], d.Flags)
	le.PutUint64(b[32:], d.ServerFlags)
	le.PutUint32(b[40:], d.OwnerUID)
	le.PutUint32(b[44:], d.OwnerGID)
}

func (d *DevInfo) get(b []byte) {
	le := binary.LittleEndian
	d.NrHwQueues = le.Uint16(b[0:])
	d.QueueDepth = le.Uint16(b[2:])
	d.State = le.Uint16(b[4:])
	d.MaxIOBufBytes = le.Uint32(b[8:])
	d.DevID = le.Uint32(b[12:])
	d.DaemonPID = int32(le.Uint32(b[16:]))
	d.Flags = le.Uint64(b[24:])
	d.ServerFlags = le.Uint64(b[32:])
	d.OwnerUID = le.Uint32(b[40:])
	d.OwnerGID = le.Uint32(b[44:])
}

// Params are the parts of struct ublk_params blockd sets: basic and
// discard.
type Params struct {
	Attrs            uint32
	LogicalBSShift   uint8
	PhysicalBSShift  uint8
	IOOptShift       uint8
	IOMinShift       uint8
	MaxSectors       uint32
	ChunkSectors     uint32
	DevSectors       uint64
	VirtBoundaryMask uint64

	DiscardAlignment      uint32
	DiscardGranularity    uint32
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
	MaxDiscardSegments    uint16
}

// paramsLen covers the header, ublk_param_basic (32 bytes) and
// ublk_param_discard (20 bytes). Sending only what we set keeps SET_PARAMS
// valid on kernels whose struct ublk_params is longer or shorter.
const paramsLen = 8 + 32 + 20

func (p *Params) put(b []byte) {
	le := binary.LittleEndian
	clear(b[:paramsLen])
	le.PutUint32(b[0:], paramsLen)
	le.PutUint32(b[4:], paramTypeBasic|paramTypeDiscard)
	x := b[8:]
	le.PutUint32(x[0:], p.Attrs)
	x[4], x[5], x[6], x[7] = p.LogicalBSShift, p.PhysicalBSShift, p.IOOptShift, p.IOMinShift
	le.PutUint32(x[8:], p.MaxSectors)
	le.PutUint32(x[12:], p.ChunkSectors)
	le.PutUint64(x[16:], p.DevSectors)
	le.PutUint64(x[24:], p.VirtBoundaryMask)
	x = b[40:]
	le.PutUint32(x[0:], p.DiscardAlignment)
	le.PutUint32(x[4:], p.DiscardGranularity)
	le.PutUint32(x[8:], p.MaxDiscardSectors)
	le.PutUint32(x[12:], p.MaxWriteZeroesSectors)
	le.PutUint16(x[16:], p.MaxDiscardSegments)
}

func (p *Params) get(b []byte) {
	le := binary.LittleEndian
	x := b[8:]
	p.Attrs = le.Uint32(x[0:])
	p.LogicalBSShift, p.PhysicalBSShift, p.IOOptShift, p.IOMinShift = x[4], x[5], x[6], x[7]
	p.MaxSectors = le.Uint32(x[8:])
	p.ChunkSectors = le.Uint32(x[12:])
	p.DevSectors = le.Uint64(x[16:])
	p.VirtBoundaryMask = le.Uint64(x[24:])
	x = b[40:]
	p.DiscardAlignment = le.Uint32(x[0:])
	p.DiscardGranularity = le.Uint32(x[4:])
	p.MaxDiscardSectors = le.Uint32(x[8:])
	p.MaxWriteZeroesSectors = le.Uint32(x[12:])
	p.MaxDiscardSegments = le.Uint16(x[16:])
}

// putIOCmd fills struct ublksrv_io_cmd.
func putIOCmd(b []byte, qid, tag uint16, result int32, addr uint64) {
	le := binary.LittleEndian
	le.PutUint16(b[0:], qid)
	le.PutUint16(b[2:], tag)
	le.PutUint32(b[4:], uint32(result))
	le.PutUint64(b[8:], addr)
}

// ioDesc is struct ublksrv_io_desc as the kernel writes it into the
// mmapped per-queue array.
type ioDesc struct {
	OpFlags     uint32
	NrSectors   uint32
	StartSector uint64
	Addr        uint64
}

func (d *ioDesc) get(b []byte) {
	le := binary.LittleEndian
	d.OpFlags = le.Uint32(b[0:])
	d.NrSectors = le.Uint32(b[4:])
	d.StartSector = le.Uint64(b[8:])
	d.Addr = le.Uint64(b[16:])
}

// descOffset is the mmap offset of queue qid's descriptor array on
// /dev/ublkcN: each queue has a window sized for the maximum depth.
func descOffset(qid int, pageSize int) int64 {
	return int64(qid) * int64(roundUp(maxQueueDepth*ioDescSize, pageSize))
}

// descLen is the length to mmap for a queue of the given depth; the kernel
// refuses any other length.
func descLen(depth int, pageSize int) int { return roundUp(depth*ioDescSize, pageSize) }

func roundUp(n, to int) int { return (n + to - 1) / to * to }

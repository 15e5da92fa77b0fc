package ublk

import (
	"bytes"
	"os"
	"os/exec"
	"testing"
	"time"
)

// The expected values are the ones the kernel header's _IOR/_IOWR macros
// produce (see ARCHITECTURE.md, ublk facts); they are wire constants.
func TestOpcodeEncodings(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  uint32
		want uint32
	}{
		{"GET_DEV_INFO", cmdGetDevInfo, 0x80207502},
		{"ADD_DEV", cmdAddDev, 0xc0207504},
		{"DEL_DEV", cmdDelDev, 0xc0207505},
		{"START_DEV", cmdStartDev, 0xc0207506},
		{"STOP_DEV", cmdStopDev, 0xc0207507},
		{"SET_PARAMS", cmdSetParams, 0xc0207508},
		{"GET_PARAMS", cmdGetParams, 0x80207509},
		{"START_USER_RECOVERY", cmdStartRecovery, 0xc0207510},
		{"END_USER_RECOVERY", cmdEndRecovery, 0xc0207511},
		{"GET_FEATURES", cmdGetFeatures, 0x80207513},
		{"DEL_DEV_ASYNC", cmdDelDevAsync, 0x80207514},
		{"UPDATE_SIZE", cmdUpdateSize, 0xc0207515},
		{"FETCH_REQ", ioFetchReq, 0xc0107520},
		{"COMMIT_AND_FETCH_REQ", ioCommitAndFetch, 0xc0107521},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

func TestDescWindow(t *testing.T) {
	// round_up(4096*24, 4096) = 98304 per queue.
	if got := descOffset(0, 4096); got != 0 {
		t.Fatalf("queue 0 offset %d", got)
	}
	if got := descOffset(3, 4096); got != 3*98304 {
		t.Fatalf("queue 3 offset %d", got)
	}
	if got := descLen(128, 4096); got != 4096 {
		t.Fatalf("depth 128 len %d", got)
	}
	if got := descLen(4096, 4096); got != 98304 {
		t.Fatalf("depth 4096 len %d", got)
	}
}

func TestStructRoundTrips(t *testing.T) {
	in := DevInfo{NrHwQueues: 2, QueueDepth: 128, State: StateQuiesced, MaxIOBufBytes: 1 << 19,
		DevID: 7, DaemonPID: 1234, Flags: FlagUserRecovery | FlagCmdIoctlEncode,
		ServerFlags: serverFlags(0xdeadbeef), OwnerUID: 1, OwnerGID: 2}
	b := make([]byte, devInfoSize)
	in.put(b)
	var out DevInfo
	out.get(b)
	if in != out {
		t.Fatalf("dev info round trip: %+v != %+v", out, in)
	}
	// Byte positions that the kernel reads, per the uapi layout.
	if b[0] != 2 || b[2] != 128 || b[12] != 7 || b[24] != byte(FlagUserRecovery|FlagCmdIoctlEncode) {
		t.Fatalf("dev info layout: % x", b)
	}

	p := Params{Attrs: attrVolatileCache | attrFUA, LogicalBSShift: 12, PhysicalBSShift: 12,
		IOMinShift: 12, IOOptShift: 12, MaxSectors: 1024, DevSectors: 1 << 20,
		DiscardGranularity: 4096, MaxDiscardSectors: 1 << 16, MaxWriteZeroesSectors: 1 << 16,
		MaxDiscardSegments: 1}
	pb := make([]byte, paramsLen)
	p.put(pb)
	var q Params
	q.get(pb)
	if p != q {
		t.Fatalf("params round trip: %+v != %+v", q, p)
	}
	want := []byte{paramsLen, 0, 0, 0, paramTypeBasic | paramTypeDiscard, 0, 0, 0,
		attrVolatileCache | attrFUA, 0, 0, 0, 12, 12, 12, 12}
	if !bytes.Equal(pb[:16], want) {
		t.Fatalf("params header % x, want % x", pb[:16], want)
	}
	if pb[8+32+16] != 1 { // max_discard_segments
		t.Fatalf("max_discard_segments at wrong offset: % x", pb[40:])
	}

	c := ctrlCmd{DevID: 0xffffffff, QueueID: 0xffff, Len: 64, Addr: 0x1122334455667788, Data: 99}
	cb := bytes.Repeat([]byte{0xaa}, ctrlCmdSize)
	c.put(cb)
	wantC := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 64, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
		99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(cb, wantC) {
		t.Fatalf("ctrl cmd % x", cb)
	}

	io := make([]byte, ioCmdSize)
	putIOCmd(io, 1, 5, -5, 0x1000)
	wantIO := []byte{1, 0, 5, 0, 0xfb, 0xff, 0xff, 0xff, 0, 0x10, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(io, wantIO) {
		t.Fatalf("io cmd % x", io)
	}
}

func TestProcessAlive(t *testing.T) {
	if !processAlive(os.Getpid()) {
		t.Fatal("this process reported dead")
	}
	cmd := exec.Command("/bin/true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	// Until reaped, the exited child is a zombie: dead for recovery.
	for i := 0; i < 500 && processAlive(pid); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if processAlive(pid) {
		t.Fatal("exited child still reported alive")
	}
	cmd.Wait()
	if processAlive(pid) || processAlive(0) || processAlive(-1) {
		t.Fatal("reaped or invalid pid reported alive")
	}
}

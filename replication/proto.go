package replication

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Msg is the header of every message between nodes (the transport
// encodes it with msgpack; payloads travel beside it as raw bytes). Every
// message names the volume and carries the owner's epoch: a replica
// refuses a lower epoch than the highest it has persisted, so an owner
// that lost its role can never write again (fencing happens at the
// replicas, not by a lease running out).
type Msg struct {
	Type   uint8
	Volume string
	Epoch  uint64
	Seq    uint64 // the owner's sequence number of a data message
	Gen    uint64 // the in-sync generation (MsgOpen, MsgSetGen; answers)
	Offset int64
	Length uint32
	Flags  uint32
	Status uint16 // answers: StatusOK or an error code
}

// Message types.
const (
	// MsgOpen (owner to replica): serve volume Volume at epoch Epoch for
	// the sending owner; the payload is the volume's spec (JSON). A
	// replica without the volume creates it; one with a higher epoch
	// refuses (StatusStaleEpoch). The answer's Gen is the replica's
	// generation, Flags has FlagNoHistory if it cannot vouch for its
	// data (a new copy or one whose history it lost).
	MsgOpen uint8 = iota + 1
	// MsgWrite, MsgTrim, MsgWriteZeroes, MsgFlush (owner to replica):
	// apply the request exactly as the owner's engine does; answer when
	// it is done (FUA and flushes: on stable storage).
	MsgWrite
	MsgTrim
	MsgWriteZeroes
	MsgFlush
	// MsgSetGen (owner to replica): the in-sync generation is now Gen.
	MsgSetGen
	// MsgChecksums (owner to replica): the checksums of Length regions
	// of Flags bytes from Offset, 8 bytes each in the answer's payload.
	MsgChecksums
	// MsgState (any node): what the node knows of Volume: role in
	// Flags, epoch, generation.
	MsgState
	// MsgDelete (owner to replica): remove the copy.
	MsgDelete
	msgTypes
)

// Flags.
const (
	FlagFUA       uint32 = 1 << 0 // MsgWrite, MsgWriteZeroes, MsgTrim: durable on reply
	FlagNoHole    uint32 = 1 << 1 // MsgWriteZeroes: keep the range allocated
	FlagResync    uint32 = 1 << 2 // a resync copy, not an application write
	FlagNoHistory uint32 = 1 << 3 // MsgOpen answer: the replica cannot vouch for its data
	FlagOwner     uint32 = 1 << 4 // MsgState answer: the node owns the volume
	FlagReplica   uint32 = 1 << 5 // MsgState answer: the node holds a replica
	// FlagCreate (MsgOpen): the volume is new: a replica without it
	// creates it empty, and an empty copy is in step with an empty owner.
	FlagCreate uint32 = 1 << 6
)

// Answer statuses. They travel as numbers; nothing parses error text.
const (
	StatusOK uint16 = iota
	// StatusStaleEpoch: the request's epoch is lower than the replica's;
	// the answer carries the replica's epoch.
	StatusStaleEpoch
	// StatusNoVolume: the node holds no copy of the volume.
	StatusNoVolume
	// StatusIO: the replica's engine failed the request.
	StatusIO
	// StatusInvalid: a malformed request (bad type, range past the end).
	StatusInvalid
	// StatusConflict: another owner holds the volume at the same epoch,
	// or the node owns it itself.
	StatusConflict
	// StatusNoSpace: the replica's backing store is full.
	StatusNoSpace
	// StatusShutdown: the node is stopping.
	StatusShutdown
	// StatusNoSession: a data message from an owner the replica has
	// not opened a session with at this epoch (it missed the MsgOpen):
	// the owner opens one again.
	StatusNoSession
)

var statusText = [...]string{"ok", "stale epoch", "no such volume here", "I/O error", "invalid request", "conflict", "no space", "shutting down", "no session"}

// StatusError is a peer's refusal.
type StatusError struct {
	Status uint16
	Epoch  uint64 // StatusStaleEpoch: the peer's epoch
}

func (e *StatusError) Error() string {
	t := "status " + fmt.Sprint(e.Status)
	if int(e.Status) < len(statusText) {
		t = statusText[e.Status]
	}
	if e.Status == StatusStaleEpoch {
		return fmt.Sprintf("%s (the replica is at epoch %d)", t, e.Epoch)
	}
	return t
}

// IsStale reports whether err says another owner holds the volume: a
// higher epoch (StatusStaleEpoch), or another owner at the same epoch
// (StatusConflict). Either way this owner must stop.
func IsStale(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && (se.Status == StatusStaleEpoch || se.Status == StatusConflict)
}

// Network carries messages between nodes (the transport package): Call
// sends req with payload to peer and waits for the answer, whose payload
// it returns (read into respBuf when it fits). A Call fails with an error
// when the peer cannot be reached or does not answer within ctx; a
// refusal is an answer with a Status.
type Network interface {
	Call(ctx context.Context, peer string, timeout time.Duration, req *Msg, payload []byte, resp *Msg, respBuf []byte) ([]byte, error)
	// Send starts a call whose answer Receive collects: between them the
	// caller does other work (the owner writes its own copy while the
	// request travels). req and payload must not change, and t belongs to
	// the network, until Receive returns; every Send gets one Receive.
	Send(ctx context.Context, peer string, timeout time.Duration, req *Msg, payload []byte, t *Ticket)
	Receive(t *Ticket, resp *Msg) error
}

// Ticket is a call in flight between Network.Send and Network.Receive,
// owned by the network meanwhile. It lives in the caller's memory, so a
// call costs the network no allocation for it.
type Ticket struct {
	State any   // the network's own record of the call
	Resp  Msg   // for networks that answer at once
	Err   error // likewise
}

// Handler serves the messages a node receives (Service does).
type Handler interface {
	ServeMessage(ctx context.Context, peer string, req *Msg, payload []byte, resp *Msg) ([]byte, error)
}

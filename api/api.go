// Package api is blockd's control API as its clients see it: the JSON
// types of HTTP+JSON on the daemon's unix socket, the error codes, and a
// Client. It links no eBPF, netlink or Prometheus code, so a CSI driver or
// a script can use it without the daemon's dependencies.
//
//	GET    /v1/volumes                  [Volume]
//	POST   /v1/volumes                  Spec -> 201 Volume
//	GET    /v1/volumes/{name}           Volume
//	DELETE /v1/volumes/{name}           204
//	POST   /v1/volumes/{name}/resize    ResizeRequest -> Volume
//	PATCH  /v1/volumes/{name}           UpdateRequest -> Volume
//	POST   /v1/volumes/{name}/attach    AttachRequest -> Volume
//	POST   /v1/volumes/{name}/detach    Volume
//	POST   /v1/volumes/{name}/move      MoveRequest -> Volume (cluster)
//	GET    /v1/nodes                    [Node] (cluster)
//	GET    /v1/io/pods                  podio.Snapshot
//	GET    /v1/health                   {"status": "ok"}
//
// A volume is created from the same JSON that `blockd volume get -o json`
// prints (the fields the daemon sets, like created_at, are ignored on
// input), and every error is an Error: {"error": "text", "code": "..."}
// with a matching HTTP status. Clients switch on the code, never on the
// text.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
	"github.com/blockd/blockd/units"
)

// DefaultStateDir is where `blockd serve` keeps metadata and backing files
// unless told otherwise; its API socket is DefaultStateDir/blockd.sock.
const DefaultStateDir = "/var/lib/blockd"

// DefaultBlockSize is the block size volumes advertise to clients and the
// kernel.
const DefaultBlockSize = 4096

// Frontends a volume can be attached with as a kernel block device.
const (
	FrontendNBD  = "nbd"  // /dev/nbdN
	FrontendUblk = "ublk" // /dev/ublkbN (kernel 6.0+)
)

// Spec is a volume's configuration: the body of a create, the core of
// every Volume the API returns, and what the daemon stores in
// STATE/volumes/NAME.json.
type Spec struct {
	Name      string     `json:"name"`
	Size      Size       `json:"size"`
	BlockSize uint32     `json:"block_size,omitempty"`
	Engine    string     `json:"engine,omitempty"`  // file (default) or memory
	Profile   string     `json:"profile,omitempty"` // io_profile, default auto
	ReadOnly  bool       `json:"read_only,omitempty"`
	QoS       qos.Limits `json:"qos"`
	// Set by the daemon; ignored in a create.
	CreatedAt time.Time `json:"created_at"`
	// Attachment is set while the volume is a kernel block device; a
	// create ignores it.
	Attachment *Attachment `json:"attachment,omitempty"`
	// Repl is the number of copies of the volume's data, this node's
	// included: 1 (the default) to 3.
	Repl int `json:"repl,omitempty"`
	// Nodes, in a create, names the nodes that hold the other copies
	// (default: the peers with the most free space); in a cluster, the
	// nodes that hold every copy.
	Nodes []string `json:"nodes,omitempty"`
	// Zones, in a create in a cluster, restricts the copies to nodes
	// with these zone labels (spread over them).
	Zones []string `json:"zones,omitempty"`
	// Cluster is the id of the cluster whose store holds the volume; a
	// node's own volumes (no cluster) have none. The daemon sets it.
	Cluster string `json:"cluster,omitempty"`
	// Replication is the state of a replicated volume (Repl > 1) and of
	// a replica, as this node knows it; the daemon sets it.
	Replication *Replication `json:"replication,omitempty"`
}

// Roles of a node for a replicated volume.
const (
	RoleOwner   = "owner"   // serves the frontends and sends every write to the replicas
	RoleReplica = "replica" // holds a copy; serves no frontend
)

// Replication is a replicated volume's state as one node knows it. The
// owner persists it before it acknowledges any write that a change of the
// in-sync set affects; a replica persists the highest epoch it has seen
// before it answers.
type Replication struct {
	Role  string `json:"role"`
	Owner string `json:"owner"`
	// Epoch is the owner's term: it only grows, and a replica refuses
	// messages of a lower one.
	Epoch uint64 `json:"epoch"`
	// Generation changes whenever the in-sync set does; a replica that
	// holds the newest generation has every acknowledged write.
	Generation uint64 `json:"generation"`
	// Replicas are the other copies: on the owner with their membership
	// of the in-sync set, on a replica as the owner last told it.
	Replicas []Replica `json:"replicas"`
}

// Replica is one copy of a replicated volume, other than the owner's.
type Replica struct {
	Node   string `json:"node"`
	InSync bool   `json:"in_sync"`
	// Compare: the copy's history is unknown (a new node, a lost
	// bitmap, an owner crash with writes in flight), so its resync
	// compares region checksums instead of trusting a bitmap.
	Compare bool `json:"compare,omitempty"`
}

// Replica states in ReplicaStatus.
const (
	ReplicaInSync      = "in-sync"     // receives every write; acknowledged writes are on it
	ReplicaResyncing   = "resyncing"   // receives every write and the regions it missed
	ReplicaOutOfSync   = "out-of-sync" // reachable but behind, waiting for a resync
	ReplicaUnreachable = "unreachable" // not answering; its missed regions are recorded
)

// ReplicaStatus is a copy's live state on the owner.
type ReplicaStatus struct {
	Node  string `json:"node"`
	State string `json:"state"`
	// Resync progress: regions left of the regions to copy, bytes left,
	// the rate of the last seconds and the time left at that rate.
	ResyncPercent float64 `json:"resync_percent,omitempty"`
	BytesLeft     int64   `json:"bytes_left,omitempty"`
	RateBytes     int64   `json:"rate_bytes_per_second,omitempty"`
	ETASeconds    float64 `json:"eta_seconds,omitempty"`
	LastError     string  `json:"last_error,omitempty"`
	// CopiedBytes is what resyncs sent this replica since the daemon
	// started; ComparedBytes what they compared by checksum.
	CopiedBytes   int64 `json:"resync_copied_bytes"`
	ComparedBytes int64 `json:"resync_compared_bytes"`
	// DownSince is when the owner last lost the replica, while it
	// cannot reach it (a cluster replaces a replica down for longer than
	// its --replica-replace-after).
	DownSince time.Time `json:"down_since,omitzero"`
}

// Attachment records that a volume is exposed as a kernel block device. It
// is part of the volume's metadata, so a restarted daemon finds the device
// again and hands it new sockets.
type Attachment struct {
	Frontend    string `json:"frontend"` // FrontendNBD or FrontendUblk
	Device      string `json:"device"`   // /dev/nbdN, /dev/ublkbN
	Index       int    `json:"index"`
	Connections int    `json:"connections,omitempty"` // nbd sockets
	Queues      int    `json:"queues,omitempty"`      // ublk
	Depth       int    `json:"depth,omitempty"`       // ublk
	// Backend is the id an nbd device was connected with, as
	// /sys/block/nbdN/backend shows it: blockd:DAEMON:VOLUME, DAEMON
	// being the id in the daemon's state dir. The kernel reconfigures a
	// device only for the same id. Records of older daemons have none:
	// their devices carry blockd:VOLUME.
	Backend string `json:"backend,omitempty"`
}

// Volume states.
const (
	// StateOK: the volume serves I/O.
	StateOK = "ok"
	// StateFailed: the volume cannot serve I/O (Reason says why); it can
	// be deleted, nothing else.
	StateFailed = "failed"
)

// Volume is a volume as the API shows it.
type Volume struct {
	Spec
	SizeHuman string `json:"size_human"`
	// State is StateOK or StateFailed; Reason says why a volume failed,
	// or what the daemon did to it at its last start (a kernel device it
	// had to detach, say).
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
	// Path is the backing file (file engine only); Allocated is how much
	// of it is on disk.
	Path      string `json:"path,omitempty"`
	Allocated int64  `json:"allocated_bytes,omitempty"`
	// EffectiveProfile is the io_profile in force: Profile itself, or for
	// auto the behaviour it learned from the volume's recent I/O.
	EffectiveProfile string         `json:"effective_profile,omitempty"`
	ProfileStats     *profile.Stats `json:"profile_stats,omitempty"`
	// Replicas is the live state of a replicated volume's copies (owner
	// only).
	Replicas []ReplicaStatus `json:"replicas,omitempty"`
	// Placement is where a cluster volume lives, as the cluster store
	// says (absent for a node's own volumes).
	Placement *Placement `json:"placement,omitempty"`
}

// Placement is a cluster volume's place in the cluster.
type Placement struct {
	// Nodes hold a copy each; InSync are those with every acknowledged
	// write, the only ones that may become owner.
	Nodes  []string `json:"nodes"`
	InSync []string `json:"in_sync"`
	// Owner serves the volume now, at Epoch ("" and 0: no node does; the
	// first frontend that needs it takes it).
	Owner      string `json:"owner,omitempty"`
	Epoch      uint64 `json:"epoch,omitempty"`
	Generation uint64 `json:"generation"`
	// Attached names the kernel device of the volume ("node:/dev/nbd0").
	Attached string `json:"attached,omitempty"`
	// LastFailover is the last change of owner.
	LastFailover *Failover `json:"last_failover,omitempty"`
}

// Failover is a change of a cluster volume's owner.
type Failover struct {
	From  string    `json:"from,omitempty"` // the previous owner ("" the first)
	To    string    `json:"to"`
	Epoch uint64    `json:"epoch"`
	At    time.Time `json:"at"`
	// Clean: the previous owner handed the volume over (volume move, a
	// daemon's shutdown) with nothing in flight; otherwise its lease
	// expired, and the new owner compared the copies.
	Clean bool `json:"clean"`
	// Waited is how long the new owner's frontend was refused before it
	// got the volume: about the old owner's lease, after a crash.
	Waited Duration `json:"waited,omitempty"`
	// By is what took the volume: "nbd", "attach", "move".
	By string `json:"by,omitempty"`
}

// Duration is a time.Duration that marshals as its text ("12.5s").
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	*d = Duration(v)
	return err
}

// Node states.
const (
	NodeReady       = "ready"       // its lease is alive in the cluster store
	NodeUnreachable = "unreachable" // registered once, its lease expired
)

// Node is a member of a cluster, as GET /v1/nodes shows it.
type Node struct {
	Name  string `json:"name"`
	State string `json:"state"`
	// Addr is where peers reach its transport; Labels include zone.
	Addr   string            `json:"addr"`
	Labels map[string]string `json:"labels,omitempty"`
	// Capacity and Free are its state dir's file system.
	Capacity int64 `json:"capacity_bytes"`
	Free     int64 `json:"free_bytes"`
	// Volumes counts the volumes with a copy on it, Owned those it serves.
	Volumes int    `json:"volumes"`
	Owned   int    `json:"owned"`
	Version string `json:"version,omitempty"`
	// Since is when it joined (ready) or was last heard of (unreachable).
	Since time.Time `json:"since"`
}

// MoveRequest is the body of POST /v1/volumes/{name}/move.
type MoveRequest struct {
	To string `json:"to"`
}

// PromoteRequest is the body of POST /v1/volumes/{name}/promote.
type PromoteRequest struct {
	// Force promotes even when a reachable copy holds a newer generation
	// or a reachable node still owns the volume: acknowledged writes may
	// be lost.
	Force bool `json:"force,omitempty"`
}

// VerifyResult is the answer of POST /v1/volumes/{name}/verify: each
// in-sync replica compared with the owner's copy, region by region.
type VerifyResult struct {
	Volume   string          `json:"volume"`
	OK       bool            `json:"ok"` // every replica compared, none differs
	Replicas []ReplicaVerify `json:"replicas"`
}

// ReplicaVerify is one replica's comparison.
type ReplicaVerify struct {
	Node     string  `json:"node"`
	State    string  `json:"state"`
	Compared int64   `json:"compared_bytes"`
	Region   int64   `json:"region_bytes"`
	Differ   []int64 `json:"differing_regions,omitempty"` // region numbers: bytes [n*region_bytes, (n+1)*region_bytes)
	Error    string  `json:"error,omitempty"`
}

// ResizeRequest is the body of POST /v1/volumes/{name}/resize.
type ResizeRequest struct {
	Size Size `json:"size"`
}

// UpdateRequest is the body of PATCH /v1/volumes/{name}; absent fields
// stay as they are.
type UpdateRequest struct {
	Profile  *string `json:"profile,omitempty"`
	ReadOnly *bool   `json:"read_only,omitempty"`
	// QoS is decoded onto the volume's current limits: the settings it
	// names change (0 or "none" clears one), the others stay. Keys and
	// values as in Spec.QoS ({"iops_limit": "5k", "bps_limit": "200MiB"}).
	QoS json.RawMessage `json:"qos,omitempty"`
}

// QoSChange builds UpdateRequest.QoS from setting names and values.
func QoSChange(set map[string]string) json.RawMessage {
	if len(set) == 0 {
		return nil
	}
	b, _ := json.Marshal(set) // a map of strings always marshals
	return b
}

// AttachRequest is the body of POST /v1/volumes/{name}/attach.
type AttachRequest struct {
	Frontend    string `json:"frontend,omitempty"`    // FrontendNBD (default) or FrontendUblk
	Connections int    `json:"connections,omitempty"` // nbd: 0 = one per CPU, at most 8
	Queues      int    `json:"queues,omitempty"`      // ublk: 0 = one per CPU, at most 4
	Depth       int    `json:"depth,omitempty"`       // ublk: 0 = 64
}

// Size is a byte count: it marshals as a number and unmarshals from a
// number or a string with units ("10GiB").
type Size int64

// UnmarshalJSON implements json.Unmarshaler.
func (s *Size) UnmarshalJSON(b []byte) error {
	var n int64
	if err := json.Unmarshal(b, &n); err == nil {
		if n < 0 {
			return fmt.Errorf("size %d is negative", n)
		}
		*s = Size(n)
		return nil
	}
	var str string
	if err := json.Unmarshal(b, &str); err != nil {
		return errors.New("size: want a byte count or a string such as \"1GiB\"")
	}
	n, err := units.ParseSize(str)
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// Code classifies an API error; each has its HTTP status.
type Code string

// Error codes.
const (
	CodeInvalid     Code = "invalid_argument" // 400: the request cannot succeed as written
	CodeNotFound    Code = "not_found"        // 404
	CodeExists      Code = "already_exists"   // 409
	CodeConflict    Code = "conflict"         // 409: not in the volume's current state
	CodeUnavailable Code = "unavailable"      // 503: the daemon cannot do it now (shutting down, no kernel driver)
	CodeInternal    Code = "internal"         // 500
)

// Status is the HTTP status of c.
func (c Code) Status() int {
	switch c {
	case CodeInvalid:
		return http.StatusBadRequest
	case CodeNotFound:
		return http.StatusNotFound
	case CodeExists, CodeConflict:
		return http.StatusConflict
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// Error is the body of every failed API call, and the error the daemon's
// packages return when the cause has a code. Its text is for people: it
// says what failed and why, without a code prefix.
type Error struct {
	Message string `json:"error"`
	Code    Code   `json:"code"`
	err     error
}

func (e *Error) Error() string { return e.Message }
func (e *Error) Unwrap() error { return e.err }

// Errorf returns an *Error with code and a message formatted as by
// fmt.Errorf (%w wraps).
func Errorf(code Code, format string, a ...any) error {
	err := fmt.Errorf(format, a...)
	return &Error{Message: err.Error(), Code: code, err: errors.Unwrap(err)}
}

// CodeOf returns the code of the first *Error in err's chain, CodeInternal
// if there is none.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// IsCode reports whether err carries code.
func IsCode(err error, code Code) bool { return err != nil && CodeOf(err) == code }

package daemon

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/metrics"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/transport"
	"github.com/blockd/blockd/volume"
)

// ReplicationConfig joins a daemon to its peers for replication. A daemon
// without a Node name replicates nothing and answers no peer.
type ReplicationConfig struct {
	Node   string            // this node's name, as in its certificate
	Listen string            // UDP address for peers, e.g. ":10810"
	Peers  map[string]string // node name -> UDP address
	// TLS: the cluster CA and this node's certificate and key (PEM).
	CAFile, CertFile, KeyFile string
	// Timeout and LastTimeout bound a replica's answer (see
	// replication.Node); 0 takes the defaults.
	Timeout, LastTimeout time.Duration
	// ResyncRate caps the bytes per second all resyncs of the node copy
	// together, ResyncMinRate while application I/O competes (0: no cap,
	// no lowering).
	ResyncRate, ResyncMinRate int64
}

// startTransport brings up the QUIC transport to the peers. Its handler
// answers StatusShutdown until the volume registry exists.
func (d *Daemon) startTransport() error {
	rc := d.cfg.Replication
	ca, cert, err := transport.LoadTLS(rc.CAFile, rc.CertFile, rc.KeyFile)
	if err != nil {
		return fmt.Errorf("replication TLS: %w", err)
	}
	key, err := os.ReadFile(rc.KeyFile)
	if err != nil {
		return fmt.Errorf("replication TLS: %w", err)
	}
	secret := sha256.Sum256(append([]byte("blockd stateless reset "+rc.Node), key...))
	d.replHandler = &replHandler{}
	d.transport, err = transport.New(transport.Config{
		Node: rc.Node, Listen: rc.Listen, Peers: rc.Peers, CA: ca, Cert: cert,
		ResetKeySecret: secret[:], Handler: d.replHandler, Logger: d.log.With("component", "transport"),
	})
	if err != nil {
		return fmt.Errorf("replication transport: %w", err)
	}
	d.log.Info("replication transport", "node", rc.Node, "listen", d.transport.Addr().String(), "peers", len(rc.Peers))
	return nil
}

// replicationNode is what every replicated volume of the daemon shares.
func (d *Daemon) replicationNode() *replication.Node {
	rc := d.cfg.Replication
	var peers []string
	for p := range rc.Peers {
		peers = append(peers, p)
	}
	slices.Sort(peers)
	lat := metrics.ReplicationLatency(d.reg)
	return &replication.Node{
		Name: rc.Node, Net: replNet{d.transport}, PeerNames: peers,
		Timeout: rc.Timeout, LastTimeout: rc.LastTimeout,
		Resync: replication.NewLimiter(rc.ResyncRate, rc.ResyncMinRate),
		Log:    d.log.With("component", "replication"),
		Latency: func(volume, replica string) replication.Observer {
			return lat.WithLabelValues(volume, replica)
		},
	}
}

// replicatedVolumes reports the replicated volumes for metrics.
func (d *Daemon) replicatedVolumes() []metrics.ReplicatedVolume {
	var out []metrics.ReplicatedVolume
	for _, v := range d.volumes.Volumes() {
		s := v.Spec()
		if s.Replication == nil {
			continue
		}
		out = append(out, metrics.ReplicatedVolume{Name: s.Name, State: *s.Replication, Replicas: v.ReplicaStatus(), Copied: v.ResyncCopied()})
	}
	return out
}

// fenced cuts a fenced volume's frontends off: another node owns it now,
// and nothing this node does with it may be acknowledged.
func (d *Daemon) fenced(v *volume.Volume) {
	if d.nbd == nil || d.devices == nil {
		return // fenced while the daemon starts: nothing serves it yet
	}
	if n := d.nbd.Disconnect(v); n > 0 {
		d.log.Warn("closed the NBD connections of a fenced volume", "volume", v.Name(), "connections", n)
	}
	if a := v.Spec().Attachment; a != nil {
		if _, err := d.devices.Detach(v.Name()); err != nil {
			d.log.Error("detaching the kernel device of a fenced volume", "volume", v.Name(), "device", a.Device, "err", err)
		} else {
			d.log.Warn("detached the kernel device of a fenced volume; its I/O failed", "volume", v.Name(), "device", a.Device)
		}
	}
}

// replNet carries replication messages over the transport.
type replNet struct {
	t *transport.Transport
}

// headers hold a call's two transport headers, so that converting a
// message costs no allocation.
var headers = sync.Pool{New: func() any { return new([2]transport.Header) }}

func toHeader(h *transport.Header, m *replication.Msg) {
	*h = transport.Header{Type: m.Type, Volume: m.Volume, Epoch: m.Epoch, Seq: m.Seq, Gen: m.Gen,
		Offset: m.Offset, Length: m.Length, Flags: m.Flags, Status: m.Status}
}

func toMsg(m *replication.Msg, h *transport.Header) {
	*m = replication.Msg{Type: h.Type, Volume: h.Volume, Epoch: h.Epoch, Seq: h.Seq, Gen: h.Gen,
		Offset: h.Offset, Length: h.Length, Flags: h.Flags, Status: h.Status}
}

// Call implements replication.Network. An answer with a replication
// status is an answer (err nil, resp.Status set); the transport's own
// failures are errors.
func (n replNet) Call(ctx context.Context, peer string, timeout time.Duration, req *replication.Msg, payload []byte, resp *replication.Msg, respBuf []byte) ([]byte, error) {
	hs := headers.Get().(*[2]transport.Header)
	defer headers.Put(hs)
	toHeader(&hs[0], req)
	out, err := n.t.CallTimeout(ctx, peer, timeout, &hs[0], payload, &hs[1], respBuf)
	var se *transport.StatusError
	if err != nil && !(errors.As(err, &se) && se.Status < transport.StatusTransportBase) {
		return nil, err
	}
	toMsg(resp, &hs[1])
	return out, nil
}

// pendingCall is a started call's transport state, pooled.
type pendingCall struct {
	hdr [2]transport.Header
	pd  transport.Pending
}

var pendingCalls = sync.Pool{New: func() any { return new(pendingCall) }}

// Send implements replication.Network: the request is queued to go out.
func (n replNet) Send(ctx context.Context, peer string, timeout time.Duration, req *replication.Msg, payload []byte, t *replication.Ticket) {
	pc := pendingCalls.Get().(*pendingCall)
	toHeader(&pc.hdr[0], req)
	pc.pd = n.t.Start(ctx, peer, timeout, &pc.hdr[0], payload, &pc.hdr[1], nil)
	t.State = pc
}

// Receive implements replication.Network.
func (n replNet) Receive(t *replication.Ticket, resp *replication.Msg) error {
	pc := t.State.(*pendingCall)
	t.State = nil
	defer func() {
		pc.pd = transport.Pending{}
		pendingCalls.Put(pc)
	}()
	_, err := pc.pd.Wait()
	var se *transport.StatusError
	if err != nil && !(errors.As(err, &se) && se.Status < transport.StatusTransportBase) {
		return err
	}
	toMsg(resp, &pc.hdr[1])
	return nil
}

// replHandler serves the peers' messages with the replica service, once
// there is one.
type replHandler struct {
	svc atomic.Pointer[replication.Service]
}

var msgs = sync.Pool{New: func() any { return new([2]replication.Msg) }}

// ServeMessage implements transport.Handler.
func (h *replHandler) ServeMessage(ctx context.Context, peer string, req *transport.Header, payload []byte, resp *transport.Header) ([]byte, error) {
	s := h.svc.Load()
	if s == nil {
		resp.Status = uint16(replication.StatusShutdown)
		return nil, nil
	}
	ms := msgs.Get().(*[2]replication.Msg)
	defer msgs.Put(ms)
	toMsg(&ms[0], req)
	out, err := s.ServeMessage(ctx, peer, &ms[0], payload, &ms[1])
	toHeader(resp, &ms[1])
	return out, err
}

package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/blockd/blockd/probe/podio"
)

// SocketEnv names the environment variable client commands read the API
// socket from.
const SocketEnv = "BLOCKD_API_SOCKET"

// DefaultSocket is the API socket a client uses without a flag:
// $BLOCKD_API_SOCKET, else DefaultStateDir/blockd.sock.
func DefaultSocket() string {
	if s := os.Getenv(SocketEnv); s != "" {
		return s
	}
	return filepath.Join(DefaultStateDir, "blockd.sock")
}

// Timeout bounds one API call.
var Timeout = 60 * time.Second

// Client calls the control API of a running daemon over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
	long   *http.Client // no timeout: calls that read a whole volume
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{socket: socket, hc: &http.Client{Timeout: Timeout, Transport: tr}, long: &http.Client{Transport: tr}}
}

// Socket returns the socket the client talks to.
func (c *Client) Socket() string { return c.socket }

// do sends a request and decodes a JSON answer into out (if not nil).
func (c *Client) do(method, path string, in, out any) error {
	return c.doWith(c.hc, method, path, in, out)
}

func (c *Client) doWith(hc *http.Client, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://blockd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("reading blockd's answer: %w", err)
	}
	if resp.StatusCode >= 300 {
		var ae Error
		if json.Unmarshal(b, &ae) == nil && ae.Message != "" {
			return &ae
		}
		return fmt.Errorf("blockd answered %s", resp.Status)
	}
	if out != nil && len(b) > 0 {
		return json.Unmarshal(b, out)
	}
	return nil
}

// dialError turns a failure to reach the daemon into advice.
func (c *Client) dialError(err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return &Error{Code: CodeUnavailable, err: err, Message: fmt.Sprintf(
			"blockd is not running at %s (start it with `blockd serve`, or point --api-socket or $%s at a running one)", c.socket, SocketEnv)}
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return &Error{Code: CodeUnavailable, err: err, Message: fmt.Sprintf(
			"no permission to use blockd's API socket %s (it is mode 0600: run as the daemon's user, usually root)", c.socket)}
	case errors.Is(err, context.DeadlineExceeded), os.IsTimeout(err):
		return &Error{Code: CodeUnavailable, err: err, Message: fmt.Sprintf(
			"blockd at %s did not answer within %s", c.socket, Timeout)}
	}
	return &Error{Code: CodeUnavailable, err: err, Message: fmt.Sprintf("cannot reach blockd at %s: %v", c.socket, err)}
}

func volPath(name string) string { return "/v1/volumes/" + url.PathEscape(name) }

// Health checks that the daemon answers.
func (c *Client) Health() error { return c.do("GET", "/v1/health", nil, nil) }

// ListVolumes lists every volume, failed ones included.
func (c *Client) ListVolumes() ([]Volume, error) {
	var out []Volume
	return out, c.do("GET", "/v1/volumes", nil, &out)
}

// GetVolume returns one volume.
func (c *Client) GetVolume(name string) (Volume, error) {
	var out Volume
	return out, c.do("GET", volPath(name), nil, &out)
}

// CreateVolume creates a volume.
func (c *Client) CreateVolume(s Spec) (Volume, error) {
	var out Volume
	return out, c.do("POST", "/v1/volumes", s, &out)
}

// DeleteVolume deletes a volume and its data.
func (c *Client) DeleteVolume(name string) error {
	return c.do("DELETE", volPath(name), nil, nil)
}

// ResizeVolume grows a volume.
func (c *Client) ResizeVolume(name string, size int64) (Volume, error) {
	var out Volume
	return out, c.do("POST", volPath(name)+"/resize", ResizeRequest{Size: Size(size)}, &out)
}

// UpdateVolume changes a volume's settings.
func (c *Client) UpdateVolume(name string, req UpdateRequest) (Volume, error) {
	var out Volume
	return out, c.do("PATCH", volPath(name), req, &out)
}

// Attach exposes a volume as a kernel block device.
func (c *Client) Attach(name string, req AttachRequest) (Volume, error) {
	var out Volume
	return out, c.do("POST", volPath(name)+"/attach", req, &out)
}

// Detach removes a volume's kernel block device.
func (c *Client) Detach(name string) (Volume, error) {
	var out Volume
	return out, c.do("POST", volPath(name)+"/detach", struct{}{}, &out)
}

// Promote makes this node's replica of a volume its owner.
func (c *Client) Promote(name string, force bool) (Volume, error) {
	var out Volume
	return out, c.do("POST", volPath(name)+"/promote", PromoteRequest{Force: force}, &out)
}

// Move hands a cluster volume over to another node.
func (c *Client) Move(name, to string) (Volume, error) {
	var out Volume
	return out, c.doWith(c.long, "POST", volPath(name)+"/move", MoveRequest{To: to}, &out)
}

// Nodes lists the members of the daemon's cluster.
func (c *Client) Nodes() ([]Node, error) {
	var out []Node
	return out, c.do("GET", "/v1/nodes", nil, &out)
}

// Resync retries the replicas of a volume that are not in sync now.
func (c *Client) Resync(name string) (Volume, error) {
	var out Volume
	return out, c.do("POST", volPath(name)+"/resync", struct{}{}, &out)
}

// Verify compares every in-sync replica of a volume with the owner's copy.
func (c *Client) Verify(name string) (VerifyResult, error) {
	var out VerifyResult
	return out, c.doWith(c.long, "POST", volPath(name)+"/verify", struct{}{}, &out)
}

// IOPods returns the daemon's per-pod I/O snapshot (eBPF probes).
func (c *Client) IOPods() (podio.Snapshot, error) {
	var s podio.Snapshot
	return s, c.do("GET", "/v1/io/pods", nil, &s)
}

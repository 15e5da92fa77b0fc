package blockd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
)

// Client calls the control API of a running daemon over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, hc: &http.Client{
		Timeout: apiTimeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		},
	}}
}

// do sends a request and decodes a JSON answer into out (if not nil).
func (c *Client) do(method, path string, in, out any) error {
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
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach blockd at %s (is `blockd serve` running? set --api-socket or BLOCKD_API_SOCKET): %w", c.socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var ae APIError
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

func volPath(name string) string { return "/v1/volumes/" + url.PathEscape(name) }

// ListVolumes lists every volume.
func (c *Client) ListVolumes() ([]VolumeInfo, error) {
	var out []VolumeInfo
	return out, c.do("GET", "/v1/volumes", nil, &out)
}

// GetVolume returns one volume.
func (c *Client) GetVolume(name string) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("GET", volPath(name), nil, &out)
}

// CreateVolume creates a volume.
func (c *Client) CreateVolume(req CreateRequest) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("POST", "/v1/volumes", req, &out)
}

// DeleteVolume deletes a volume and its data.
func (c *Client) DeleteVolume(name string) error {
	return c.do("DELETE", volPath(name), nil, nil)
}

// ResizeVolume grows a volume.
func (c *Client) ResizeVolume(name string, size int64) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("POST", volPath(name)+"/resize", ResizeRequest{Size: Size(size)}, &out)
}

// UpdateVolume changes a volume's settings.
func (c *Client) UpdateVolume(name string, req UpdateRequest) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("PATCH", volPath(name), req, &out)
}

// Attach exposes a volume as a kernel block device.
func (c *Client) Attach(name string, req AttachRequest) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("POST", volPath(name)+"/attach", req, &out)
}

// Detach removes a volume's kernel block device.
func (c *Client) Detach(name string) (VolumeInfo, error) {
	var out VolumeInfo
	return out, c.do("POST", volPath(name)+"/detach", struct{}{}, &out)
}

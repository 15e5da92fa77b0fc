package e2e

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cli"
)

// TestMain lets the test binary double as the blockd binary, so tests can
// run the daemon as a real process and kill -9 it.
func TestMain(m *testing.M) {
	if os.Getenv("BLOCKD_TEST_AS_DAEMON") == "1" {
		os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// daemonProc is blockd running as a child process.
type daemonProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	dir     string
	nbdAddr string
	sock    string
	log     *syncBuffer
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// serveCmd is `blockd serve` on dir with flags, as this test binary. These
// tests serve volumes over the network only: --kernel-devices=false keeps
// the daemon from loading modules or recovering (and cleaning up) the
// host's nbd and ublk devices.
func serveCmd(dir string, flags ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"serve", "--state-dir", dir, "--kernel-devices=false"}, flags...)...)
	cmd.Env = append(os.Environ(), "BLOCKD_TEST_AS_DAEMON=1")
	return cmd
}

// startDaemon runs `blockd serve` on dir and waits until its API answers.
func startDaemon(t *testing.T, dir, nbdAddr string) *daemonProc {
	t.Helper()
	d := &daemonProc{t: t, dir: dir, nbdAddr: nbdAddr, sock: filepath.Join(dir, "blockd.sock"), log: &syncBuffer{}}
	d.cmd = serveCmd(dir, "--nbd-listen", nbdAddr, "--metrics-listen", "")
	d.cmd.Stdout = d.log
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill()
			d.cmd.Wait()
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := api.NewClient(d.sock).ListVolumes(); err == nil {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up in 20s; log:\n%s", d.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (d *daemonProc) stop() {
	d.t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		d.t.Fatalf("blockd exited with %v after SIGTERM:\n%s", err, d.log)
	}
}

func (d *daemonProc) kill9() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
}

func (d *daemonProc) client() *api.Client { return api.NewClient(d.sock) }

func (d *daemonProc) uri(vol string) string { return "nbd://" + d.nbdAddr + "/" + vol }

func need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed (make deps installs it)", tool)
			}
			t.Skipf("%s not installed; run make deps", tool)
		}
	}
}

// qemuIO runs qemu-io commands against an NBD export and fails on error.
func qemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	return qemuIOWith(t, "writethrough", uri, cmds...)
}

// qemuIOWriteback is qemuIO with qemu's write-back cache mode: writes are
// not FUA, flushes are explicit (qemu-io's default, writethrough, makes
// every write FUA).
func qemuIOWriteback(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	return qemuIOWith(t, "writeback", uri, cmds...)
}

func qemuIOWith(t *testing.T, cache, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw", "--cache=" + cache}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	s := string(out)
	if err != nil || strings.Contains(s, "Pattern verification failed") || strings.Contains(s, "failed:") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, s)
	}
	return s
}

func TestCrashSafeMetadata(t *testing.T) {
	dir := t.TempDir()
	addr := freePort(t)
	d := startDaemon(t, dir, addr)
	if _, err := d.client().CreateVolume(api.Spec{Name: "a", Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	d.kill9() // right after create returned
	d = startDaemon(t, dir, addr)
	vi, err := d.client().GetVolume("a")
	if err != nil || vi.Size != 64<<20 {
		t.Fatalf("after kill -9 following create: %+v, %v", vi, err)
	}
	if _, err := d.client().ResizeVolume("a", 128<<20); err != nil {
		t.Fatal(err)
	}
	d.kill9() // right after resize returned
	d = startDaemon(t, dir, addr)
	vi, err = d.client().GetVolume("a")
	if err != nil || vi.Size != 128<<20 {
		t.Fatalf("after kill -9 following resize: %+v, %v", vi, err)
	}
	if err := d.client().DeleteVolume("a"); err != nil {
		t.Fatal(err)
	}
	d.kill9()
	d = startDaemon(t, dir, addr)
	if _, err := d.client().GetVolume("a"); err == nil {
		t.Fatal("deleted volume came back after kill -9")
	}
}

func TestFlushedDataSurvivesKill9(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	addr := freePort(t)
	d := startDaemon(t, dir, addr)
	if _, err := d.client().CreateVolume(api.Spec{Name: "durable", Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, d.uri("durable"), "write -P 0x5a 0 4M", "write -P 0xc3 60M 1M", "flush")
	d.kill9()
	d = startDaemon(t, dir, addr)
	qemuIO(t, d.uri("durable"), "read -P 0x5a 0 4M", "read -P 0xc3 60M 1M", "read -P 0 4M 56M")
}

func TestSIGTERMDrainsAndExitsZero(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	d := startDaemon(t, dir, freePort(t))
	if _, err := d.client().CreateVolume(api.Spec{Name: "v", Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, d.uri("v"), "write -P 0x11 0 1M")
	d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- d.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("blockd exited with %v after SIGTERM", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("blockd did not exit within 30s of SIGTERM")
	}
	if !strings.Contains(d.log.String(), "stopped cleanly") {
		t.Fatalf("no clean-stop log line:\n%s", d.log)
	}
	for _, p := range []string{d.sock, filepath.Join(dir, "nbd.sock")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left behind after shutdown", p)
		}
	}
}

func TestSecondDaemonRefused(t *testing.T) {
	dir := t.TempDir()
	startDaemon(t, dir, freePort(t))
	out, err := serveCmd(dir, "--nbd-listen", freePort(t), "--metrics-listen", "").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "in use by another blockd") {
		t.Fatalf("second daemon on the same state dir: %v\n%s", err, out)
	}
}

func TestMetricsEndpoint(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	metricsAddr := freePort(t)
	d := &daemonProc{t: t, dir: dir, nbdAddr: freePort(t), sock: filepath.Join(dir, "blockd.sock"), log: &syncBuffer{}}
	d.cmd = serveCmd(dir, "--nbd-listen", d.nbdAddr, "--metrics-listen", metricsAddr)
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { d.cmd.Process.Kill(); d.cmd.Wait() }()
	for i := 0; ; i++ {
		if _, err := d.client().ListVolumes(); err == nil {
			break
		}
		if i > 1000 {
			t.Fatalf("daemon did not start:\n%s", d.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := d.client().CreateVolume(api.Spec{Name: "m", Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, d.uri("m"), "write 0 1M", "read 0 512k", "flush")
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && strings.Contains(f[0], `volume="m"`) {
			got[f[0]] = f[1]
		}
	}
	for k, want := range map[string]float64{
		`blockd_volume_write_bytes_total{volume="m"}`: 1 << 20,
		`blockd_volume_read_bytes_total{volume="m"}`:  512 << 10,
		`blockd_volume_size_bytes{volume="m"}`:        16 << 20,
		`blockd_volume_inflight_requests{volume="m"}`: 0,
	} {
		if v, err := strconv.ParseFloat(got[k], 64); err != nil || v != want {
			t.Errorf("%s = %q, want %v", k, got[k], want)
		}
	}
	if got[`blockd_volume_flushes_total{volume="m"}`] == "" || got[`blockd_volume_flushes_total{volume="m"}`] == "0" {
		t.Errorf("no flush counted: %v", got)
	}
	if got[`blockd_volume_request_duration_seconds_count{op="write",volume="m"}`] == "" {
		t.Errorf("no write latency histogram: %v", got)
	}
}

// TestServeProcs: --gomaxprocs sets the scheduler slots, the log says how
// many there are, and a negative count is refused.
func TestServeProcs(t *testing.T) {
	if out, err := serveCmd(t.TempDir(), "--gomaxprocs", "-1").CombinedOutput(); err == nil || !strings.Contains(string(out), "--gomaxprocs -1") {
		t.Fatalf("serve --gomaxprocs -1: %v\n%s", err, out)
	}

	dir := t.TempDir()
	logPath := filepath.Join(dir, "log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := serveCmd(dir, "--nbd-listen", freePort(t), "--metrics-listen", "", "--gomaxprocs", "5")
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var log []byte
	for i := 0; !bytes.Contains(log, []byte("blockd ready")); i++ {
		if i > 1000 {
			t.Fatalf("daemon did not start:\n%s", log)
		}
		time.Sleep(20 * time.Millisecond)
		log, _ = os.ReadFile(logPath)
	}
	if !bytes.Contains(log, []byte(`msg="scheduler slots" gomaxprocs=5 cpus=`)) {
		t.Fatalf("daemon log does not report --gomaxprocs 5:\n%s", log)
	}
}

// TestKernelDevicesOff: `serve --kernel-devices=false` says so at start,
// refuses attach and detach with a message that names the flag, and
// serves the volume over NBD all the same.
func TestKernelDevicesOff(t *testing.T) {
	need(t, "qemu-io")
	d := startDaemon(t, t.TempDir(), freePort(t))
	if _, err := d.client().CreateVolume(api.Spec{Name: "k", Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, op := range []func(string) (api.Volume, error){
		func(n string) (api.Volume, error) { return d.client().Attach(n, api.AttachRequest{}) },
		func(n string) (api.Volume, error) { return d.client().Detach(n) },
	} {
		_, err := op("k")
		if !api.IsCode(err, api.CodeUnavailable) || !strings.Contains(err.Error(), "--kernel-devices=false") {
			t.Errorf("attach/detach without kernel devices: %v, want unavailable naming --kernel-devices=false", err)
		}
	}
	qemuIO(t, d.uri("k"), "write -P 7 0 64k", "read -P 7 0 64k")
	d.kill9() // the log is complete once the process is reaped
	if !strings.Contains(d.log.String(), "kernel devices off") {
		t.Errorf("daemon log does not say kernel devices are off:\n%s", d.log)
	}
}

// syncBuffer is a bytes.Buffer the daemon's output goroutine writes while
// the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
)

// Interop tests run real NBD clients (libnbd's nbdinfo/nbdsh, qemu-img,
// qemu-io, fio's nbd engine) against an in-process server backed by the
// file engine. A missing client is a skip on a developer machine and a
// failure when CI=true.

func need(t *testing.T, bin string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed (CI=true): %v", bin, err)
		}
		t.Skipf("%s not installed", bin)
	}
	return p
}

// run executes a client with a deadline and returns its combined output.
func run(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runErr(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// runErr is run for commands expected to fail.
func runErr(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// nbdsh runs "python3" from PATH; the libnbd bindings live in the
	// system interpreter, which another python earlier in PATH may shadow.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	return out.String(), err
}

type fileExports struct {
	exps exportSet
	addr string
	uri  func(name string) string
}

// fileServer serves three file-engine exports in t.TempDir: "disk"
// (64 MiB), "small" (1 MiB) and "ro" (4 MiB, read-only).
func fileServer(t *testing.T) fileExports {
	t.Helper()
	dir := t.TempDir()
	mk := func(name string, size int64, ro bool) Export {
		f, err := ioengine.OpenFile(filepath.Join(dir, name), size)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		e := &mappedExport{testExport: &testExport{Handler: ioengine.Handler(f), ro: ro, desc: name + " volume"}}
		e.size.Store(size)
		e.setMap(f.Map) // BLOCK_STATUS reports the file's holes
		return e
	}
	exps := exportSet{
		"disk":  mk("disk", 64<<20, false),
		"small": mk("small", 1<<20, false),
		"ro":    mk("ro", 4<<20, true),
	}
	_, addr := startServer(t, exps, Options{})
	return fileExports{exps: exps, addr: addr, uri: func(name string) string {
		return "nbd://" + addr + "/" + name
	}}
}

func TestInteropNbdinfoList(t *testing.T) {
	bin := need(t, "nbdinfo")
	fs := fileServer(t)
	out := run(t, time.Minute, bin, "--list", "--json", "nbd://"+fs.addr)
	var doc struct {
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	got := map[string]int64{}
	for _, e := range doc.Exports {
		got[e.Name] = e.Size
	}
	want := map[string]int64{"disk": 64 << 20, "small": 1 << 20, "ro": 4 << 20}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("exports %v, want %v\n%s", got, want, out)
	}
	// The human-readable listing names every export too.
	text := run(t, time.Minute, bin, "--list", "nbd://"+fs.addr)
	for name := range want {
		if !strings.Contains(text, "export=\""+name+"\"") && !strings.Contains(text, "export=\""+name) {
			t.Fatalf("nbdinfo --list lacks %q:\n%s", name, text)
		}
	}
}

func TestInteropNbdinfoJSON(t *testing.T) {
	bin := need(t, "nbdinfo")
	fs := fileServer(t)
	out := run(t, time.Minute, bin, "--json", fs.uri("disk"))
	var doc struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Exports) != 1 {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	e := doc.Exports[0]
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"} {
		if e[k] != true {
			t.Errorf("%s = %v, want true", k, e[k])
		}
	}
	if e["is_read_only"] != false {
		t.Errorf("is_read_only = %v", e["is_read_only"])
	}
	if sz, _ := e["export-size"].(float64); sz != 64<<20 {
		t.Errorf("export-size %v", e["export-size"])
	}
	if e["description"] != "disk volume" {
		t.Errorf("description %v", e["description"])
	}
	if t.Failed() {
		t.Log(out)
	}

	// base:allocation through libnbd: the fresh sparse file is one hole
	// (TestInteropBlockStatus maps data too).
	out = run(t, time.Minute, bin, "--map", fs.uri("disk"))
	if f := strings.Fields(out); len(f) != 4 || f[0] != "0" || f[1] != "67108864" || f[2] != "3" {
		t.Fatalf("nbdinfo --map:\n%s", out)
	}

	out = run(t, time.Minute, bin, "--json", fs.uri("ro"))
	if !strings.Contains(out, `"is_read_only": true`) {
		t.Fatalf("read-only export not reported read-only:\n%s", out)
	}
}

func TestInteropQemuImgConvert(t *testing.T) {
	qimg := need(t, "qemu-img")
	fs := fileServer(t)
	src := filepath.Join(t.TempDir(), "src.raw")
	data := make([]byte, 64<<20)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, 2*time.Minute, qimg, "convert", "-n", "-f", "raw", "-O", "raw", src, fs.uri("disk"))
	out := run(t, 2*time.Minute, qimg, "compare", "-f", "raw", "-F", "raw", src, fs.uri("disk"))
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare:\n%s", out)
	}
	// The comparison can fail: change one byte on the export.
	run(t, time.Minute, need(t, "qemu-io"), "-f", "raw", "-c", "write -P 0x5a 12345 1", fs.uri("disk"))
	out, err := runErr(2*time.Minute, qimg, "compare", "-f", "raw", "-F", "raw", src, fs.uri("disk"))
	if err == nil || !strings.Contains(out, "Content mismatch") {
		t.Fatalf("compare after corruption: %v\n%s", err, out)
	}
}

// TestInteropBlockStatus: qemu-img map and nbdinfo --map see the holes of
// a sparse file export through BLOCK_STATUS (base:allocation), and a
// qemu-img convert out of it writes only the data back.
func TestInteropBlockStatus(t *testing.T) {
	qimg := need(t, "qemu-img")
	nbdinfo := need(t, "nbdinfo")
	fs := fileServer(t)
	const mib = 1 << 20
	run(t, time.Minute, need(t, "qemu-io"), "-f", "raw",
		"-c", "write -P 0x11 4M 1M", "-c", "write -P 0x22 40M 64k", "-c", "flush", fs.uri("disk"))

	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	out := run(t, time.Minute, qimg, "map", "--output=json", "-f", "raw", fs.uri("disk"))
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	type span struct {
		start, end int64
		data       bool
	}
	want := []span{{0, 4 * mib, false}, {4 * mib, 5 * mib, true}, {5 * mib, 40 * mib, false},
		{40 * mib, 40*mib + 64<<10, true}, {40*mib + 64<<10, 64 * mib, false}}
	var got []span
	for _, x := range m {
		if x.Data == x.Zero && !x.Data {
			t.Fatalf("qemu-img map: extent neither data nor zero: %+v", x)
		}
		if k := len(got); k > 0 && got[k-1].data == x.Data && got[k-1].end == x.Start {
			got[k-1].end += x.Length
			continue
		}
		got = append(got, span{x.Start, x.Start + x.Length, x.Data})
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("qemu-img map: %v, want %v\n%s", got, want, out)
	}

	out = run(t, time.Minute, nbdinfo, "--map", fs.uri("disk"))
	words := strings.Join(strings.Fields(out), " ")
	if !strings.HasPrefix(words, fmt.Sprintf("0 %d 3 hole,zero %d %d 0 data ", 4*mib, 4*mib, mib)) {
		t.Fatalf("nbdinfo --map does not show a 4 MiB hole, then the 1 MiB written at 4 MiB as data:\n%s", out)
	}

	// A copy out of the export keeps the data and the holes.
	dst := filepath.Join(t.TempDir(), "copy.raw")
	run(t, 2*time.Minute, qimg, "convert", "-f", "raw", "-O", "raw", fs.uri("disk"), dst)
	out = run(t, 2*time.Minute, qimg, "compare", "-f", "raw", "-F", "raw", dst, fs.uri("disk"))
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare of the copy:\n%s", out)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 4*mib {
		t.Errorf("the copy of 1.06 MiB of data in a 64 MiB export uses %d bytes: holes were copied as data", used)
	}
}

func TestInteropQemuIO(t *testing.T) {
	qio := need(t, "qemu-io")
	fs := fileServer(t)
	out := run(t, time.Minute, qio, "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -P 0xcd 1M 64k",
		"-c", "write -P 0x11 5000 3000",
		"-c", "aio_write -P 0x22 8M 256k",
		"-c", "aio_flush",
		"-c", "write -z 2M 1M",
		"-c", "discard 4M 1M",
		"-c", "flush",
		"-c", "read -P 0xab 0 4096",
		"-c", "read -P 0x11 5000 3000",
		"-c", "read -P 0xab 8000 1040384",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "read -P 0x22 8M 256k",
		"-c", "read -P 0 2M 1M",
		"-c", "read -P 0 4M 1M",
		fs.uri("disk"))
	if strings.Contains(out, "fail") || strings.Contains(out, "error") || strings.Count(out, "read ") != 7 {
		t.Fatalf("qemu-io:\n%s", out)
	}
	// A wrong pattern is detected, so the checks above mean something.
	out, err := runErr(time.Minute, qio, "-f", "raw", "-c", "read -P 0xab 1M 4k", fs.uri("disk"))
	if err == nil || !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("wrong pattern not detected:\n%s", out)
	}
}

// memoryServer serves "disk", a 64 MiB memory-engine export that lends
// its memory for reads and lets the reader run reads and writes inline
// (the daemon's memory volumes).
func memoryServer(t *testing.T) fileExports {
	t.Helper()
	e, _ := memExport(t, 64<<20)
	exps := exportSet{"disk": &inlineExport{testExport: e}}
	_, addr := startServer(t, exps, Options{})
	return fileExports{exps: exps, addr: addr, uri: func(name string) string {
		return "nbd://" + addr + "/" + name
	}}
}

// servers runs fn against the file-engine server and the inline memory
// server.
func servers(t *testing.T, fn func(t *testing.T, fs fileExports)) {
	t.Run("file", func(t *testing.T) { fn(t, fileServer(t)) })
	t.Run("memory-inline", func(t *testing.T) { fn(t, memoryServer(t)) })
}

func TestInteropFio(t *testing.T) {
	bin := need(t, "fio")
	servers(t, func(t *testing.T, fs fileExports) { interopFio(t, bin, fs) })
}

func interopFio(t *testing.T, bin string, fs fileExports) {
	out := run(t, 3*time.Minute, bin,
		"--name=verify", "--ioengine=nbd", "--uri="+fs.uri("disk"),
		"--rw=randwrite", "--bsrange=4k-128k", "--numjobs=4",
		"--size=16m", "--offset_increment=16m", "--iodepth=16",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
		"--runtime=120", "--output-format=json")
	var doc struct {
		Jobs []struct {
			Name  string `json:"jobname"`
			Error int    `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if i := strings.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if len(doc.Jobs) != 4 {
		t.Fatalf("%d jobs\n%s", len(doc.Jobs), out)
	}
	for _, j := range doc.Jobs {
		if j.Error != 0 || j.Write.IOBytes != 16<<20 || j.Read.IOBytes != 16<<20 {
			t.Fatalf("job %s: error %d wrote %d verified %d", j.Name, j.Error, j.Write.IOBytes, j.Read.IOBytes)
		}
	}
}

func TestInteropNbdsh(t *testing.T) {
	bin := need(t, "nbdsh")
	fs := fileServer(t)
	script := fmt.Sprintf(`
import errno, nbd

def expect(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, "got errno %%r (%%s), want %%d" %% (e.errnum, e.string, want)
        return
    raise AssertionError("no error, want errno %%d" %% want)

h = nbd.NBD()
h.set_strict_mode(0)  # let out-of-range requests reach the server
h.connect_uri(%q)
size = h.get_size()
assert size == 64 << 20, size
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
expect(lambda: h.pread(4096, size), errno.EINVAL)
expect(lambda: h.pread(8192, size - 4096), errno.EINVAL)
expect(lambda: h.pwrite(b"x" * 4096, size - 1024), errno.ENOSPC)
expect(lambda: h.trim(4096, size), errno.EINVAL)
buf = b"\xab" * 4096
h.pwrite(buf, size - 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, size - 4096) == buf
h.flush()
h.shutdown()

r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(%q)
assert r.is_read_only()
expect(lambda: r.pwrite(buf, 0), errno.EPERM)
expect(lambda: r.zero(4096, 0), errno.EPERM)
assert r.pread(4096, 0) == bytes(4096)
r.shutdown()
print("nbdsh checks passed")
`, fs.uri("disk"), fs.uri("ro"))
	out := run(t, time.Minute, bin, "-c", script)
	if !strings.Contains(out, "nbdsh checks passed") {
		t.Fatalf("nbdsh:\n%s", out)
	}
}

// TestInteropNbdcopy copies through the server with nbdcopy, which uses
// several connections at once (CAN_MULTI_CONN), many requests in flight and
// block status to find holes.
func TestInteropNbdcopy(t *testing.T) {
	bin := need(t, "nbdcopy")
	servers(t, func(t *testing.T, fs fileExports) { interopNbdcopy(t, bin, fs) })
}

func interopNbdcopy(t *testing.T, bin string, fs fileExports) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 64<<20)
	rand.Read(data[:40<<20]) // the tail stays zero: a hole for block status
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, 2*time.Minute, bin, "--connections=4", "--requests=32", "--flush", src, fs.uri("disk"))
	dst := filepath.Join(dir, "dst.raw")
	run(t, 2*time.Minute, bin, "--connections=4", "--requests=32", fs.uri("disk"), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip changed the data")
	}
}

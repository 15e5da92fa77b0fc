package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/e2e/checker"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/profile"
)

// Encryption at rest through a real `blockd serve --kek-file`.

// kekFile writes a random KEK (mode 0600) outside the state dir.
func kekFile(t *testing.T) string {
	t.Helper()
	k := make([]byte, 32)
	rand.Read(k)
	p := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(p, k, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func imgOf(d *daemonProc, vol string) string { return filepath.Join(d.dir, "data", vol+".img") }

// noPlaintext fails if the backing file holds pat repeated over a block.
func noPlaintext(t *testing.T, path string, pat byte) {
	t.Helper()
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(img, bytes.Repeat([]byte{pat}, 4096)) {
		t.Fatalf("the plaintext pattern %#x is in %s", pat, path)
	}
}

// fio crc32c verify over NBD on encrypted volumes, under every io_profile
// and with a QoS cap, and on a memory volume (the stage encrypts into and
// decrypts from its memory, on the NBD reader); then a 512-byte-granular
// run (read-modify-write of partial blocks); a known pattern written
// through NBD never reaches the backing file.
func TestEncryptedFIOVerify(t *testing.T) {
	need(t, "fio", "qemu-io")
	dir := t.TempDir()
	d := startDaemonWith(t, dir, freePort(t), "--kek-file", kekFile(t))
	type run struct{ name, profile, qos, engine string }
	var runs []run
	for _, p := range profile.Names() {
		runs = append(runs, run{"e-" + strings.ReplaceAll(p, "_", "-"), p, "", ""})
	}
	runs = append(runs, run{"e-qos", "auto", "2000", ""})
	// A memory volume: writes encrypted into the engine's memory and
	// reads decrypted from it, on the NBD reader.
	runs = append(runs, run{"e-memory", "auto", "", "memory"})
	for _, r := range runs {
		t.Run(r.name, func(t *testing.T) {
			spec := api.Spec{Name: r.name, Size: 64 << 20, Profile: r.profile, Engine: r.engine, Encryption: &api.Encryption{}}
			if r.qos != "" {
				json.Unmarshal([]byte(`{"iops_limit":`+r.qos+`}`), &spec.QoS)
			}
			vi, err := d.client().CreateVolume(spec)
			if err != nil {
				t.Fatal(err)
			}
			if vi.Encryption == nil || vi.Encryption.WrappedKey != "" || vi.Encryption.KEKID == "" {
				t.Fatalf("the API shows %+v", vi.Encryption)
			}
			jobs := [][]string{{"--rw=write", "--bsrange=4k-64k"}, {"--rw=randwrite", "--bsrange=4k-64k"}}
			if r.profile == "auto" && r.qos == "" {
				jobs = append(jobs, []string{"--rw=randwrite", "--bsrange=512-12k", "--blockalign=512"})
			}
			for _, job := range jobs {
				fioVerify(t, d.uri(r.name), job...)
			}
			qemuIO(t, d.uri(r.name), "write -P 0xe7 32M 1M", "flush", "read -P 0xe7 32M 1M")
			if r.engine != "memory" { // no file (encryption's unit tests read the memory)
				noPlaintext(t, imgOf(d, r.name), 0xe7)
			}
		})
	}
}

func fioVerify(t *testing.T, uri string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "fio", append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + uri, "--size=16M",
		"--iodepth=8", "--verify=crc32c", "--do_verify=1", "--fsync=7", "--verify_fatal=1", "--verify_state_save=0",
		"--randseed=42", "--output-format=terse"}, args...)...)
	cmd.Dir = t.TempDir()
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Contains(string(out), "verify:") || strings.Contains(string(out), "bad magic") {
		t.Fatalf("fio %v: %v\n%s", args, err, out)
	}
}

// kill -9 while the checker writes and flushes an encrypted volume,
// twice: after each restart every flushed write reads back (no torn or
// mis-keyed block).
func TestEncryptedKill9Checker(t *testing.T) {
	dir, addr, kek := t.TempDir(), freePort(t), kekFile(t)
	d := startDaemonWith(t, dir, addr, "--kek-file", kek)
	if _, err := d.client().CreateVolume(api.Spec{Name: "v", Size: 64 << 20, Encryption: &api.Encryption{}}); err != nil {
		t.Fatal(err)
	}
	dial := func(ctx context.Context) (*nbd.Client, error) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return nbd.Dial(ctx, "tcp", addr, "v")
	}
	ck := checker.New(4096+512, 2048, 4) // not block aligned: every write is a read-modify-write of two blocks
	aligned := checker.New(16<<20, 2048, 4)
	for round := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		done, done2 := runChecker(ctx, ck, dial), runChecker(ctx, aligned, dial)
		time.Sleep(1500 * time.Millisecond)
		d.kill9()
		cancel()
		<-done
		<-done2
		d = startDaemonWith(t, dir, addr, "--kek-file", kek)
		for _, c := range []*checker.Checker{ck, aligned} {
			cl, err := dial(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			rep, err := c.Verify(cl)
			cl.Close()
			if err != nil || rep.Lost != 0 || rep.Flushed == 0 {
				t.Fatalf("round %d: checker after kill -9: %v, %v", round, rep, err)
			}
			t.Logf("round %d: %d writes, %d flushes; %s", round, c.Writes.Load(), c.Flushes.Load(), rep)
		}
	}
}

// The operator's view: a bad KEK file stops serve with a clear error;
// `volume create --encrypt`, `volume get` (cipher and KEK id, never a
// key), a restart with the wrong KEK (the volume is failed with the
// reason, the daemon serves on, nothing is written), rekey to a new KEK
// file, and delete.
func TestEncryptionOperator(t *testing.T) {
	need(t, "qemu-io")
	dir, addr := t.TempDir(), freePort(t)
	loose := kekFile(t)
	os.Chmod(loose, 0o644)
	out, err := serveCmd(dir, "--nbd-listen", addr, "--metrics-listen", "", "--kek-file", loose).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "chmod 600") {
		t.Fatalf("serve with a world-readable KEK file: %v\n%s", err, out)
	}

	kek1 := kekFile(t)
	d := startDaemonWith(t, dir, addr, "--kek-file", kek1)
	d.cli("volume", "create", "sec", "--size", "64MiB", "--encrypt")
	d.cli("volume", "create", "plain", "--size", "64MiB")
	get := d.cli("volume", "get", "sec")
	if !strings.Contains(get, "aes-256-xts,kek:") {
		t.Fatalf("volume get:\n%s", get)
	}
	var vi api.Volume
	js := d.cli("volume", "get", "sec", "-o", "json")
	if err := json.Unmarshal([]byte(js), &vi); err != nil || vi.Encryption == nil || vi.Encryption.KEKID == "" {
		t.Fatalf("volume get -o json: %v\n%s", err, js)
	}
	if strings.Contains(js, "wrapped_key") {
		t.Fatalf("the API shows the wrapped key:\n%s", js)
	}
	qemuIO(t, d.uri("sec"), "write -P 0x3c 0 4M", "write -P 0x3d 1000 3000", "flush")
	qemuIO(t, d.uri("plain"), "write -P 0x3c 0 1M", "flush")
	d.stop()
	noPlaintext(t, imgOf(d, "sec"), 0x3c)
	img, _ := os.ReadFile(imgOf(d, "sec"))

	// The wrong KEK: the daemon's file now holds another key.
	good, _ := os.ReadFile(kek1)
	bad, _ := os.ReadFile(kekFile(t))
	os.WriteFile(kek1, bad, 0o600)
	d = startDaemonWith(t, dir, addr, "--kek-file", kek1)
	vi, err = d.client().GetVolume("sec")
	if err != nil || vi.State != api.StateFailed || !strings.Contains(vi.Reason, "wrong key") {
		t.Fatalf("with the wrong KEK: %+v, %v", vi, err)
	}
	qemuIO(t, d.uri("plain"), "read -P 0x3c 0 1M") // the node serves on
	d.stop()
	if after, _ := os.ReadFile(imgOf(d, "sec")); !bytes.Equal(after, img) {
		t.Fatal("the backing file changed while the KEK was wrong")
	}

	// The right KEK back; rotate to a new KEK file; the old one goes.
	os.WriteFile(kek1, good, 0o600)
	d = startDaemonWith(t, dir, addr, "--kek-file", kek1)
	qemuIO(t, d.uri("sec"), "read -P 0x3c 0 1000", "read -P 0x3d 1000 3000", "read -P 0x3c 4000 4092k")
	kek2 := kekFile(t)
	d.cli("volume", "rekey", "--all", "--kek-file", kek2)
	if after, _ := os.ReadFile(imgOf(d, "sec")); !bytes.Equal(after, img) {
		t.Fatal("rekey rewrote data")
	}
	d.cli("volume", "create", "sec2", "--size", "4MiB", "--encrypt")
	v1, _ := d.client().GetVolume("sec")
	v2, _ := d.client().GetVolume("sec2")
	if v1.Encryption.KEKID != v2.Encryption.KEKID || v1.Encryption.KEKID == vi.Encryption.KEKID {
		t.Fatalf("after the rotation: sec under %s, a new volume under %s, the old KEK was %s", v1.Encryption.KEKID, v2.Encryption.KEKID, vi.Encryption.KEKID)
	}
	d.stop()
	os.Remove(kek1) // destroyed after the rotation
	d = startDaemonWith(t, dir, addr, "--kek-file", kek2)
	qemuIO(t, d.uri("sec"), "read -P 0x3c 0 1000", "read -P 0x3d 1000 3000")
	d.cli("volume", "delete", "sec")
	if _, err := os.Stat(imgOf(d, "sec")); !os.IsNotExist(err) {
		t.Fatalf("backing file after delete: %v", err)
	}
}

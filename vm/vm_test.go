package vm

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

type cpioEntry struct {
	mode uint32
	data string
}

// readCPIO is an independent newc reader: it checks magic, field widths and
// 4-byte alignment as the kernel's unpacker would.
func readCPIO(t *testing.T, b []byte) map[string]cpioEntry {
	t.Helper()
	out := map[string]cpioEntry{}
	off := 0
	field := func(i int) int {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("header field %d at %d: %v", i, off, err)
		}
		return int(v)
	}
	for {
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d: %q", off, b[off:off+6])
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+namesize-1])
		if b[off+110+namesize-1] != 0 {
			t.Fatalf("%s: name not NUL-terminated", name)
		}
		off += 110 + namesize
		off += (4 - off%4) % 4
		if name == "TRAILER!!!" {
			return out
		}
		out[name] = cpioEntry{uint32(mode), string(b[off : off+size])}
		off += size
		off += (4 - off%4) % 4
	}
}

func TestCPIOWriter(t *testing.T) {
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf, seen: map[string]bool{}}
	w.dir("/bin")
	w.symlink("/bin/busybox", "/bin/sh")
	if err := w.data("/lib/modules/6.12/modules.dep", []byte("kernel/nbd.ko.xz:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := w.data("/init", []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := w.data("/init", []byte("dup"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := w.trailer(); err != nil {
		t.Fatal(err)
	}
	got := readCPIO(t, buf.Bytes())
	want := map[string]cpioEntry{
		"bin":                          {0o040755, ""},
		"bin/sh":                       {0o120777, "/bin/busybox"},
		"lib":                          {0o040755, ""},
		"lib/modules":                  {0o040755, ""},
		"lib/modules/6.12":             {0o040755, ""},
		"lib/modules/6.12/modules.dep": {0o100644, "kernel/nbd.ko.xz:\n"},
		"init":                         {0o100755, "#!/bin/sh\n"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("archive =\n%v\nwant\n%v", got, want)
	}
}

func TestResultParse(t *testing.T) {
	var r Result
	r.ExitCode = -1
	for _, l := range []string{
		"\x1bc\x1b[?7l\x1b[2JVMTEST KERNEL 6.12.117+deb12-amd64 modules=nbd",
		"=== RUN   TestNBDExt4",
		"--- PASS: TestNBDExt4 (15.04s)",
		"    --- FAIL: TestX/sub (0.00s)",
		"--- SKIP: TestY (0.00s)",
		"[    7.5] block nbd0: Receive control failed (result -32)",
		"VMTEST EXIT 1",
	} {
		r.parse(l)
	}
	if r.Release != "6.12.117+deb12-amd64" || r.ExitCode != 1 ||
		!reflect.DeepEqual(r.Passed, []string{"TestNBDExt4"}) ||
		!reflect.DeepEqual(r.Failed, []string{"TestX/sub"}) ||
		!reflect.DeepEqual(r.Skipped, []string{"TestY"}) || r.Panic {
		t.Errorf("parsed %+v", r)
	}
	if r.OK() {
		t.Error("a run with a failed subtest and exit 1 is OK")
	}
	r.parse("[ 9.1] Kernel panic - not syncing: Attempted to kill init!")
	if !r.Panic {
		t.Error("panic not detected")
	}
	if r.BootPanic() {
		t.Error("a panic after init printed its marker counts as a boot panic")
	}
	var early Result
	early.parse("[    2.239311] Kernel panic - not syncing: Fatal exception in interrupt")
	if !early.BootPanic() || early.OK() {
		t.Errorf("a panic before the VMTEST KERNEL marker: BootPanic %v, OK %v", early.BootPanic(), early.OK())
	}
	ok := Result{ExitCode: 0, Passed: []string{"A"}}
	if !ok.OK() {
		t.Error("clean run not OK")
	}
	if (Result{ExitCode: 0}).OK() {
		t.Error("a run where nothing passed is OK")
	}
}

func TestReadDeps(t *testing.T) {
	p := filepath.Join(t.TempDir(), "modules.dep")
	dep := "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n" +
		"kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
	if err := os.WriteFile(p, []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := readDeps(p)
	if err != nil {
		t.Fatal(err)
	}
	if d.byName["crc32c_intel"] != "kernel/arch/x86/crypto/crc32c-intel.ko.xz" {
		t.Errorf("crc32c_intel -> %q", d.byName["crc32c_intel"])
	}
	if got := d.deps[d.byName["ext4"]]; !reflect.DeepEqual(got, []string{"kernel/lib/crc16.ko.xz", "kernel/fs/jbd2/jbd2.ko.xz"}) {
		t.Errorf("ext4 deps %v", got)
	}
}

func TestInitScriptQuotesCommand(t *testing.T) {
	s := initScript(&Kernel{Modules: []string{"nbd"}}, InitramfsOptions{
		Command: []string{"/usr/bin/kerneltest.test", "-test.run=Test(A|B)'x"},
	})
	if !strings.Contains(s, `'/usr/bin/kerneltest.test' '-test.run=Test(A|B)'\''x'`) {
		t.Errorf("command not shell-quoted:\n%s", s)
	}
	if !strings.Contains(s, "\nip link set lo up\n") {
		t.Errorf("script does not bring up loopback (etcd and replication in the guest need it):\n%s", s)
	}
	if !strings.Contains(s, "VMTEST EXIT $?") || !strings.HasSuffix(s, "poweroff -f\n") {
		t.Errorf("script does not report and power off:\n%s", s)
	}
}

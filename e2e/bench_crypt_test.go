package e2e

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/encryption"
)

// BenchmarkCrypt is `make bench-crypt`: what encryption at rest costs.
// One daemon (with a KEK file) serves two memory volumes, one encrypted,
// both filled with data first (holes are not decrypted, so an empty
// volume would flatter encryption); fio's nbd engine over the NBD unix
// socket runs 4k randread and randwrite at QD32 and 1M write at QD8 on
// each, alternating plain and encrypted, BENCH_CRYPT_ROUNDS times
// (default 5); the table has the medians, the ratio, and the daemon's CPU
// per I/O. The ceiling, AES-256-XTS of this CPU through encryption.NewXTS
// (the implementation the daemon runs: vaes, aesni or generic, which it
// names) measured in-process, says what the cipher alone allows per core.
func BenchmarkCrypt(b *testing.B) {
	need(b, "fio")
	secs, rounds := 5, 5
	if s := os.Getenv("BENCH_CRYPT_RUNTIME"); s != "" {
		secs, _ = strconv.Atoi(s)
	}
	if s := os.Getenv("BENCH_CRYPT_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	res := cryptBench{Time: time.Now().UTC(), Runtime: secs, Rounds: rounds}
	res.Impl, res.CeilingEncMiBps, res.CeilingDecMiBps = xtsCeiling()

	k := make([]byte, 32)
	rand.Read(k)
	kek := filepath.Join(b.TempDir(), "kek")
	os.WriteFile(kek, k, 0o600)
	dir := b.TempDir()
	d := startDaemonWith(b, dir, "127.0.0.1:0", "--kek-file", kek)
	defer d.stop()
	sock := filepath.Join(dir, "nbd.sock")
	for _, v := range []api.Spec{
		{Name: "plain", Size: 64 << 20, Engine: "memory", Profile: "none"},
		{Name: "enc", Size: 64 << 20, Engine: "memory", Profile: "none", Encryption: &api.Encryption{}},
	} {
		if _, err := d.client().CreateVolume(v); err != nil {
			b.Fatal(err)
		}
		runFio(b, sock, v.Name, 1, "--rw=write", "--bs=1M", "--iodepth=8", "--time_based=0", "--runtime=0", "--ramp_time=0")
	}
	jobs := []struct {
		name string
		args []string
	}{
		{"4k randread QD32", []string{"--rw=randread", "--bs=4k", "--iodepth=32"}},
		{"4k randwrite QD32", []string{"--rw=randwrite", "--bs=4k", "--iodepth=32"}},
		{"1M write QD8", []string{"--rw=write", "--bs=1M", "--iodepth=8"}},
	}
	pid := d.cmd.Process.Pid
	for _, j := range jobs {
		var plain, enc, plainCPU, encCPU []float64
		for range rounds {
			for _, vol := range []string{"plain", "enc"} {
				c0 := cpuSeconds(b, pid)
				r := runFio(b, sock, vol, secs, j.args...)
				cpu := (cpuSeconds(b, pid) - c0) * 1e6 / (r.IOPS * float64(secs+1))
				v := r.IOPS
				if j.name == "1M write QD8" {
					v = r.MiBps
				}
				if vol == "plain" {
					plain, plainCPU = append(plain, v), append(plainCPU, cpu)
				} else {
					enc, encCPU = append(enc, v), append(encCPU, cpu)
				}
			}
		}
		row := cryptRow{Job: j.name, Plain: median(plain), Encrypted: median(enc),
			PlainCPUus: median(plainCPU), EncryptedCPUus: median(encCPU), PlainRuns: plain, EncryptedRuns: enc}
		row.Ratio = row.Encrypted / row.Plain
		row.CPURatio = row.PlainCPUus / row.EncryptedCPUus
		res.Rows = append(res.Rows, row)
	}
	res.print()
	saveBench("crypt", res.Time, res)
}

type cryptBench struct {
	Time            time.Time  `json:"time"`
	Runtime         int        `json:"runtime_seconds"`
	Rounds          int        `json:"rounds"`
	Impl            string     `json:"xts_impl"`
	CeilingEncMiBps float64    `json:"xts_encrypt_mibps_per_core"`
	CeilingDecMiBps float64    `json:"xts_decrypt_mibps_per_core"`
	Rows            []cryptRow `json:"rows"`
}

type cryptRow struct {
	Job            string  `json:"job"`
	Plain          float64 `json:"plain"` // IOPS, or MiB/s for 1M
	Encrypted      float64 `json:"encrypted"`
	Ratio          float64 `json:"ratio"`
	PlainCPUus     float64 `json:"plain_daemon_cpu_us_per_io"`
	EncryptedCPUus float64 `json:"encrypted_daemon_cpu_us_per_io"`
	// CPURatio is plain over encrypted CPU per I/O: the throughput ratio
	// when the daemon's CPU is what limits both.
	CPURatio      float64   `json:"cpu_ratio"`
	PlainRuns     []float64 `json:"plain_runs"`
	EncryptedRuns []float64 `json:"encrypted_runs"`
}

func (r cryptBench) print() {
	fmt.Printf("\nAES-256-XTS ceiling (%s, per second of one core's CPU time): encrypt %.0f MiB/s, decrypt %.0f MiB/s = %.0f / %.0f 4k blocks/s\n",
		r.Impl, r.CeilingEncMiBps, r.CeilingDecMiBps, r.CeilingEncMiBps*256, r.CeilingDecMiBps*256)
	fmt.Printf("medians of %d alternating runs of %ds, memory volumes, profile none, fio nbd engine over the unix socket;\n"+
		"cpu/io is the daemon's CPU time per I/O (per MiB for 1M)\n\n", r.Rounds, r.Runtime)
	fmt.Printf("%-18s %12s %12s %7s %14s %14s %9s\n", "job", "plain", "encrypted", "ratio", "cpu/io plain", "cpu/io enc", "cpu ratio")
	for _, row := range r.Rows {
		unit := " IOPS"
		if row.Job == "1M write QD8" {
			unit = " MiB/s"
		}
		fmt.Printf("%-18s %12s %12s %6.2fx %12.1fµs %12.1fµs %8.2fx\n", row.Job, strconv.FormatFloat(row.Plain, 'f', 0, 64)+unit,
			strconv.FormatFloat(row.Encrypted, 'f', 0, 64)+unit, row.Ratio, row.PlainCPUus, row.EncryptedCPUus, row.CPURatio)
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// xtsCeiling measures AES-256-XTS over 1 MiB in this process through
// encryption.NewXTS, in MiB per second of this thread's CPU time: what one
// core gives, however busy the machine is; impl names the implementation.
func xtsCeiling() (impl string, encMiBps, decMiBps float64) {
	x, err := encryption.NewXTS(encryption.NewDataKey())
	if err != nil {
		panic(err)
	}
	src, dst := make([]byte, 1<<20), make([]byte, 1<<20)
	rand.Read(src)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu := func() time.Duration {
		var ru unix.Rusage
		unix.Getrusage(unix.RUSAGE_THREAD, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	// A timed loop, not testing.Benchmark: that would wait for the
	// benchmark lock this benchmark holds.
	rate := func(dec bool) float64 {
		start, n := cpu(), 0
		for cpu()-start < time.Second {
			if dec {
				x.DecryptBlocks(dst, src, uint64(n))
			} else {
				x.EncryptBlocks(dst, src, uint64(n))
			}
			n++
		}
		return float64(n) / (cpu() - start).Seconds()
	}
	return x.Impl(), rate(false), rate(true)
}

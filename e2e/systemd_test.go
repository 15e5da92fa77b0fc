package e2e

import (
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestSystemdNotify: a real `blockd serve` under a fake systemd (a unixgram
// NOTIFY_SOCKET the test listens on, WATCHDOG_USEC set) says what it does
// in STATUS= lines, sends READY=1 only once the volumes of its state dir
// are loaded (the API lists them the moment READY arrives), pings
// WATCHDOG=1 every half interval, and sends STOPPING=1 on SIGTERM before
// it exits cleanly.
func TestSystemdNotify(t *testing.T) {
	dir := t.TempDir()
	// A state dir with a volume, made by a first daemon.
	d := startDaemon(t, dir, "")
	if _, err := d.client().CreateVolume(api.Spec{Name: "kept", Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	d.stop()

	sockPath := filepath.Join(t.TempDir(), "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	msgs := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := ln.ReadFromUnix(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()

	cmd := serveCmd(dir, "--nbd-listen", "", "--metrics-listen", "")
	cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=300000")
	log := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", log)
		}
	}()
	next := func(what string) string {
		t.Helper()
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed while waiting for %s", what)
			}
			return m
		case <-time.After(20 * time.Second):
			t.Fatalf("no %s within 20s", what)
		}
		return ""
	}

	var got []string
	for {
		m := next("READY=1")
		got = append(got, m)
		if strings.Contains(m, "READY=1") {
			break
		}
		if !strings.HasPrefix(m, "STATUS=") {
			t.Errorf("before READY=1: %q, want only STATUS= lines", m)
		}
	}
	if len(got) < 2 || !strings.Contains(got[0], "STATUS=loading volumes") {
		t.Errorf("notifications before READY: %q, want a STATUS= line saying it loads volumes", got)
	}
	// READY means the volumes are there and the API answers.
	vols, err := api.NewClient(filepath.Join(dir, "blockd.sock")).ListVolumes()
	if err != nil || len(vols) != 1 || vols[0].Name != "kept" {
		t.Errorf("at READY=1 the API lists %v (%v), want the volume kept", vols, err)
	}
	if ready := got[len(got)-1]; !strings.Contains(ready, "STATUS=serving 1 volumes") {
		t.Errorf("READY notification %q does not say what is served", ready)
	}

	start := time.Now()
	for pings := 0; pings < 3; {
		if m := next("WATCHDOG=1"); m == "WATCHDOG=1" {
			pings++
		} else {
			t.Errorf("while serving: %q, want WATCHDOG=1", m)
		}
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("3 watchdog pings took %s with WATCHDOG_USEC=300000", el)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	for {
		m := next("STOPPING=1")
		if strings.Contains(m, "STOPPING=1") {
			break
		}
		if m != "WATCHDOG=1" {
			t.Errorf("before STOPPING=1: %q", m)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("blockd exited with %v after SIGTERM", err)
	}
	// Nothing after STOPPING: the pings ended with it.
	select {
	case m, ok := <-msgs:
		if ok {
			t.Errorf("after STOPPING=1: %q", m)
		}
	case <-time.After(200 * time.Millisecond):
	}
}

package deploy

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const unitFile = "systemd/blockd.service"

// Options that give a service a private mount namespace (hiding the
// devices blockd attaches and the mounts made for the host) or keep it
// from loading nbd and ublk_drv: none may appear in the unit.
var forbidden = []string{
	"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
	"ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem",
	"BindPaths", "BindReadOnlyPaths", "MountFlags", "ProtectKernelTunables", "ProtectKernelModules",
	"ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
	"RootDirectory", "RootImage", "DynamicUser", "MountAPIVFS", "NetworkNamespacePath", "PrivateUsers",
}

// Keys the unit may use: the fallback check where systemd-analyze is
// missing (and a guard against typos everywhere).
var knownKeys = map[string][]string{
	"Unit":    {"Description", "Documentation", "After", "Before", "Wants", "Requires", "Conflicts"},
	"Service": {"Type", "NotifyAccess", "ExecStart", "ExecStartPre", "TimeoutStartSec", "TimeoutStopSec", "KillMode", "KillSignal", "WatchdogSec", "Restart", "RestartSec", "OOMScoreAdjust", "LimitNOFILE", "LimitMEMLOCK", "Environment"},
	"Install": {"WantedBy", "RequiredBy", "Alias"},
}

type unitKey struct{ section, key, value string }

func parseUnit(t *testing.T, b []byte) []unitKey {
	t.Helper()
	var out []unitKey
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			section = l[1 : len(l)-1]
		default:
			k, v, ok := strings.Cut(l, "=")
			if !ok || section == "" {
				t.Errorf("%s:%d: %q is not KEY=VALUE in a section", unitFile, n, l)
				continue
			}
			out = append(out, unitKey{section, strings.TrimSpace(k), strings.TrimSpace(v)})
		}
	}
	return out
}

// TestSystemdUnit: the unit is Type=notify with a watchdog, runs blockd
// serve, has no option that would hide its devices and mounts or forbid
// module loading, and `systemd-analyze verify` prints nothing for it (it
// exits 0 even for unknown keys: any output fails).
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	keys := parseUnit(t, b)
	get := func(section, key string) string {
		for _, k := range keys {
			if k.section == section && k.key == key {
				return k.value
			}
		}
		return ""
	}
	for _, k := range keys {
		if slices.Contains(forbidden, k.key) {
			t.Errorf("%s: %s= creates a mount namespace or blocks module loading; blockd's devices and mounts must stay visible", unitFile, k.key)
		}
		if !slices.Contains(knownKeys[k.section], k.key) {
			t.Errorf("%s: [%s] %s= is not a key this test knows (add it to knownKeys if systemd does)", unitFile, k.section, k.key)
		}
	}
	for _, want := range []unitKey{{"Service", "Type", "notify"}, {"Service", "NotifyAccess", "main"}, {"Install", "WantedBy", "multi-user.target"}} {
		if got := get(want.section, want.key); got != want.value {
			t.Errorf("[%s] %s=%q, want %q", want.section, want.key, got, want.value)
		}
	}
	if get("Service", "WatchdogSec") == "" {
		t.Error("no WatchdogSec: blockd pings the watchdog while its API answers")
	}
	exe := strings.Fields(get("Service", "ExecStart"))
	if len(exe) < 2 || exe[0] != "/usr/local/bin/blockd" || exe[1] != "serve" {
		t.Errorf("ExecStart=%v, want /usr/local/bin/blockd serve ...", exe)
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("systemd-analyze is not installed (make deps installs systemd)")
		}
		t.Skip("systemd-analyze not installed; the keys were checked against knownKeys only")
	}
	// verify checks that ExecStart's program exists: point it at one that
	// does (this test binary); every key is verified as written.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(t.TempDir(), "blockd.service")
	if err := os.WriteFile(unit, bytes.ReplaceAll(b, []byte("/usr/local/bin/blockd"), []byte(self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", unit).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

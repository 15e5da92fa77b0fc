// Package units parses and prints the quantities users type: sizes
// ("10GiB", "512M", "4096"), rates ("200MiB/s") and counts ("5k"). Every
// command-line flag, API field and log line that carries one of them goes
// through here, so "1G" means the same thing everywhere.
package units

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// sizeUnits are the suffixes ParseSize accepts. Single letters and the
// -i/-iB forms are powers of 1024 (what block storage means by a
// gigabyte); KB, MB, GB, TB and PB are powers of 1000.
var sizeUnits = map[string]int64{
	"": 1, "B": 1, "b": 1,
	"K": 1 << 10, "k": 1 << 10, "Ki": 1 << 10, "KiB": 1 << 10,
	"M": 1 << 20, "m": 1 << 20, "Mi": 1 << 20, "MiB": 1 << 20,
	"G": 1 << 30, "g": 1 << 30, "Gi": 1 << 30, "GiB": 1 << 30,
	"T": 1 << 40, "t": 1 << 40, "Ti": 1 << 40, "TiB": 1 << 40,
	"P": 1 << 50, "p": 1 << 50, "Pi": 1 << 50, "PiB": 1 << 50,
	"KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
}

// ParseSize parses a byte count: a whole number with an optional unit
// ("1GiB", "512M", "10 G", "4096", "3MB").
func ParseSize(s string) (int64, error) {
	num, unit := splitNumber(s)
	if num == "" {
		if strings.TrimSpace(s) == "" {
			return 0, fmt.Errorf("size %q: empty", s)
		}
		return 0, fmt.Errorf("size %q: want a whole number with an optional unit (KiB, MiB, GiB, TiB)", s)
	}
	mult, ok := sizeUnits[unit]
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit %q (want KiB, MiB, GiB, TiB, or K, M, G, T)", s, unit)
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		if strings.Contains(num, ".") {
			return 0, fmt.Errorf("size %q: want a whole number (write 1536MiB, not 1.5GiB)", s)
		}
		return 0, fmt.Errorf("size %q: too large", s)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}

// ParseRate parses bytes per second: a size with an optional "/s"
// ("200MiB/s", "200MiB").
func ParseRate(s string) (int64, error) {
	return ParseSize(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
}

// countUnits are the suffixes ParseCount accepts: powers of 1000, as in
// "5k IOPS".
var countUnits = map[string]float64{"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}

// ParseCount parses a count such as an IOPS figure: "5000", "5k", "1.5k",
// "2M" (k, M, G are powers of 1000). The result must be whole.
func ParseCount(s string) (int64, error) {
	num, unit := splitNumber(s)
	mult, ok := countUnits[unit]
	if num == "" || !ok {
		return 0, fmt.Errorf("count %q: want a whole number, optionally with k or M (5000, 5k, 2M)", s)
	}
	if !strings.Contains(num, ".") {
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil || float64(n) > math.MaxInt64/mult {
			return 0, fmt.Errorf("count %q: too large", s)
		}
		return n * int64(mult), nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("count %q: not a number", s)
	}
	v := f * mult
	if v != math.Trunc(v) || v >= math.MaxInt64 {
		return 0, fmt.Errorf("count %q: not a whole number", s)
	}
	return int64(v), nil
}

// splitNumber splits s into its leading unsigned decimal number and the
// rest, both trimmed. A sign makes the number empty: no quantity here is
// negative.
func splitNumber(s string) (num, unit string) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	return t[:i], strings.TrimSpace(t[i:])
}

// FormatSize renders n bytes in the largest binary unit that divides it
// exactly, so that ParseSize(FormatSize(n)) == n: "1GiB", "1536MiB",
// "4097B".
func FormatSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	i := 0
	for n != 0 && n%1024 == 0 && i < len(units)-1 {
		n /= 1024
		i++
	}
	return strconv.FormatInt(n, 10) + units[i]
}

// HumanSize renders n bytes rounded to one decimal in binary units, for
// tables: "1.5GiB", "300MiB", "0B".
func HumanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f := float64(n)
	i := 0
	for math.Abs(f) >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := strconv.FormatFloat(f, 'f', 1, 64)
	return strings.TrimSuffix(s, ".0") + units[i]
}

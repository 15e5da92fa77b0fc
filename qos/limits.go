package qos

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Limits is the QoS configuration of one volume. A zero field means "not
// set": no cap, no reservation, the default weight, the default burst.
type Limits struct {
	// Caps. A request waits until every cap that applies to it has credit.
	IOPS      int64 `json:"iops_limit,omitempty"`
	ReadIOPS  int64 `json:"read_iops_limit,omitempty"`
	WriteIOPS int64 `json:"write_iops_limit,omitempty"`
	BPS       int64 `json:"bps_limit,omitempty"`
	ReadBPS   int64 `json:"read_bps_limit,omitempty"`
	WriteBPS  int64 `json:"write_bps_limit,omitempty"`
	// Burst is how many seconds of credit a cap may save up while the
	// volume is idle. Zero means MinBurst.
	Burst float64 `json:"burst,omitempty"`

	// Reservation is the floor the volume gets when the node is at
	// capacity; Weight divides what is left among the busy volumes.
	IOPSReservation int64 `json:"iops_reservation,omitempty"`
	BPSReservation  int64 `json:"bps_reservation,omitempty"`
	Weight          int   `json:"weight,omitempty"`
}

const (
	// MinBurst is the credit (in seconds) every cap keeps at least. A
	// client that stalls briefly (on a loaded host, for tens of
	// milliseconds) leaves the volume idle; the credit saved meanwhile lets
	// it catch up, where a smaller bucket would lose it and undershoot the
	// cap. The price is that a volume idle for 100 ms may run that much
	// ahead of its cap for a moment.
	MinBurst = 0.1
	// MaxBurst bounds Burst so that a typo cannot grant hours of credit.
	MaxBurst = 3600
	// DefaultWeight is the weight of a volume that sets none.
	DefaultWeight = 100
	// MaxWeight bounds Weight.
	MaxWeight = 10000
)

// Capacity is what the node can do in total. Reservations are promised out
// of it and the rest is shared by weight; requests beyond it wait. A zero
// field is unlimited in that dimension (reservations and weights then have
// nothing to divide and only the caps apply).
type Capacity struct {
	IOPS int64 `json:"iops,omitempty"`
	BPS  int64 `json:"bps,omitempty"`
}

// Validate checks c.
func (c Capacity) Validate() error {
	if c.IOPS < 0 {
		return fmt.Errorf("capacity iops %d is negative", c.IOPS)
	}
	if c.BPS < 0 {
		return fmt.Errorf("capacity bps %d is negative", c.BPS)
	}
	return nil
}

// Unlimited reports whether c sets no capacity at all.
func (c Capacity) Unlimited() bool { return c.IOPS == 0 && c.BPS == 0 }

// IsZero reports whether l sets nothing.
func (l Limits) IsZero() bool { return l == Limits{} }

// HasCaps reports whether l sets any cap.
func (l Limits) HasCaps() bool {
	return l.IOPS != 0 || l.ReadIOPS != 0 || l.WriteIOPS != 0 ||
		l.BPS != 0 || l.ReadBPS != 0 || l.WriteBPS != 0
}

// effWeight is the weight in force.
func (l Limits) effWeight() int {
	if l.Weight == 0 {
		return DefaultWeight
	}
	return l.Weight
}

// effBurst is the burst in force, in seconds.
func (l Limits) effBurst() float64 {
	if l.Burst < MinBurst {
		return MinBurst
	}
	return l.Burst
}

// Validate checks l and names the offending field in the error, using the
// JSON (and CLI) names.
func (l Limits) Validate() error {
	for _, f := range fields {
		if f.kind == kindFloat {
			continue
		}
		if v := f.get(&l); v < 0 {
			return fmt.Errorf("%s %d is negative", f.json, v)
		}
	}
	if math.IsNaN(l.Burst) || math.IsInf(l.Burst, 0) || l.Burst < 0 {
		return fmt.Errorf("burst %v must be a non-negative number of seconds", l.Burst)
	}
	if l.Burst > MaxBurst {
		return fmt.Errorf("burst %v exceeds the maximum of %d seconds", l.Burst, MaxBurst)
	}
	if l.Weight > MaxWeight {
		return fmt.Errorf("weight %d exceeds the maximum of %d", l.Weight, MaxWeight)
	}
	if l.IOPSReservation != 0 {
		if c := l.iopsCeiling(); c != 0 && l.IOPSReservation > c {
			return fmt.Errorf("iops_reservation %d exceeds %s", l.IOPSReservation, l.iopsCeilingName())
		}
	}
	if l.BPSReservation != 0 {
		if c := l.bpsCeiling(); c != 0 && l.BPSReservation > c {
			return fmt.Errorf("bps_reservation %d exceeds %s", l.BPSReservation, l.bpsCeilingName())
		}
	}
	return nil
}

// iopsCeiling is the most IOPS the caps allow in any mix of reads and
// writes (0: unbounded).
func (l Limits) iopsCeiling() int64 {
	split := int64(0)
	if l.ReadIOPS != 0 && l.WriteIOPS != 0 {
		split = l.ReadIOPS + l.WriteIOPS
	}
	switch {
	case l.IOPS != 0 && (split == 0 || l.IOPS <= split):
		return l.IOPS
	default:
		return split
	}
}

func (l Limits) iopsCeilingName() string {
	if c := l.iopsCeiling(); c == l.IOPS {
		return fmt.Sprintf("iops_limit %d", c)
	}
	return fmt.Sprintf("read_iops_limit + write_iops_limit %d", l.iopsCeiling())
}

func (l Limits) bpsCeiling() int64 {
	split := int64(0)
	if l.ReadBPS != 0 && l.WriteBPS != 0 {
		split = l.ReadBPS + l.WriteBPS
	}
	switch {
	case l.BPS != 0 && (split == 0 || l.BPS <= split):
		return l.BPS
	default:
		return split
	}
}

func (l Limits) bpsCeilingName() string {
	if c := l.bpsCeiling(); c == l.BPS {
		return fmt.Sprintf("bps_limit %d", c)
	}
	return fmt.Sprintf("read_bps_limit + write_bps_limit %d", l.bpsCeiling())
}

type fieldKind uint8

const (
	kindCount fieldKind = iota // a plain non-negative integer
	kindSize                   // bytes per second: takes sizes like 50MiB
	kindFloat                  // seconds
	kindWeight
)

type field struct {
	flag, json string
	kind       fieldKind
	get        func(*Limits) int64           // integer fields
	set        func(*Limits, int64, float64) // integer value, or seconds for burst
}

// fields lists every setting under its CLI flag name and JSON name, in the
// order of the issue's `volume set` flags.
var fields = []field{
	{"iops-limit", "iops_limit", kindCount, func(l *Limits) int64 { return l.IOPS }, func(l *Limits, v int64, _ float64) { l.IOPS = v }},
	{"read-iops-limit", "read_iops_limit", kindCount, func(l *Limits) int64 { return l.ReadIOPS }, func(l *Limits, v int64, _ float64) { l.ReadIOPS = v }},
	{"write-iops-limit", "write_iops_limit", kindCount, func(l *Limits) int64 { return l.WriteIOPS }, func(l *Limits, v int64, _ float64) { l.WriteIOPS = v }},
	{"bps-limit", "bps_limit", kindSize, func(l *Limits) int64 { return l.BPS }, func(l *Limits, v int64, _ float64) { l.BPS = v }},
	{"read-bps-limit", "read_bps_limit", kindSize, func(l *Limits) int64 { return l.ReadBPS }, func(l *Limits, v int64, _ float64) { l.ReadBPS = v }},
	{"write-bps-limit", "write_bps_limit", kindSize, func(l *Limits) int64 { return l.WriteBPS }, func(l *Limits, v int64, _ float64) { l.WriteBPS = v }},
	{"burst", "burst", kindFloat, func(l *Limits) int64 { return 0 }, func(l *Limits, _ int64, v float64) { l.Burst = v }},
	{"iops-reservation", "iops_reservation", kindCount, func(l *Limits) int64 { return l.IOPSReservation }, func(l *Limits, v int64, _ float64) { l.IOPSReservation = v }},
	{"bps-reservation", "bps_reservation", kindSize, func(l *Limits) int64 { return l.BPSReservation }, func(l *Limits, v int64, _ float64) { l.BPSReservation = v }},
	{"weight", "weight", kindWeight, func(l *Limits) int64 { return int64(l.Weight) }, func(l *Limits, v int64, _ float64) { l.Weight = int(v) }},
}

// FlagNames lists the CLI flag names SetFlag accepts, without dashes in
// front, in a stable order: iops-limit, read-iops-limit, ... weight.
func FlagNames() []string {
	names := make([]string, len(fields))
	for i, f := range fields {
		names[i] = f.flag
	}
	return names
}

// ErrBadLimit is wrapped by every error SetFlag returns.
var ErrBadLimit = errors.New("bad qos limit")

// SetFlag sets one field of l from a CLI value. name is a flag name
// ("iops-limit", "--iops-limit") or a JSON name ("iops_limit"). Values are
// non-negative integers; bps fields also take sizes ("50MiB") through
// parseSize (ParseSize when nil); burst takes seconds ("1.5"); "none" and
// "0" clear the field. l is unchanged on error. SetFlag does not run
// Validate: callers apply all their flags, then validate the result.
func (l *Limits) SetFlag(name, value string, parseSize func(string) (int64, error)) error {
	name = strings.TrimLeft(name, "-")
	var f *field
	for i := range fields {
		if fields[i].flag == name || fields[i].json == name {
			f = &fields[i]
			break
		}
	}
	if f == nil {
		return fmt.Errorf("%w: unknown setting %q (want one of %s)", ErrBadLimit, name, strings.Join(FlagNames(), ", "))
	}
	n, secs, err := parseValue(f, strings.TrimSpace(value), parseSize)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrBadLimit, err)
	}
	f.set(l, n, secs)
	return nil
}

// parseValue returns an integer value, or seconds for burst.
func parseValue(f *field, s string, parseSize func(string) (int64, error)) (int64, float64, error) {
	if strings.EqualFold(s, "none") {
		return 0, 0, nil
	}
	if s == "" {
		return 0, 0, fmt.Errorf("%s: empty value (use none or 0 to clear)", f.flag)
	}
	switch f.kind {
	case kindFloat:
		v, err := strconv.ParseFloat(strings.TrimSuffix(s, "s"), 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return 0, 0, fmt.Errorf("%s %q is not a number of seconds", f.flag, s)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", f.flag, s)
		}
		if v > MaxBurst {
			return 0, 0, fmt.Errorf("%s %q exceeds the maximum of %d seconds", f.flag, s, MaxBurst)
		}
		return 0, v, nil
	case kindSize:
		if parseSize == nil {
			parseSize = ParseSize
		}
		if strings.HasPrefix(s, "-") {
			return 0, 0, fmt.Errorf("%s %q is negative", f.flag, s)
		}
		v, err := parseSize(s)
		if err != nil {
			return 0, 0, fmt.Errorf("%s %q is not a size: %v", f.flag, s, err)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", f.flag, s)
		}
		return v, 0, nil
	default:
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			if strings.HasPrefix(s, "-") {
				return 0, 0, fmt.Errorf("%s %q is negative", f.flag, s)
			}
			return 0, 0, fmt.Errorf("%s %q is not a whole number", f.flag, s)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", f.flag, s)
		}
		if f.kind == kindWeight && v > MaxWeight {
			return 0, 0, fmt.Errorf("%s %q exceeds the maximum of %d", f.flag, s, MaxWeight)
		}
		return v, 0, nil
	}
}

// ParseSize parses a byte count: a whole number with an optional unit,
// binary (K, KiB, M, MiB, G, GiB, T, TiB: powers of 1024) or decimal (kB,
// MB, GB, TB: powers of 1000), and an optional trailing "/s". Daemons with a
// size parser of their own pass that to SetFlag instead.
func ParseSize(s string) (int64, error) {
	s = strings.TrimSuffix(strings.TrimSpace(s), "/s")
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q does not start with a number", s)
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	mult := int64(1)
	switch strings.TrimSpace(s[i:]) {
	case "", "B", "b":
	case "K", "k", "KiB", "Ki":
		mult = 1 << 10
	case "M", "m", "MiB", "Mi":
		mult = 1 << 20
	case "G", "g", "GiB", "Gi":
		mult = 1 << 30
	case "T", "t", "TiB", "Ti":
		mult = 1 << 40
	case "kB", "KB":
		mult = 1e3
	case "MB":
		mult = 1e6
	case "GB":
		mult = 1e9
	case "TB":
		mult = 1e12
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q", s, s[i:])
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q overflows", s)
	}
	return n * mult, nil
}

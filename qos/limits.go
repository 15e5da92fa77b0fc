package qos

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/blockd/blockd/units"
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
	usage      string
	get        func(*Limits) int64           // integer fields
	set        func(*Limits, int64, float64) // integer value, or seconds for burst
}

// fields lists every setting under its CLI flag name and JSON name, in the
// order of the issue's `volume set` flags.
var fields = []field{
	{"iops-limit", "iops_limit", kindCount, "cap on read+write requests per second (5000, 5k)", func(l *Limits) int64 { return l.IOPS }, func(l *Limits, v int64, _ float64) { l.IOPS = v }},
	{"read-iops-limit", "read_iops_limit", kindCount, "cap on read requests per second", func(l *Limits) int64 { return l.ReadIOPS }, func(l *Limits, v int64, _ float64) { l.ReadIOPS = v }},
	{"write-iops-limit", "write_iops_limit", kindCount, "cap on write requests per second", func(l *Limits) int64 { return l.WriteIOPS }, func(l *Limits, v int64, _ float64) { l.WriteIOPS = v }},
	{"bps-limit", "bps_limit", kindSize, "cap on read+write bytes per second (200MiB, 1GiB)", func(l *Limits) int64 { return l.BPS }, func(l *Limits, v int64, _ float64) { l.BPS = v }},
	{"read-bps-limit", "read_bps_limit", kindSize, "cap on bytes read per second", func(l *Limits) int64 { return l.ReadBPS }, func(l *Limits, v int64, _ float64) { l.ReadBPS = v }},
	{"write-bps-limit", "write_bps_limit", kindSize, "cap on bytes written per second", func(l *Limits) int64 { return l.WriteBPS }, func(l *Limits, v int64, _ float64) { l.WriteBPS = v }},
	{"burst", "burst", kindFloat, "seconds of credit a cap saves up while the volume is idle (default 0.1)", func(l *Limits) int64 { return 0 }, func(l *Limits, _ int64, v float64) { l.Burst = v }},
	{"iops-reservation", "iops_reservation", kindCount, "requests per second the volume gets when the node is at capacity", func(l *Limits) int64 { return l.IOPSReservation }, func(l *Limits, v int64, _ float64) { l.IOPSReservation = v }},
	{"bps-reservation", "bps_reservation", kindSize, "bytes per second the volume gets when the node is at capacity", func(l *Limits) int64 { return l.BPSReservation }, func(l *Limits, v int64, _ float64) { l.BPSReservation = v }},
	{"weight", "weight", kindWeight, "share of the node capacity left after reservations, 1-10000 (default 100)", func(l *Limits) int64 { return int64(l.Weight) }, func(l *Limits, v int64, _ float64) { l.Weight = int(v) }},
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

// Setting describes one QoS setting for a command line or a form.
type Setting struct {
	Flag  string // CLI flag name: iops-limit
	JSON  string // API and metadata name: iops_limit
	Unit  string // what a value counts: iops, bytes/s, seconds, weight
	Usage string // what it does and the values it takes
}

// Settings lists every setting, in FlagNames order. A value of 0 or none
// clears a setting.
func Settings() []Setting {
	out := make([]Setting, len(fields))
	for i, f := range fields {
		out[i] = Setting{Flag: f.flag, JSON: f.json, Unit: [...]string{kindCount: "iops", kindSize: "bytes/s", kindFloat: "seconds", kindWeight: "weight"}[f.kind], Usage: f.usage}
	}
	return out
}

// ErrBadLimit matches (errors.Is) every error SetFlag and UnmarshalJSON
// return. Their text names the setting and the value, not this sentinel.
var ErrBadLimit = errors.New("bad qos limit")

// badLimit is an error that is ErrBadLimit.
type badLimit struct{ msg string }

func (e *badLimit) Error() string        { return e.msg }
func (e *badLimit) Is(target error) bool { return target == ErrBadLimit }

func badf(format string, a ...any) error { return &badLimit{fmt.Sprintf(format, a...)} }

// SetFlag sets one field of l from a CLI value. name is a flag name
// ("iops-limit", "--iops-limit") or a JSON name ("iops_limit"). IOPS
// fields and the weight take counts ("5000", "5k"); bps fields take
// rates ("50MiB", "50MiB/s"); burst takes seconds ("1.5", "2s"); "none"
// and "0" clear the field. l is unchanged on error. SetFlag does not run
// Validate: callers apply all their flags, then validate the result.
func (l *Limits) SetFlag(name, value string) error {
	name = strings.TrimLeft(name, "-")
	var f *field
	for i := range fields {
		if fields[i].flag == name || fields[i].json == name {
			f = &fields[i]
			break
		}
	}
	if f == nil {
		return badf("unknown QoS setting %q (want one of %s)", name, strings.Join(FlagNames(), ", "))
	}
	n, secs, err := parseValue(f, name, strings.TrimSpace(value))
	if err != nil {
		return &badLimit{err.Error()}
	}
	f.set(l, n, secs)
	return nil
}

// parseValue returns an integer value, or seconds for burst.
func parseValue(f *field, name, s string) (int64, float64, error) {
	if strings.EqualFold(s, "none") {
		return 0, 0, nil
	}
	if s == "" {
		return 0, 0, fmt.Errorf("%s: empty value (use none or 0 to clear)", name)
	}
	switch f.kind {
	case kindFloat:
		v, err := strconv.ParseFloat(strings.TrimSuffix(s, "s"), 64)
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return 0, 0, fmt.Errorf("%s %q is not a number of seconds", name, s)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", name, s)
		}
		if v > MaxBurst {
			return 0, 0, fmt.Errorf("%s %q exceeds the maximum of %d seconds", name, s, MaxBurst)
		}
		return 0, v, nil
	case kindSize:
		if strings.HasPrefix(s, "-") {
			return 0, 0, fmt.Errorf("%s %q is negative", name, s)
		}
		v, err := units.ParseRate(s)
		if err != nil {
			return 0, 0, fmt.Errorf("%s %q is not a size: %v", name, s, err)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", name, s)
		}
		return v, 0, nil
	default:
		if strings.HasPrefix(s, "-") {
			return 0, 0, fmt.Errorf("%s %q is negative", name, s)
		}
		v, err := units.ParseCount(s)
		if err != nil {
			return 0, 0, fmt.Errorf("%s %q is not a whole number (5000, 5k)", name, s)
		}
		if v < 0 {
			return 0, 0, fmt.Errorf("%s %q is negative", name, s)
		}
		if f.kind == kindWeight && v > MaxWeight {
			return 0, 0, fmt.Errorf("%s %q exceeds the maximum of %d", name, s, MaxWeight)
		}
		return v, 0, nil
	}
}

// UnmarshalJSON sets the fields named in a JSON object, leaving the others
// as they are, so that decoding onto a volume's current limits applies a
// change. Keys are the JSON names (iops_limit, ..., weight); values are
// numbers or the strings SetFlag takes ("5k", "200MiB", "none"). The
// metadata files and `volume get -o json` use the same names, so what the
// daemon prints it also accepts.
func (l *Limits) UnmarshalJSON(b []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return badf("qos: want an object such as {\"iops_limit\": \"5k\"}")
	}
	next := *l
	for _, f := range fields { // in a stable order, so errors are too
		raw, ok := m[f.json]
		if !ok {
			continue
		}
		delete(m, f.json)
		var v string
		if err := json.Unmarshal(raw, &v); err != nil {
			var num json.Number
			if err := json.Unmarshal(raw, &num); err != nil {
				return badf("%s: want a number or a string", f.json)
			}
			v = num.String()
		}
		if err := next.SetFlag(f.json, v); err != nil {
			return err
		}
	}
	for k := range m {
		return badf("unknown qos setting %q (want one of %s)", k, strings.Join(JSONNames(), ", "))
	}
	*l = next
	return nil
}

// JSONNames lists the JSON names of the settings, in FlagNames order.
func JSONNames() []string {
	names := make([]string, len(fields))
	for i, f := range fields {
		names[i] = f.json
	}
	return names
}

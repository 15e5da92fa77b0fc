package blockd

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/blockd/blockd/qos"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
)

// DefaultStateDir is where `blockd serve` keeps metadata and backing files
// unless told otherwise.
const DefaultStateDir = "/var/lib/blockd"

const usage = `blockd — node block-storage daemon

Usage:
  blockd serve [flags]                      run the daemon
  blockd volume create NAME --size SIZE [--engine file|memory] [--profile P] [--read-only]
  blockd volume list [-o table|json]
  blockd volume get NAME [-o table|json]
  blockd volume delete NAME
  blockd volume resize NAME --size SIZE     grow a volume (shrinking is refused)
  blockd volume set NAME [--profile P] [--read-only=true|false]
  blockd attach NAME [--frontend nbd|ublk] [--connections N] [--queues N --depth D]
                                            expose as /dev/nbdN or /dev/ublkbN; prints the device
  blockd detach NAME|DEVICE
  blockd top [--interval 1s]                busiest pods by IOPS, bandwidth, p99 (eBPF)

Client commands talk to the daemon's API socket: --api-socket PATH, or
$BLOCKD_API_SOCKET, or ` + DefaultStateDir + `/blockd.sock.
SIZE takes units: 512MiB, 1GiB, 2TiB (powers of 1024), or plain bytes.
Profiles: auto (default), db, db_remote, sequential, random, journal, none.
Run 'blockd COMMAND -h' for the flags of a command.
`

// Main runs the blockd command line and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serveCmd(args[1:], stderr)
	case "volume", "volumes", "vol":
		err = volumeCmd(args[1:], stdout, stderr)
	case "attach":
		err = attachCmd(args[1:], stdout, stderr)
	case "detach":
		err = detachCmd(args[1:], stdout, stderr)
	case "top":
		err = topCmd(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "blockd: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	fmt.Fprintf(stderr, "blockd: %v\n", err)
	return 1
}

var errUsage = errors.New("usage")

// parseInterleaved parses flags that may come before or after positional
// arguments ("volume create NAME --size 1GiB") and returns the positionals.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func apiSocketFlag(fs *flag.FlagSet) *string {
	def := os.Getenv("BLOCKD_API_SOCKET")
	if def == "" {
		def = DefaultStateDir + "/blockd.sock"
	}
	return fs.String("api-socket", def, "control API socket of the daemon (env BLOCKD_API_SOCKET)")
}

// wantArgs checks the positional argument count.
func wantArgs(fs *flag.FlagSet, pos []string, n int, what string) error {
	if len(pos) != n {
		fmt.Fprintf(fs.Output(), "blockd: %s\n", what)
		fs.Usage()
		return errUsage
	}
	return nil
}

func volumeCmd(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		fs := newFlagSet("volume create", "blockd volume create NAME --size SIZE [--engine file|memory] [--profile P] [--read-only]", stderr)
		sock := apiSocketFlag(fs)
		size := fs.String("size", "", "volume size, e.g. 10GiB (required)")
		engine := fs.String("engine", "file", "backing store: file (sparse file in the state dir) or memory (lost on restart)")
		profile := fs.String("profile", "auto", "io_profile: auto, db, db_remote, sequential, random, journal, none")
		ro := fs.Bool("read-only", false, "refuse writes")
		out := fs.String("o", "table", "output: table or json")
		qosSet := map[string]string{}
		qosFlags(fs, qosSet)
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 1, "volume create takes one NAME"); err != nil {
			return err
		}
		if *size == "" {
			return fmt.Errorf("volume create %s: --size is required (e.g. --size 10GiB)", pos[0])
		}
		n, err := ParseSize(*size)
		if err != nil {
			return err
		}
		vi, err := NewClient(*sock).CreateVolume(CreateRequest{Name: pos[0], Size: Size(n), Engine: *engine, Profile: *profile, ReadOnly: *ro, QoS: qosSet})
		if err != nil {
			return err
		}
		return printVolumes(stdout, *out, []VolumeInfo{vi}, true)
	case "list", "ls":
		fs := newFlagSet("volume list", "blockd volume list [-o table|json]", stderr)
		sock := apiSocketFlag(fs)
		out := fs.String("o", "table", "output: table or json")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 0, "volume list takes no arguments"); err != nil {
			return err
		}
		vs, err := NewClient(*sock).ListVolumes()
		if err != nil {
			return err
		}
		return printVolumes(stdout, *out, vs, false)
	case "get", "show":
		fs := newFlagSet("volume get", "blockd volume get NAME [-o table|json]", stderr)
		sock := apiSocketFlag(fs)
		out := fs.String("o", "table", "output: table or json")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 1, "volume get takes one NAME"); err != nil {
			return err
		}
		vi, err := NewClient(*sock).GetVolume(pos[0])
		if err != nil {
			return err
		}
		return printVolumes(stdout, *out, []VolumeInfo{vi}, true)
	case "delete", "rm":
		fs := newFlagSet("volume delete", "blockd volume delete NAME", stderr)
		sock := apiSocketFlag(fs)
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 1, "volume delete takes one NAME"); err != nil {
			return err
		}
		if err := NewClient(*sock).DeleteVolume(pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "volume %s deleted\n", pos[0])
		return nil
	case "resize":
		fs := newFlagSet("volume resize", "blockd volume resize NAME --size SIZE", stderr)
		sock := apiSocketFlag(fs)
		size := fs.String("size", "", "new size, larger than the current one (required)")
		out := fs.String("o", "table", "output: table or json")
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 1, "volume resize takes one NAME"); err != nil {
			return err
		}
		n, err := ParseSize(*size)
		if err != nil {
			return fmt.Errorf("volume resize %s: --size: %w", pos[0], err)
		}
		vi, err := NewClient(*sock).ResizeVolume(pos[0], n)
		if err != nil {
			return err
		}
		return printVolumes(stdout, *out, []VolumeInfo{vi}, true)
	case "set":
		fs := newFlagSet("volume set", "blockd volume set NAME [--profile P] [--read-only=true|false]", stderr)
		sock := apiSocketFlag(fs)
		out := fs.String("o", "table", "output: table or json")
		var req UpdateRequest
		req.QoS = map[string]string{}
		qosFlags(fs, req.QoS)
		fs.Func("profile", "io_profile: auto, db, db_remote, sequential, random, journal, none", func(s string) error {
			req.Profile = &s
			return nil
		})
		fs.BoolFunc("read-only", "refuse (true) or allow (false) writes", func(s string) error {
			b := s == "true" || s == "1"
			if !b && s != "false" && s != "0" {
				return fmt.Errorf("want true or false")
			}
			req.ReadOnly = &b
			return nil
		})
		pos, err := parseInterleaved(fs, args)
		if err != nil {
			return err
		}
		if err := wantArgs(fs, pos, 1, "volume set takes one NAME"); err != nil {
			return err
		}
		if req.Profile == nil && req.ReadOnly == nil && len(req.QoS) == 0 {
			return fmt.Errorf("volume set %s: nothing to change (see 'blockd volume set -h')", pos[0])
		}
		vi, err := NewClient(*sock).UpdateVolume(pos[0], req)
		if err != nil {
			return err
		}
		return printVolumes(stdout, *out, []VolumeInfo{vi}, true)
	}
	fmt.Fprintf(stderr, "blockd: unknown volume command %q\n\n%s", sub, usage)
	return errUsage
}

func printVolumes(w io.Writer, format string, vs []VolumeInfo, single bool) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if single && len(vs) == 1 {
			return enc.Encode(vs[0])
		}
		return enc.Encode(vs)
	case "table", "":
	default:
		return fmt.Errorf("output format %q: want table or json", format)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSIZE\tENGINE\tPROFILE\tMODE\tALLOCATED\tDEVICE\tQOS\tCREATED")
	for _, v := range vs {
		mode := "rw"
		if v.ReadOnly {
			mode = "ro"
		}
		alloc := "-"
		if v.Path != "" {
			alloc = humanBytes(v.Allocated)
		}
		dev := "-"
		if v.Attachment != nil {
			dev = v.Attachment.Device
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.SizeHuman, v.Engine, v.Profile, mode, alloc, dev, qosSummary(v.QoS), v.CreatedAt.Format("2006-01-02 15:04:05"))
	}
	return tw.Flush()
}

// humanBytes renders n rounded to one decimal in binary units.
func qosFlags(fs *flag.FlagSet, set map[string]string) {
	for _, name := range qos.FlagNames() {
		fs.Func(name, "QoS "+name+" (none or 0 clears)", func(s string) error {
			set[name] = s
			return nil
		})
	}
}

func humanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f := float64(n)
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := fmt.Sprintf("%.1f", f)
	return strings.TrimSuffix(s, ".0") + units[i]
}

func attachCmd(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("attach", "blockd attach NAME [--frontend nbd|ublk] [--connections N] [--queues N --depth D]", stderr)
	sock := apiSocketFlag(fs)
	frontend := fs.String("frontend", FrontendNBD, "kernel frontend: nbd (/dev/nbdN) or ublk (/dev/ublkbN, kernel 6.0+)")
	conns := fs.Int("connections", 0, "nbd: sockets (kernel hardware queues); default one per CPU, at most 8 (one on kernels before 6.12: see vm/README.md)")
	queues := fs.Int("queues", 0, "ublk: hardware queues; default one per CPU, at most 4")
	depth := fs.Int("depth", 0, "ublk: requests in flight per queue; default 64")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(fs, pos, 1, "attach takes one volume NAME"); err != nil {
		return err
	}
	vi, err := NewClient(*sock).Attach(pos[0], AttachRequest{Frontend: *frontend, Connections: *conns, Queues: *queues, Depth: *depth})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, vi.Attachment.Device)
	return nil
}

func detachCmd(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("detach", "blockd detach NAME|DEVICE", stderr)
	sock := apiSocketFlag(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(fs, pos, 1, "detach takes one volume NAME or DEVICE path"); err != nil {
		return err
	}
	c := NewClient(*sock)
	name := pos[0]
	if strings.HasPrefix(name, "/dev/") {
		vs, err := c.ListVolumes()
		if err != nil {
			return err
		}
		found := ""
		for _, v := range vs {
			if v.Attachment != nil && v.Attachment.Device == name {
				found = v.Name
			}
		}
		if found == "" {
			return fmt.Errorf("detach %s: not a device attached by blockd", name)
		}
		name = found
	}
	vi, err := c.Detach(name)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "volume %s detached\n", vi.Name)
	return nil
}

// qosSummary renders the limits that are set, in flag names: caps as
// "iops-limit=5000", so the table reads like the command that set them.
func qosSummary(l qos.Limits) string {
	var parts []string
	add := func(name string, n int64, size bool) {
		if n == 0 {
			return
		}
		v := strconv.FormatInt(n, 10)
		if size {
			v = humanBytes(n) + "/s"
		}
		parts = append(parts, name+"="+v)
	}
	add("iops", l.IOPS, false)
	add("read-iops", l.ReadIOPS, false)
	add("write-iops", l.WriteIOPS, false)
	add("bps", l.BPS, true)
	add("read-bps", l.ReadBPS, true)
	add("write-bps", l.WriteBPS, true)
	add("iops-reservation", l.IOPSReservation, false)
	add("bps-reservation", l.BPSReservation, true)
	add("weight", int64(l.Weight), false)
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
	"github.com/blockd/blockd/units"
)

func newVolume() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "volume",
		Aliases: []string{"volumes", "vol"},
		Short:   "Create, list, inspect, change and delete volumes",
		Args:    cobra.ArbitraryArgs,
		RunE:    groupRun,
	}
	cmd.AddCommand(newVolumeCreate(), newVolumeList(), newVolumeGet(), newVolumeDelete(), newVolumeResize(), newVolumeSet(),
		newVolumePromote(), newVolumeResync(), newVolumeVerify(), newVolumeWait(), newVolumeMove())
	return cmd
}

// completeVolumes completes a volume name from the running daemon.
func completeVolumes(sock *string) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		vs, err := api.NewClient(*sock).ListVolumes()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var names []string
		for _, v := range vs {
			names = append(names, v.Name)
		}
		return names, cobra.ShellCompDirectiveNoFileComp
	}
}

var profileUsage = "`io_profile`: " + joinNames(profile.Names()) + " (see README, io_profiles)"

// qosFlags adds one flag per QoS setting; the ones given land in set,
// keyed by their JSON names.
func qosFlags(fs *pflag.FlagSet, set map[string]string) {
	for _, s := range qos.Settings() {
		fs.Var(&qosValue{set: set, key: s.JSON, flag: s.Flag, unit: s.Unit}, s.Flag, "QoS: "+s.Usage+"; 0 or none clears")
	}
}

type qosValue struct {
	set             map[string]string
	key, flag, unit string
}

func (q *qosValue) String() string { return q.set[q.key] }
func (q *qosValue) Type() string   { return "value" }
func (q *qosValue) Set(s string) error {
	// Check the value here, so a typo is a usage error naming the flag.
	var l qos.Limits
	if err := l.SetFlag(q.flag, s); err != nil {
		return err
	}
	q.set[q.key] = s
	return nil
}

func newVolumeCreate() *cobra.Command {
	var (
		size, engine, prof, out, sock *string
		ro                            *bool
		repl                          *int
		nodes, zones                  *[]string
		set                           = map[string]string{}
	)
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "Create a volume",
		Long: `Create a volume. Its name becomes the NBD export name; it matches
[a-z0-9][a-z0-9._-]{0,62}. The size is a multiple of 4KiB.`,
		Example: `  blockd volume create db --size 10GiB --profile db
  blockd volume create pg --size 50GiB --repl 3 --profile db
  blockd volume create scratch --size 1GiB --engine memory --iops-limit 5k`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			if *size == "" {
				return usagef("volume create %s: --size is required (e.g. --size 10GiB)", args[0])
			}
			n, err := units.ParseSize(*size)
			if err != nil {
				return usagef("--size: %v", err)
			}
			spec := api.Spec{Name: args[0], Size: api.Size(n), Engine: *engine, Profile: *prof, ReadOnly: *ro, Repl: *repl, Nodes: *nodes, Zones: *zones}
			if len(set) > 0 {
				if err := json.Unmarshal(api.QoSChange(set), &spec.QoS); err != nil {
					return usageError{err}
				}
			}
			vi, err := api.NewClient(*sock).CreateVolume(spec)
			if err != nil {
				return err
			}
			return printVolumes(cmd.OutOrStdout(), *out, []api.Volume{vi}, true)
		},
	}
	fs := cmd.Flags()
	sock = clientFlags(cmd)
	size = fs.String("size", "", "volume `size`, e.g. 10GiB (required)")
	engine = fs.String("engine", ioengine.KindFile, "backing store (`engine`): file (sparse file in the state dir) or memory (RAM; lost when the daemon stops)")
	prof = fs.String("profile", profile.Auto.String(), profileUsage)
	ro = fs.Bool("read-only", false, "refuse writes")
	repl = fs.Int("repl", 1, "copies of the data, this node's included (1-3); writes complete when every in-sync copy has them")
	nodes = fs.StringSlice("nodes", nil, "`nodes` that hold the other copies (default: the peers with the most free space); in a cluster, every copy's node")
	zones = fs.StringSlice("zones", nil, "in a cluster: place the copies in these `zones` only (default: spread over every zone)")
	out = outputFlag(cmd)
	qosFlags(fs, set)
	cmd.RegisterFlagCompletionFunc("engine", cobra.FixedCompletions(ioengine.Kinds, cobra.ShellCompDirectiveNoFileComp))
	cmd.RegisterFlagCompletionFunc("profile", cobra.FixedCompletions(profile.Names(), cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func newVolumeList() *cobra.Command {
	var out, sock *string
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List volumes (failed ones too, with the reason)",
		Args:    args(0, ""),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			vs, err := api.NewClient(*sock).ListVolumes()
			if err != nil {
				return err
			}
			return printVolumes(cmd.OutOrStdout(), *out, vs, false)
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	return cmd
}

func newVolumeGet() *cobra.Command {
	var out, sock *string
	cmd := &cobra.Command{
		Use:     "get NAME",
		Aliases: []string{"show"},
		Short:   "Show one volume; -o json adds the io_profile counters",
		Args:    args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			vi, err := api.NewClient(*sock).GetVolume(args[0])
			if err != nil {
				return err
			}
			if err := printVolumes(cmd.OutOrStdout(), *out, []api.Volume{vi}, true); err != nil {
				return err
			}
			if *out == "table" && vi.Placement != nil {
				printPlacement(cmd.OutOrStdout(), vi)
			}
			return nil
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeDelete() *cobra.Command {
	var sock *string
	cmd := &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "Delete a volume and its data (a failed volume too)",
		Args:    args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := api.NewClient(*sock).DeleteVolume(args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s deleted\n", args[0])
			return nil
		},
	}
	sock = clientFlags(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeResize() *cobra.Command {
	var size, out, sock *string
	cmd := &cobra.Command{
		Use:   "resize NAME --size SIZE",
		Short: "Grow a volume (shrinking is refused)",
		Long: `Grow a volume. Network NBD clients see the new size when they next connect;
an attached kernel device must be detached first.`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			if *size == "" {
				return usagef("volume resize %s: --size is required", args[0])
			}
			n, err := units.ParseSize(*size)
			if err != nil {
				return usagef("--size: %v", err)
			}
			vi, err := api.NewClient(*sock).ResizeVolume(args[0], n)
			if err != nil {
				return err
			}
			return printVolumes(cmd.OutOrStdout(), *out, []api.Volume{vi}, true)
		},
	}
	sock = clientFlags(cmd)
	size = cmd.Flags().String("size", "", "new `size`, larger than the current one, e.g. 20GiB (required)")
	out = outputFlag(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeSet() *cobra.Command {
	var (
		out, sock, prof *string
		ro              *bool
		set             = map[string]string{}
	)
	cmd := &cobra.Command{
		Use:   "set NAME [--profile P] [--read-only[=false]] [QoS flags]",
		Short: "Change a volume's io_profile, read-only mode or QoS, live",
		Example: `  blockd volume set db --profile journal
  blockd volume set db --iops-limit 5k --bps-limit 200MiB --burst 2
  blockd volume set db --iops-limit none`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			var req api.UpdateRequest
			if cmd.Flags().Changed("profile") {
				req.Profile = prof
			}
			if cmd.Flags().Changed("read-only") {
				req.ReadOnly = ro
			}
			req.QoS = api.QoSChange(set)
			if req.Profile == nil && req.ReadOnly == nil && req.QoS == nil {
				return usagef("volume set %s: nothing to change (see 'blockd volume set --help')", args[0])
			}
			vi, err := api.NewClient(*sock).UpdateVolume(args[0], req)
			if err != nil {
				return err
			}
			return printVolumes(cmd.OutOrStdout(), *out, []api.Volume{vi}, true)
		},
	}
	fs := cmd.Flags()
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	prof = fs.String("profile", "", profileUsage)
	ro = fs.Bool("read-only", false, "refuse writes (--read-only=false allows them again)")
	qosFlags(fs, set)
	cmd.ValidArgsFunction = completeVolumes(sock)
	cmd.RegisterFlagCompletionFunc("profile", cobra.FixedCompletions(profile.Names(), cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func printVolumes(w io.Writer, format string, vs []api.Volume, single bool) error {
	if format == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if single && len(vs) == 1 {
			return enc.Encode(vs[0])
		}
		return enc.Encode(vs)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tSIZE\tENGINE\tPROFILE\tMODE\tALLOCATED\tDEVICE\tREPL\tQOS\tCREATED")
	var reasons []string
	for _, v := range vs {
		mode := "rw"
		if v.ReadOnly {
			mode = "ro"
		}
		alloc := "-"
		if v.Path != "" {
			alloc = units.HumanSize(v.Allocated)
		}
		dev := "-"
		if v.Attachment != nil {
			dev = v.Attachment.Device
		}
		prof := v.Profile
		if v.EffectiveProfile != "" && v.EffectiveProfile != v.Profile {
			prof += " (" + v.EffectiveProfile + ")" // what auto learned
		}
		created := "-"
		if !v.CreatedAt.IsZero() {
			created = v.CreatedAt.Format("2006-01-02 15:04:05")
		}
		state := v.State
		if v.Reason != "" {
			state += "*"
			reasons = append(reasons, fmt.Sprintf("* %s: %s", v.Name, v.Reason))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, state, v.SizeHuman, v.Engine, prof, mode, alloc, dev, replicaSummary(v), qosSummary(v.QoS), created)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range reasons {
		fmt.Fprintln(w, r)
	}
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
			v = units.HumanSize(n) + "/s"
		}
		parts = append(parts, name+"="+v)
	}
	add("iops-limit", l.IOPS, false)
	add("read-iops-limit", l.ReadIOPS, false)
	add("write-iops-limit", l.WriteIOPS, false)
	add("bps-limit", l.BPS, true)
	add("read-bps-limit", l.ReadBPS, true)
	add("write-bps-limit", l.WriteBPS, true)
	if l.Burst != 0 {
		parts = append(parts, "burst="+strconv.FormatFloat(l.Burst, 'f', -1, 64)+"s")
	}
	add("iops-reservation", l.IOPSReservation, false)
	add("bps-reservation", l.BPSReservation, true)
	add("weight", int64(l.Weight), false)
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

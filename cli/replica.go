package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/units"
)

func newVolumePromote() *cobra.Command {
	var (
		sock  *string
		force *bool
	)
	cmd := &cobra.Command{
		Use:   "promote NAME [--force]",
		Short: "Make this node's replica of a volume its owner (the owner is gone)",
		Long: `Make this node's replica of a volume its owner, at an epoch above every epoch the reachable
copies know. It is refused while a reachable node still owns the volume or a reachable copy
holds a newer generation (it saw acknowledged writes this copy may lack); --force overrides
and may lose acknowledged writes. The old owner, when it comes back, finds the newer epoch,
stops serving and becomes a replica that resyncs.`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			vi, err := api.NewClient(*sock).Promote(args[0], *force)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: this node owns it now (epoch %d)\n", vi.Name, vi.Replication.Epoch)
			return nil
		},
	}
	sock = clientFlags(cmd)
	force = cmd.Flags().Bool("force", false, "promote even if a reachable copy is newer or a reachable owner answers")
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeResync() *cobra.Command {
	var sock *string
	cmd := &cobra.Command{
		Use:   "resync NAME",
		Short: "Retry the replicas of a volume that are not in sync now",
		Args:  args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			vi, err := api.NewClient(*sock).Resync(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: %s\n", vi.Name, replicaSummary(vi))
			return nil
		},
	}
	sock = clientFlags(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeVerify() *cobra.Command {
	var sock, out *string
	cmd := &cobra.Command{
		Use:   "verify NAME",
		Short: "Compare every in-sync replica with the owner's copy; exit 1 on any difference",
		Long: `Compare every in-sync replica of a volume with the owner's copy, region by region, by
checksum (writes to the region being compared wait meanwhile). Prints the regions that
differ and exits 1 if any does, or if a replica could not be compared.`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			res, err := api.NewClient(*sock).Verify(args[0])
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if *out == "json" {
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				enc.Encode(res)
			} else {
				for _, r := range res.Replicas {
					switch {
					case r.Error != "":
						fmt.Fprintf(w, "%s: not verified: %s\n", r.Node, r.Error)
					case len(r.Differ) == 0:
						fmt.Fprintf(w, "%s: identical (%s compared)\n", r.Node, units.HumanSize(r.Compared))
					default:
						fmt.Fprintf(w, "%s: %d regions of %s differ:", r.Node, len(r.Differ), units.FormatSize(r.Region))
						for i, d := range r.Differ {
							if i == 20 {
								fmt.Fprintf(w, " ...")
								break
							}
							fmt.Fprintf(w, " %d (bytes %d-%d)", d, d*r.Region, (d+1)*r.Region-1)
						}
						fmt.Fprintln(w)
					}
				}
			}
			if !res.OK {
				return fmt.Errorf("volume %s: replicas differ or could not be verified", res.Volume)
			}
			return nil
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeWait() *cobra.Command {
	var (
		sock    *string
		inSync  *bool
		timeout *time.Duration
	)
	cmd := &cobra.Command{
		Use:   "wait NAME --in-sync [--timeout D]",
		Short: "Wait until every replica of a volume is in sync, showing the resync's progress",
		Args:  args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !*inSync {
				return usagef("volume wait: say what to wait for (--in-sync)")
			}
			c := api.NewClient(*sock)
			w := cmd.OutOrStdout()
			tty := isTerminal(w)
			deadline := time.Now().Add(*timeout)
			last := ""
			for {
				vi, err := c.GetVolume(args[0])
				if err != nil {
					return err
				}
				var done bool
				var line string
				switch {
				case vi.Placement != nil && (vi.Replication == nil || vi.Replication.Role != api.RoleOwner):
					// A cluster volume owned elsewhere: the store's
					// in-sync set.
					p := vi.Placement
					done = len(p.InSync) == len(p.Nodes)
					line = "volume " + vi.Name + ": " + placementSummary(vi)
					if !done && p.Owner == "" {
						line += "; no node owns it: its copies resync once a frontend takes it"
					}
				case vi.Replication == nil || vi.Replication.Role != api.RoleOwner:
					return fmt.Errorf("volume %s has no replicas owned by this node", vi.Name)
				default:
					done = true
					for _, r := range vi.Replicas {
						if r.State != api.ReplicaInSync {
							done = false
						}
					}
					line = progressLine(vi)
				}
				if tty {
					fmt.Fprintf(w, "\r\x1b[K%s", line)
				} else if line != last {
					fmt.Fprintln(w, line)
				}
				last = line
				if done {
					if tty {
						fmt.Fprintln(w)
					}
					fmt.Fprintf(w, "volume %s: every replica in sync\n", vi.Name)
					return nil
				}
				if *timeout > 0 && time.Now().After(deadline) {
					if tty {
						fmt.Fprintln(w)
					}
					return fmt.Errorf("volume %s: replicas not in sync after %s", vi.Name, *timeout)
				}
				time.Sleep(500 * time.Millisecond)
			}
		},
	}
	sock = clientFlags(cmd)
	inSync = cmd.Flags().Bool("in-sync", false, "wait until every replica is in sync")
	timeout = cmd.Flags().Duration("timeout", 0, "give up (exit 1) after this `duration`, e.g. 10m (0: wait forever)")
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

// progressLine is one line per replica: a bar, percent, bytes left, rate
// and time left.
func progressLine(vi api.Volume) string {
	var parts []string
	for _, r := range vi.Replicas {
		switch r.State {
		case api.ReplicaInSync:
			parts = append(parts, r.Node+": in-sync")
		case api.ReplicaResyncing:
			const width = 20
			fill := int(r.ResyncPercent / 100 * width)
			bar := strings.Repeat("#", fill) + strings.Repeat(".", width-fill)
			s := fmt.Sprintf("%s: [%s] %5.1f%% %s left", r.Node, bar, r.ResyncPercent, units.HumanSize(r.BytesLeft))
			if r.RateBytes > 0 {
				s += fmt.Sprintf(", %s/s, ETA %s", units.HumanSize(r.RateBytes), (time.Duration(r.ETASeconds) * time.Second).String())
			}
			parts = append(parts, s)
		default:
			s := r.Node + ": " + r.State
			if r.LastError != "" {
				s += " (" + r.LastError + ")"
			}
			parts = append(parts, s)
		}
	}
	return strings.Join(parts, "  ")
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// replicaSummary is the REPL column: the copies and their states.
func replicaSummary(v api.Volume) string {
	if v.Placement != nil {
		return placementSummary(v)
	}
	r := v.Replication
	if r == nil {
		return "1"
	}
	if r.Role == api.RoleReplica {
		return "replica of " + r.Owner
	}
	var parts []string
	for _, st := range v.Replicas {
		s := st.Node + ":" + st.State
		if st.State == api.ReplicaResyncing {
			s += fmt.Sprintf(" %.0f%%", st.ResyncPercent)
		}
		parts = append(parts, s)
	}
	return fmt.Sprintf("%d (%s)", len(r.Replicas)+1, strings.Join(parts, ","))
}

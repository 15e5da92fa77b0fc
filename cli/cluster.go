package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/units"
)

func newNode() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "node",
		Aliases: []string{"nodes"},
		Short:   "The nodes of the daemon's cluster",
		Args:    cobra.ArbitraryArgs,
		RunE:    groupRun,
	}
	cmd.AddCommand(newNodeList())
	return cmd
}

func newNodeList() *cobra.Command {
	var out, sock *string
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the cluster's nodes: ready or unreachable, address, labels, space, volumes",
		Long: `List every node that ever joined the daemon's cluster. A node is ready while its lease
in etcd is alive, unreachable once it expired (the node died, stopped or lost etcd).
VOLUMES counts the volumes with a copy on the node, OWNED those it serves.`,
		Args: args(0, ""),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			ns, err := api.NewClient(*sock).Nodes()
			if err != nil {
				return err
			}
			return printNodes(cmd.OutOrStdout(), *out, ns)
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	return cmd
}

func printNodes(w io.Writer, format string, ns []api.Node) error {
	if format == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(ns)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tADDRESS\tLABELS\tFREE\tCAPACITY\tVOLUMES\tOWNED\tSINCE")
	for _, n := range ns {
		var labels []string
		for k, v := range n.Labels {
			labels = append(labels, k+"="+v)
		}
		slices.Sort(labels)
		lt := strings.Join(labels, ",")
		if lt == "" {
			lt = "-"
		}
		since := "-"
		if !n.Since.IsZero() {
			since = n.Since.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", n.Name, n.State, n.Addr, lt,
			units.HumanSize(n.Free), units.HumanSize(n.Capacity), n.Volumes, n.Owned, since)
	}
	return tw.Flush()
}

func newVolumeMove() *cobra.Command {
	var sock, to *string
	cmd := &cobra.Command{
		Use:   "move NAME --to NODE",
		Short: "Hand a cluster volume over to another node with an in-sync copy",
		Long: `Hand a cluster volume over to NODE: its owner cuts its frontends off, drains and flushes
its writes to every copy and releases it; NODE then owns it, with nothing to compare (the
hand-over is clean). Refused while the volume is attached as a kernel device (detach it
first), or when NODE's copy is not in sync. Clients reconnect to NODE.`,
		Example: `  blockd volume move pg --to node2`,
		Args:    args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if *to == "" {
				return usagef("volume move %s: --to NODE is required", args[0])
			}
			vi, err := api.NewClient(*sock).Move(args[0], *to)
			if err != nil {
				return err
			}
			epoch := uint64(0)
			if vi.Placement != nil {
				epoch = vi.Placement.Epoch
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: node %s owns it now (epoch %d)\n", vi.Name, *to, epoch)
			return nil
		},
	}
	sock = clientFlags(cmd)
	to = cmd.Flags().String("to", "", "the `node` to hand the volume to")
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

// placementSummary is the REPL column of a cluster volume: each node's
// copy, the owner first.
func placementSummary(v api.Volume) string {
	p := v.Placement
	live := map[string]string{}
	for _, st := range v.Replicas {
		s := st.State
		if st.State == api.ReplicaResyncing {
			s += fmt.Sprintf(" %.0f%%", st.ResyncPercent)
		}
		live[st.Node] = s
	}
	var parts []string
	if p.Owner != "" {
		parts = append(parts, p.Owner+":owner")
	}
	for _, n := range p.Nodes {
		if n == p.Owner {
			continue
		}
		s := live[n]
		switch {
		case s != "":
		case slices.Contains(p.InSync, n):
			s = api.ReplicaInSync
		default:
			s = "behind"
		}
		parts = append(parts, n+":"+s)
	}
	return fmt.Sprintf("%d (%s)", len(p.Nodes), strings.Join(parts, ","))
}

// printPlacement adds a cluster volume's owner and last failover under
// `volume get`.
func printPlacement(w io.Writer, v api.Volume) {
	p := v.Placement
	owner := "none (the first frontend takes it)"
	if p.Owner != "" {
		owner = fmt.Sprintf("%s (epoch %d)", p.Owner, p.Epoch)
	}
	fmt.Fprintf(w, "owner: %s; in sync: %s; generation %d\n", owner, strings.Join(p.InSync, ", "), p.Generation)
	if p.Attached != "" {
		fmt.Fprintf(w, "attached: %s\n", p.Attached)
	}
	if f := p.LastFailover; f != nil {
		from := f.From
		if from == "" {
			from = "(none)"
		}
		how := "failover: the old owner's lease expired; copies compared"
		switch {
		case f.From == "":
			how = "first owner"
		case f.Clean:
			how = "clean hand-over"
		}
		fmt.Fprintf(w, "last owner change: %s -> %s at %s (epoch %d, %s, by %s, waited %s)\n", from, f.To,
			f.At.Local().Format(time.DateTime), f.Epoch, how, f.By, time.Duration(f.Waited))
	}
}

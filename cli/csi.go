package cli

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/csi"
)

func newCSI() *cobra.Command {
	var (
		endpoint, nodeID, name string
		logFormat, logLevel    string
		expandOnNode           bool
	)
	cmd := &cobra.Command{
		Use:   "csi",
		Short: "Run the CSI driver (Kubernetes) against this node's daemon",
		Long: `Serve the Container Storage Interface (Identity, Controller and Node services) on
--endpoint, for kubelet and the external-provisioner and -resizer sidecars. The
driver is a client of this node's blockd daemon through its API socket: it keeps no
state of its own, and it and the daemon restart independently.

StorageClass parameters: repl (1-3), io_profile, secure ("true": encrypted, when
the daemon supports it), frontend (nbd or ublk), and the QoS settings by their API
names (iops_limit, bps_limit, iops_reservation, weight, ...). Unknown parameters
are refused, naming them.`,
		Args: args(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), logFormat, logLevel)
			if err != nil {
				return err
			}
			if nodeID == "" {
				nodeID = os.Getenv("NODE_NAME")
			}
			if nodeID == "" {
				nodeID, _ = os.Hostname()
			}
			sock, _ := cmd.Flags().GetString("api-socket")
			client := api.NewClient(sock)
			ver, commit := Version()
			d, err := csi.New(csi.Options{Name: name, Version: ver + "+" + commit, NodeID: nodeID, Client: client, Log: log, ExpandOnNode: expandOnNode})
			if err != nil {
				return usagef("%v", err)
			}
			if expandOnNode {
				log.Info("controller without a daemon: volume expansion is done by the node that stages the volume")
			} else if h, err := client.Info(); err != nil {
				log.Warn("the blockd daemon does not answer yet; serving anyway (Probe says not ready until it does)", "err", err)
			} else if h.Node != "" && h.Node != nodeID {
				log.Warn("the daemon's --node differs from --node-id: volumes' topology names the daemon's node, which the scheduler must know by the same name",
					"daemon_node", h.Node, "node_id", nodeID)
			}
			sigc := make(chan os.Signal, 1)
			signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
			defer signal.Stop(sigc)
			go func() {
				s := <-sigc
				log.Info("csi driver stopping", "signal", s.String())
				d.Stop()
			}()
			return d.Serve(endpoint) // nil after Stop
		},
	}
	fs := cmd.Flags()
	fs.SortFlags = false
	fs.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "CSI `endpoint` to serve (unix:///path)")
	clientFlags(cmd)
	fs.StringVar(&nodeID, "node-id", "", "this node's `name` (Kubernetes: spec.nodeName; default $NODE_NAME, else the host name)")
	fs.StringVar(&name, "driver-name", csi.DefaultName, "CSI driver `name` (the CSIDriver object and StorageClass provisioner)")
	fs.BoolVar(&expandOnNode, "expand-on-node", false, "for a controller that runs apart from the volumes' daemons (the Kubernetes controller Deployment): "+
		"ControllerExpandVolume accepts the new size and asks for node expansion, and the node that stages the volume grows it through its own daemon")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	return cmd
}

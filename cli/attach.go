package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
)

func newAttach() *cobra.Command {
	var (
		sock, frontend       *string
		conns, queues, depth *int
	)
	cmd := &cobra.Command{
		Use:   "attach NAME [--frontend nbd|ublk]",
		Short: "Expose a volume as a kernel block device and print its path",
		Long: `Expose a volume as /dev/nbdN (kernel nbd) or /dev/ublkbN (ublk, kernel 6.0+) and
print the device. The daemon loads the kernel module if needed. The attachment
survives a restart of the daemon (I/O waits meanwhile); 'blockd detach' removes it.`,
		Example: `  blockd attach db
  blockd attach db --frontend ublk --queues 2 --depth 128`,
		Args: args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			vi, err := api.NewClient(*sock).Attach(args[0], api.AttachRequest{Frontend: *frontend, Connections: *conns, Queues: *queues, Depth: *depth})
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), vi.Attachment.Device)
			return nil
		},
	}
	fs := cmd.Flags()
	sock = clientFlags(cmd)
	frontend = fs.String("frontend", api.FrontendNBD, "kernel frontend: nbd (/dev/nbdN) or ublk (/dev/ublkbN, kernel 6.0+)")
	conns = fs.Int("connections", 0, "nbd: sockets (kernel hardware queues), 1-64; default one per CPU, at most 8 (one on kernels before 6.12)")
	queues = fs.Int("queues", 0, "ublk: hardware queues, 1-32; default one per CPU, at most 4")
	depth = fs.Int("depth", 0, "ublk: requests in flight per queue, 1-4096; default 64")
	cmd.ValidArgsFunction = completeVolumes(sock)
	cmd.RegisterFlagCompletionFunc("frontend", cobra.FixedCompletions([]string{api.FrontendNBD, api.FrontendUblk}, cobra.ShellCompDirectiveNoFileComp))
	return cmd
}

func newDetach() *cobra.Command {
	var sock *string
	cmd := &cobra.Command{
		Use:   "detach NAME|DEVICE",
		Short: "Remove a volume's kernel block device",
		Args:  args(1, "one volume NAME or DEVICE path"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := api.NewClient(*sock)
			name := args[0]
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
					return fmt.Errorf("detach %s: not a device attached by blockd (see 'blockd volume list')", name)
				}
				name = found
			}
			vi, err := c.Detach(name)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s detached\n", vi.Name)
			return nil
		},
	}
	sock = clientFlags(cmd)
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

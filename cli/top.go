package cli

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/probe/podio"
)

func newTop() *cobra.Command {
	var (
		sock     *string
		interval *time.Duration
	)
	cmd := &cobra.Command{
		Use:   "top",
		Short: "Show the busiest pods by IOPS, bandwidth and p99 latency (eBPF probes)",
		Args:  args(0, ""),
		RunE: func(cmd *cobra.Command, args []string) error {
			if *interval <= 0 {
				return usagef("--interval %s: want a positive duration", *interval)
			}
			c := api.NewClient(*sock)
			if _, err := c.IOPods(); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			err := podio.Top(ctx, cmd.OutOrStdout(), c.IOPods, *interval)
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
	sock = clientFlags(cmd)
	interval = cmd.Flags().Duration("interval", time.Second, "refresh interval")
	return cmd
}

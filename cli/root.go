// Package cli is the blockd command line: `blockd serve` runs the daemon
// (package daemon); every other command is a client of a running daemon's
// control API (package api). Commands, flags and help follow the
// conventions of kubectl and etcdctl (spf13/cobra): `--help` at every
// level, shell completion, exit code 0 on success, 1 when the command
// failed, 2 when it was used wrongly.
package cli

import (
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
)

// version is the release; commit is set at build time (make build:
// -ldflags -X), or read from the build's VCS stamp when it has one.
var (
	version = "0.1.0-dev"
	commit  = ""
)

// Version returns the version and commit of this binary.
func Version() (ver, rev string) {
	if commit != "" {
		return version, commit
	}
	rev = "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		dirty := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if dirty && rev != "unknown" {
			rev += "-dirty"
		}
	}
	return version, rev
}

// usageError marks a command used wrongly (exit code 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// args checks a command's positional argument count and names what it
// wants.
func args(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			if n == 0 {
				return usagef("%s takes no arguments", cmd.CommandPath())
			}
			return usagef("%s takes %s (got %d arguments)", cmd.CommandPath(), what, len(args))
		}
		return nil
	}
}

// groupRun runs a command that only groups others: without arguments it
// shows its help; an argument is a command it does not have.
func groupRun(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return cmd.Help()
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	cmd.SuggestionsMinimumDistance = 2
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += fmt.Sprintf(" (did you mean %s?)", strings.Join(s, " or "))
	}
	return usageError{errors.New(msg)}
}

// Main runs the blockd command line and returns the exit code.
func Main(argv []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(argv)
	cmd, err := root.ExecuteC()
	if err == nil {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "blockd: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return 2
	}
	fmt.Fprintf(stderr, "blockd: %v\n", err)
	return 1
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "blockd",
		Short: "blockd: node block-storage daemon",
		Long: `blockd stores volumes on local storage and serves them to NBD clients (fio, qemu,
nbd-client, libnbd) and as kernel block devices (nbd, ublk), with per-volume QoS,
io_profiles and per-pod I/O accounting.

'blockd serve' runs the daemon. The other commands talk to a running daemon through
its API socket: --api-socket PATH, or $` + api.SocketEnv + `, or ` + api.DefaultStateDir + `/blockd.sock.

Sizes take units: 512MiB, 10GiB, 2TiB (K, M, G, T are powers of 1024 too; KB, MB,
GB are powers of 1000). Counts such as IOPS take 5000 or 5k.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		// A bare `blockd` shows the help, as kubectl does.
		Args: cobra.ArbitraryArgs,
		RunE: groupRun,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(newServe(), newVolume(), newNode(), newAttach(), newDetach(), newTop(), newVersion())
	return root
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version and commit of this binary",
		Args:  args(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ver, commit := Version()
			fmt.Fprintf(cmd.OutOrStdout(), "blockd %s (commit %s)\n", ver, commit)
			return nil
		},
	}
}

// clientFlags adds --api-socket to a client command.
func clientFlags(cmd *cobra.Command) *string {
	return cmd.Flags().String("api-socket", api.DefaultSocket(),
		"control API `socket` of the daemon ($"+api.SocketEnv+" sets the default)")
}

// outputFlag adds -o/--output.
func outputFlag(cmd *cobra.Command) *string {
	o := cmd.Flags().StringP("output", "o", "table", "output `format`: table or json")
	cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))
	return o
}

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return usagef("--output %q: want table or json", o)
	}
	return nil
}

func joinNames(names []string) string { return strings.Join(names, ", ") }

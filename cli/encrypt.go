package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
)

// encryptionFlags builds a create's encryption request from --encrypt,
// --kek-file and --secret-file.
func encryptionFlags(encrypt bool, kekFile, secretFile string) (*api.Encryption, error) {
	if !encrypt {
		if kekFile != "" || secretFile != "" {
			return nil, usagef("--kek-file and --secret-file need --encrypt")
		}
		return nil, nil
	}
	if kekFile != "" && secretFile != "" {
		return nil, usagef("--kek-file and --secret-file: the KEK comes from one or the other")
	}
	e := &api.Encryption{}
	var err error
	if kekFile != "" {
		if e.KEKFile, err = filepath.Abs(kekFile); err != nil {
			return nil, usagef("--kek-file: %v", err)
		}
	}
	if secretFile != "" {
		if e.Secret, err = readSecret(secretFile); err != nil {
			return nil, err
		}
		e.KEK = api.KEKSecret
	}
	return e, nil
}

// readSecret reads a secret from a file (not the command line, where
// other users' ps would see it).
func readSecret(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", usagef("--secret-file: %v", err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// encryptionSummary is the table's ENCRYPTION column: the cipher and the
// KEK's id, never a key.
func encryptionSummary(e *api.Encryption) string {
	if e == nil {
		return "-"
	}
	kek := "kek:" + e.KEKID
	if e.KEK == api.KEKSecret {
		kek = "secret:" + e.KEKID
	}
	return e.Cipher + "," + kek
}

func newVolumeRekey() *cobra.Command {
	var (
		out, sock, kekFile, secretFile *string
		all                            *bool
	)
	cmd := &cobra.Command{
		Use:   "rekey NAME|--all [--kek-file NEW | --secret-file NEW]",
		Short: "Rewrap an encrypted volume's data key under a new KEK (no data is rewritten)",
		Long: `Rewrap an encrypted volume's data key under a new key-encryption key. The data
is not rewritten: only the wrapped key and the KEK id in the volume's metadata
change.

--kek-file NEW rewraps under the KEK in NEW (read by the daemon), which also
becomes the daemon's current KEK: new volumes are wrapped under it until the
daemon restarts (then its --kek-file decides: point it at NEW). Without a
flag, a volume is rewrapped under the daemon's current KEK. A volume whose KEK
comes from a secret takes --secret-file NEW. To rotate a node's KEK:

  (umask 077; head -c 32 /dev/urandom > /etc/blockd/kek.new)
  blockd volume rekey --all --kek-file /etc/blockd/kek.new
  # point serve --kek-file at /etc/blockd/kek.new, then destroy the old file
  # once 'blockd volume list' shows no volume under the old KEK id`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			if len(args) > 1 || *all == (len(args) == 1) {
				return usagef("volume rekey: name one volume or --all")
			}
			var req api.RekeyRequest
			var err error
			if *kekFile != "" {
				if req.KEKFile, err = filepath.Abs(*kekFile); err != nil {
					return usagef("--kek-file: %v", err)
				}
			}
			if *secretFile != "" {
				if req.Secret, err = readSecret(*secretFile); err != nil {
					return err
				}
			}
			c := api.NewClient(*sock)
			names := args
			if *all {
				vs, err := c.ListVolumes()
				if err != nil {
					return err
				}
				names = nil
				for _, v := range vs {
					if v.Encryption != nil && v.Encryption.KEK != api.KEKSecret && v.State == api.StateOK {
						names = append(names, v.Name)
					}
				}
			}
			var done []api.Volume
			for _, n := range names {
				vi, err := c.Rekey(n, req)
				if err != nil {
					return fmt.Errorf("rekey %s: %w", n, err)
				}
				done = append(done, vi)
			}
			return printVolumes(cmd.OutOrStdout(), *out, done, len(args) == 1)
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	all = cmd.Flags().Bool("all", false, "every encrypted volume whose KEK comes from a file")
	kekFile = cmd.Flags().String("kek-file", "", "the new KEK's `file` (read by the daemon; mode 0600, owned by its user)")
	secretFile = cmd.Flags().String("secret-file", "", "a `file` holding the new secret of a volume whose KEK comes from a secret")
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

func newVolumeUnlock() *cobra.Command {
	var out, sock, secretFile *string
	cmd := &cobra.Command{
		Use:   "unlock NAME --secret-file F",
		Short: "Open an encrypted volume whose KEK comes from a secret, after a daemon restart",
		Args:  args(1, "one volume NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(*out); err != nil {
				return err
			}
			if *secretFile == "" {
				return usagef("volume unlock %s: --secret-file is required", args[0])
			}
			secret, err := readSecret(*secretFile)
			if err != nil {
				return err
			}
			vi, err := api.NewClient(*sock).Unlock(args[0], secret)
			if err != nil {
				return err
			}
			return printVolumes(cmd.OutOrStdout(), *out, []api.Volume{vi}, true)
		},
	}
	sock = clientFlags(cmd)
	out = outputFlag(cmd)
	secretFile = cmd.Flags().String("secret-file", "", "a `file` holding the volume's secret (required)")
	cmd.ValidArgsFunction = completeVolumes(sock)
	return cmd
}

// Command blockd is the node block-storage daemon and its command-line
// client; see package cli for the commands and package daemon for what
// `blockd serve` runs.
package main

import (
	"os"

	"github.com/blockd/blockd/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }

// Command blockd is the node block-storage daemon and its command-line
// client; see package blockd.
package main

import (
	"os"

	"github.com/blockd/blockd/blockd"
)

func main() { os.Exit(blockd.Main(os.Args[1:], os.Stdout, os.Stderr)) }

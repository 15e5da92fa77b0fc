// Command image builds blockd's container image without a container
// engine (github.com/google/go-containerregistry): one layer with the
// static blockd at /usr/bin/blockd and what the CSI node service runs
// (mkfs.ext4, mkfs.xfs, e2fsck, fsck, resize2fs, xfs_growfs, blkid, mount,
// umount) copied from this Debian machine's packages with the libraries and
// loader ldd names, in Debian's usr-merged layout. The output is one tar
// that is both an OCI image layout (index.json, for `ctr import`) and a
// `docker save` archive (manifest.json, for `docker load`), as Docker 25's
// own save writes.
//
//	go run ./deploy/image -blockd bin/image/blockd -tag blockd/blockd:dev -o bin/blockd-image.tar
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

func main() {
	var o options
	flag.StringVar(&o.blockd, "blockd", "bin/image/blockd", "the static blockd binary (CGO_ENABLED=0)")
	flag.StringVar(&o.tag, "tag", "blockd/blockd:dev", "image name and tag")
	flag.StringVar(&o.out, "o", "bin/blockd-image.tar", "output tar")
	tools := flag.String("tools", strings.Join(defaultTools, ","), "host programs to copy with their libraries")
	flag.StringVar(&o.version, "version", "", "org.opencontainers.image.version label")
	flag.Parse()
	o.tools = strings.Split(*tools, ",")
	sum, err := build(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Println(sum)
}

module github.com/blockd/blockd

go 1.26.8

require golang.org/x/sys v0.49.0

require github.com/pojntfx/go-nbd v0.3.2

module github.com/blockd/blockd

go 1.26.8

require golang.org/x/sys v0.49.0

require (
	github.com/cilium/ebpf v0.22.0 // indirect
	github.com/prometheus/client_golang v1.25.0 // indirect
)

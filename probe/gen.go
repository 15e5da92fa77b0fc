package probe

// The BPF object is built by bpf2go and committed, so building blockd needs
// no clang. Regenerate with `go generate ./probe` (Debian's clang and
// libbpf-dev); `make ebpf-check` proves the committed files are current.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -output-dir=$BPF2GO_OUTPUT_DIR -cc clang -target bpfel -type io_key -type io_stats -type inflight_req -go-package probe blockio bpf/blockio.c -- -O2 -g -mcpu=v3 -Wall -Werror -I bpf

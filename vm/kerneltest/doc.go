// Package kerneltest holds the tests that need a real kernel with nbd (and
// later ublk): they run inside the QEMU guest of package vm. The test files
// carry the vmtest build tag so host `go test ./...` never runs them;
// `make test-kernel` builds them with
//
//	CGO_ENABLED=0 go test -c -tags vmtest ./vm/kerneltest
//
// and boots the resulting binary under each kernel of the matrix.
package kerneltest

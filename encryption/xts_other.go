//go:build !amd64 || purego

package encryption

// Elsewhere there is only golang.org/x/crypto/xts.

type fastXTS struct{}

var impls = []impl{implGeneric}

const bestImpl = implGeneric

func newFast([]byte, impl) *fastXTS { panic("encryption: no fast XTS on this platform") }

func (*fastXTS) crypt(dst, src []byte, unit int, seq uint64, decrypt bool) {
	panic("encryption: no fast XTS on this platform")
}

package encryption

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"testing"
)

type vector struct {
	name        string
	key, pt, ct []byte
	seq         uint64
}

// readVectors parses testdata/ieee1619-xts-aes-256.txt.
func readVectors(t *testing.T) []vector {
	f, err := os.Open("testdata/ieee1619-xts-aes-256.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []vector
	var v vector
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		k, val, ok := strings.Cut(line, ": ")
		if !ok {
			t.Fatalf("bad line %q", line)
		}
		hexOf := func() []byte {
			b, err := hex.DecodeString(val)
			if err != nil {
				t.Fatalf("%s: %v", k, err)
			}
			return b
		}
		switch k {
		case "vector":
			v = vector{name: "vector " + val}
		case "key":
			v.key = hexOf()
		case "seq":
			if v.seq, err = strconv.ParseUint(val, 16, 64); err != nil {
				t.Fatal(err)
			}
		case "pt":
			v.pt = hexOf()
		case "ct":
			v.ct = hexOf()
			out = append(out, v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// The IEEE 1619-2007 XTS-AES-256 vectors, through the cipher the stage
// uses, both ways, on every implementation this CPU runs.
func TestIEEE1619Vectors(t *testing.T) {
	vs := readVectors(t)
	if len(vs) != 5 {
		t.Fatalf("read %d vectors, want 5 (10 to 14)", len(vs))
	}
	for _, im := range impls {
		for _, v := range vs {
			x, err := newXTS(v.key, im)
			if err != nil {
				t.Fatalf("%v %s: %v", im, v.name, err)
			}
			got := make([]byte, len(v.pt))
			x.Unit(got, v.pt, v.seq, false)
			if !bytes.Equal(got, v.ct) {
				t.Errorf("%v %s: encrypt differs from the standard's ciphertext", im, v.name)
			}
			x.Unit(got, v.ct, v.seq, true)
			if !bytes.Equal(got, v.pt) {
				t.Errorf("%v %s: decrypt differs from the standard's plaintext", im, v.name)
			}
			// In place, as the stage decrypts reads.
			copy(got, v.pt)
			x.Unit(got, got, v.seq, false)
			if !bytes.Equal(got, v.ct) {
				t.Errorf("%v %s: encrypt in place differs from the standard's ciphertext", im, v.name)
			}
		}
	}
	if bestImpl != impls[len(impls)-1] {
		t.Errorf("NewXTS uses %v, not the best of %v", bestImpl, impls)
	}
}

// A 4 KiB block is the XTS data unit: eight 512-byte units of the same
// tweak are not what the stage writes, and the block number is the tweak.
func TestBlockTweak(t *testing.T) {
	for _, im := range impls {
		t.Run(im.String(), func(t *testing.T) { testBlockTweak(t, im) })
	}
}

func testBlockTweak(t *testing.T, im impl) {
	key := NewDataKey()
	x, err := newXTS(key, im)
	if err != nil {
		t.Fatal(err)
	}
	pt := bytes.Repeat([]byte("blockd!!"), 2*BlockSize/8)
	ct := make([]byte, len(pt))
	x.EncryptBlocks(ct, pt, 7)
	one := make([]byte, BlockSize)
	x.Unit(one, pt[BlockSize:], 8, false)
	if !bytes.Equal(one, ct[BlockSize:]) {
		t.Fatal("the second block is not encrypted as one unit with tweak first+1")
	}
	if bytes.Equal(ct[:BlockSize], ct[BlockSize:]) {
		t.Fatal("equal plaintext blocks give equal ciphertext")
	}
	back := make([]byte, len(ct))
	x.DecryptBlocks(back, ct, 7)
	if !bytes.Equal(back, pt) {
		t.Fatal("round trip failed")
	}
	x.DecryptBlocks(back, make([]byte, len(ct)), 7)
	if !bytes.Equal(back, make([]byte, len(ct))) {
		t.Fatal("an all-zero (hole) block does not decrypt to zeroes")
	}
}

func TestBadKeys(t *testing.T) {
	for _, im := range impls {
		if _, err := newXTS(make([]byte, 32), im); err == nil {
			t.Errorf("%v: a 32-byte key was taken for AES-256-XTS", im)
		}
		same := bytes.Repeat([]byte{1}, DataKeySize)
		if _, err := newXTS(same, im); err == nil {
			t.Errorf("%v: a key whose halves are equal was taken", im)
		}
	}
}

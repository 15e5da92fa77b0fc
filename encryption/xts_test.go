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
// uses, both ways.
func TestIEEE1619Vectors(t *testing.T) {
	vs := readVectors(t)
	if len(vs) != 5 {
		t.Fatalf("read %d vectors, want 5 (10 to 14)", len(vs))
	}
	for _, v := range vs {
		x, err := NewXTS(v.key)
		if err != nil {
			t.Fatalf("%s: %v", v.name, err)
		}
		got := make([]byte, len(v.pt))
		x.Unit(got, v.pt, v.seq, false)
		if !bytes.Equal(got, v.ct) {
			t.Errorf("%s: encrypt differs from the standard's ciphertext", v.name)
		}
		x.Unit(got, v.ct, v.seq, true)
		if !bytes.Equal(got, v.pt) {
			t.Errorf("%s: decrypt differs from the standard's plaintext", v.name)
		}
	}
}

// A 4 KiB block is the XTS data unit: eight 512-byte units of the same
// tweak are not what the stage writes, and the block number is the tweak.
func TestBlockTweak(t *testing.T) {
	key := NewDataKey()
	x, err := NewXTS(key)
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
	if _, err := NewXTS(make([]byte, 32)); err == nil {
		t.Error("a 32-byte key was taken for AES-256-XTS")
	}
	same := bytes.Repeat([]byte{1}, DataKeySize)
	if _, err := NewXTS(same); err == nil {
		t.Error("a key whose halves are equal was taken")
	}
}

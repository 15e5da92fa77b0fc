package nbd

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
)

// Seeds for the fuzz targets; the same builders produced the corpus in
// testdata/fuzz, which `go test` runs as ordinary test cases.

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(cmd, flags uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	return append(makeRequest(cmd, flags, cookie, off, length), payload...)
}

func handshakeSeeds() [][]byte {
	flags := be32(clientFixedNewstyle | clientNoZeroes)
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	return [][]byte{
		cat(flags, optBytes(optList, nil), optBytes(optInfo, infoGoData("vol", infoName, infoDescription, infoBlockSize)),
			optBytes(optStructuredReply, nil), optBytes(optGo, infoGoData("vol")),
			reqBytes(cmdRead, 0, 1, 0, 512, nil), reqBytes(cmdDisc, 0, 2, 0, 0, nil)),
		cat(be32(clientFixedNewstyle), optBytes(optExportName, []byte("vol")),
			reqBytes(cmdWrite, cmdFlagFUA, 1, 0, 4, []byte("abcd"))),
		cat(flags, optBytes(optAbort, nil)),
		cat(flags, optBytes(99, []byte("x")), optBytes(optStartTLS, nil), optBytes(optGo, infoGoData("nope"))),
		cat(flags, optBytes(optGo, []byte{0, 0, 0, 9, 'v'})),
		cat(be32(0xffffffff)),
		cat(flags, optBytes(optStructuredReply, nil), optBytes(optListMetaContext, metaData("vol")),
			optBytes(optSetMetaContext, metaData("vol", metaBaseAllocation)), optBytes(optGo, infoGoData("vol")),
			reqBytes(cmdBlockStatus, 0, 1, 0, 4096, nil)),
	}
}

func requestSeeds() [][]byte {
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	return [][]byte{
		cat(reqBytes(cmdWrite, 0, 1, 0, 8, []byte("01234567")), reqBytes(cmdRead, 0, 2, 0, 8, nil),
			reqBytes(cmdFlush, 0, 3, 0, 0, nil), reqBytes(cmdTrim, 0, 4, 0, 4, nil),
			reqBytes(cmdWriteZeroes, cmdFlagNoHole, 5, 4, 4, nil), reqBytes(cmdCache, 0, 6, 0, 8, nil),
			reqBytes(cmdDisc, 0, 7, 0, 0, nil)),
		cat(reqBytes(cmdRead, 0, 1, 1<<20-4, 8, nil), reqBytes(cmdWrite, 0, 2, 1<<20, 4, []byte("zzzz")),
			reqBytes(cmdWrite, 0, 3, 0, 1<<20, nil)),
		cat(reqBytes(42, 0xffff, 1, 0, 0, nil), reqBytes(cmdRead, cmdFlagDF, 2, 0, 1, nil)),
		[]byte("not an nbd request at all, just text"),
		cat(reqBytes(cmdWrite, 0, 1, 4096, 4, []byte("data")), reqBytes(cmdBlockStatus, 0, 2, 0, 1<<20, nil),
			reqBytes(cmdBlockStatus, cmdFlagReqOne, 3, 4096, 8192, nil), reqBytes(cmdTrim, 0, 4, 0, 1<<20, nil),
			reqBytes(cmdBlockStatus, 0, 5, 1<<20-1, 1, nil)),
	}
}

const fuzzExportSize = 1 << 20

// fuzzServe runs ServeConn on one end of a pipe, feeds input from the other
// and fails if the server panics or does not finish.
func fuzzServe(t *testing.T, prefix, input []byte) {
	m, err := ioengine.NewMemory(fuzzExportSize)
	if err != nil {
		t.Fatal(err)
	}
	// A mapping export, so BLOCK_STATUS goes through the Mapper.
	e := &mappedExport{testExport: &testExport{Handler: ioengine.Handler(m), desc: "fuzz"}}
	e.size.Store(fuzzExportSize)
	e.setMap(m.Map)
	s := NewServer(exportSet{"vol": e}, Options{MaxPayload: 64 << 10, MaxInFlight: 4, HandshakeTimeout: 5 * time.Second})
	defer s.Close()
	srv, cli := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(context.Background(), srv) }()
	drained := make(chan struct{})
	go func() { // consume replies so the server never blocks on writing
		io.Copy(io.Discard, cli)
		close(drained)
	}()
	cli.SetWriteDeadline(time.Now().Add(10 * time.Second))
	cli.Write(prefix)
	cli.Write(input)
	cli.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server did not finish after the client closed")
	}
	<-drained
}

func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzServe(t, nil, data)
	})
}

func FuzzRequests(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(false, s)
		f.Add(true, s)
	}
	f.Fuzz(func(t *testing.T, structured bool, data []byte) {
		var prefix []byte
		prefix = append(prefix, be32(clientFixedNewstyle|clientNoZeroes)...)
		if structured {
			prefix = append(prefix, optBytes(optStructuredReply, nil)...)
			// base:allocation, so BLOCK_STATUS reaches the Mapper.
			prefix = append(prefix, optBytes(optSetMetaContext, metaData("vol", metaBaseAllocation))...)
			prefix = append(prefix, optBytes(optGo, infoGoData("vol"))...)
		} else {
			prefix = append(prefix, optBytes(optExportName, []byte("vol"))...)
		}
		fuzzServe(t, prefix, data)
	})
}

// TestFuzzCorpusUpToDate regenerates testdata/fuzz from the seed builders when
// NBD_WRITE_CORPUS=1; otherwise it checks the committed corpus matches them.
func TestFuzzCorpusUpToDate(t *testing.T) {
	check := func(target string, want []string) {
		for i, w := range want {
			path := corpusPath(target, i)
			got, err := readFile(path)
			if err != nil {
				t.Fatalf("seed %s: %v (regenerate with NBD_WRITE_CORPUS=1)", path, err)
			}
			if got != w {
				t.Fatalf("seed %s is stale (regenerate with NBD_WRITE_CORPUS=1)", path)
			}
		}
	}
	var hs, rq []string
	for _, s := range handshakeSeeds() {
		hs = append(hs, corpusFile(s))
	}
	for _, s := range requestSeeds() {
		rq = append(rq, corpusFile(false, s), corpusFile(true, s))
	}
	if writeCorpus() {
		writeSeeds(t, "FuzzHandshake", hs)
		writeSeeds(t, "FuzzRequests", rq)
	}
	check("FuzzHandshake", hs)
	check("FuzzRequests", rq)
}

func corpusPath(target string, i int) string {
	return filepath.Join("testdata", "fuzz", target, fmt.Sprintf("seed%02d", i))
}

// corpusFile encodes fuzz arguments in the "go test fuzz v1" format.
func corpusFile(args ...any) string {
	var sb strings.Builder
	sb.WriteString("go test fuzz v1\n")
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			fmt.Fprintf(&sb, "[]byte(%q)\n", v)
		case bool:
			fmt.Fprintf(&sb, "bool(%v)\n", v)
		}
	}
	return sb.String()
}

func readFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	return string(b), err
}

func writeCorpus() bool { return os.Getenv("NBD_WRITE_CORPUS") == "1" }

func writeSeeds(t *testing.T, target string, files []string) {
	dir := filepath.Join("testdata", "fuzz", target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, f := range files {
		if err := os.WriteFile(corpusPath(target, i), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

package replication_test

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// FuzzServeMessage: whatever a peer sends (any type, volume, epoch,
// range, flags and payload, truncated or oversized), the replica service
// answers without panicking, never writes outside the copy, and refuses
// what is malformed with a status. Its seeds run with the ordinary tests.
func FuzzServeMessage(f *testing.F) {
	seed := func(typ uint8, epoch uint64, off int64, length uint32, flags uint32, payload []byte) {
		b := make([]byte, 1+8+8+4+4)
		b[0] = typ
		binary.LittleEndian.PutUint64(b[1:], epoch)
		binary.LittleEndian.PutUint64(b[9:], uint64(off))
		binary.LittleEndian.PutUint32(b[17:], length)
		binary.LittleEndian.PutUint32(b[21:], flags)
		f.Add(append(b, payload...))
	}
	seed(replication.MsgWrite, 1, 0, 4, 0, []byte("data"))
	seed(replication.MsgWrite, 1, 1<<20-2, 4, 0, []byte("past"))
	seed(replication.MsgWrite, 1, -4096, 4, 0, []byte("neg!"))
	seed(replication.MsgWrite, 1, 0, 4096, 0, []byte("short payload"))
	seed(replication.MsgTrim, 1, 0, 1<<31, 0, nil)
	seed(replication.MsgWriteZeroes, 1, 4096, 4096, replication.FlagNoHole, nil)
	seed(replication.MsgChecksums, 1, 0, 1<<30, 4096, nil)
	seed(replication.MsgChecksums, 1, 0, 4, 3, nil)
	seed(replication.MsgOpen, 9, 0, 0, 0, []byte("{not json"))
	seed(replication.MsgSetGen, 0, 0, 0, 0, nil)
	seed(200, 1, 0, 0, 0, nil)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 25 {
			return
		}
		cs := &memCopies{copies: map[string]*memCopy{}}
		c, err := cs.CreateCopy(api.Spec{Name: "v", Size: 1 << 20}, api.Replication{Role: api.RoleReplica, Owner: "a", Epoch: 1})
		if err != nil {
			t.Fatal(err)
		}
		svc := replication.NewService("b", cs, quietLog())
		req := replication.Msg{Type: b[0], Volume: "v", Epoch: binary.LittleEndian.Uint64(b[1:]),
			Offset: int64(binary.LittleEndian.Uint64(b[9:])), Length: binary.LittleEndian.Uint32(b[17:]),
			Flags: binary.LittleEndian.Uint32(b[21:])}
		var resp replication.Msg
		out, err := svc.ServeMessage(context.Background(), "a", &req, b[25:], &resp)
		if err != nil {
			t.Fatalf("ServeMessage returned an error instead of a status: %v", err)
		}
		if req.Type == replication.MsgChecksums && resp.Status == replication.StatusOK && len(out)%8 != 0 {
			t.Fatalf("checksums answer of %d bytes", len(out))
		}
		if e := c.Engine(); e != nil && e.Size() != 1<<20 {
			t.Fatalf("the copy's size changed to %d", e.Size())
		}
	})
}

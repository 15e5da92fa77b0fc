package nbd

import "testing"

// TestLoneBlockedRequestDoesNotStall covers queue depth 1, where the reader
// hands each request to the doorbell worker: when that request's Handler
// blocks, the requests sent after it must still be read and answered, and
// the blocked ones answered once released.
func TestLoneBlockedRequestDoesNotStall(t *testing.T) {
	e, cnt := memExport(t, testSize)
	g := &gate{next: cnt, held: make(chan struct{}, 8), release: make(chan struct{})}
	e.Handler = g
	_, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := connect(t, addr, "vol", false)

	const blocked = 3
	for i := range blocked {
		// Sent alone, so nothing is buffered behind it.
		c.send(cmdRead, 0, uint64(100+i), 0, 4096, nil)
		<-g.held
		for j := range 5 {
			off := uint64(4096 * (1 + 5*i + j))
			p := pattern(4096, byte(i*5+j))
			c.mustOK(cmdWrite, 0, off, 4096, p)
			mustEqual(t, c.mustOK(cmdRead, 0, off, 4096, nil).data, p)
		}
	}
	close(g.release)
	seen := map[uint64]bool{}
	for range blocked {
		r := c.readReply()
		if r.errno != 0 || r.cookie < 100 || r.cookie >= 100+blocked || len(r.data) != 4096 {
			t.Fatalf("released reply %+v", r)
		}
		seen[r.cookie] = true
	}
	if len(seen) != blocked {
		t.Fatalf("%d distinct released replies", len(seen))
	}
}

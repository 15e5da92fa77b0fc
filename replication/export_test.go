package replication

// CopiedBytes is what the resyncs of node's replica sent, for tests.
func (r *Replicator) CopiedBytes(node string) int64 {
	for _, p := range r.peers {
		if p.node == node {
			return p.copied.Load()
		}
	}
	return -1
}

// Package replication keeps a volume's copies on other nodes in step with
// its owner: every write, trim, write-zeroes and flush the owner's
// pipeline performs goes to every in-sync replica too, and the request
// completes only when all of them have it (DRBD's protocol C). A replica
// that fails or stops answering leaves the in-sync set, which the owner
// persists with a new generation before it acknowledges anything the
// replica missed; from then on the owner marks the regions the replica
// misses in a per-replica Bitmap, and a resync copies only those.
package replication

// Package encryption is encryption at rest for blockd volumes: the
// pipeline stage that encrypts every write and decrypts every read with
// AES-256-XTS, one 4 KiB block at a time with the block number as the
// tweak, and the key hierarchy behind it: each volume has a random data
// key that is stored only wrapped (AES-256-GCM) by a key-encryption key
// (KEK) from a KEK file or from a secret handed in with a request.
//
//	metrics -> read-only -> qos -> profile -> encryption -> replication -> engine
//
// The stage is the last before replication and the engine, so replicas
// and backing files hold ciphertext only. Holes stay holes: TRIM and
// WRITE_ZEROES pass down as themselves, and a block that reads back as
// all zeroes is a hole (or zeroed), which reads as zeroes without being
// decrypted; an encryption of real data is all zeroes with probability
// 2^-32768. Requests need not be aligned: a write that covers part of a
// block reads, decrypts, merges and re-encrypts that block, excluding
// every other request while it does (see Stage).
//
// docs/encryption.md describes the key hierarchy, the on-disk layout,
// rotation, crypto-shredding and the threat model.
package encryption

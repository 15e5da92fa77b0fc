package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"sync"

	"github.com/blockd/blockd/internal/durable"
)

// Bitmap marks the regions of a volume that one replica may be missing:
// the owner sets a region's bit before a write the replica did not get
// can reach the owner's own engine, and clears it once the replica has
// acknowledged a copy of the region. It lives in a file beside the
// volume's data:
//
//	[0:8)   magic "BLKDBMP1"
//	[8:16)  region size in bytes (a power of two >= 4 KiB)
//	[16:24) number of regions
//	[24:32) reserved
//	[32:)   one bit per region, little-endian 64-bit words
//
// A set bit is written to the file (pwrite of its word) before SetRange
// returns, so it survives a crash of the process; Sync makes set bits
// durable against a crash of the machine (fdatasync) and is run before
// the owner's engine flush, so no durable write is ever missing from the
// bitmap. Clears are written back lazily by Sync: a crash may copy a
// region again, never skip one.
type Bitmap struct {
	path   string
	region int64

	mu       sync.Mutex
	f        *os.File
	words    []uint64
	nbits    int64
	count    int64    // set bits
	cleared  []uint64 // words with bits cleared since the last Sync, one bit per word
	unsynced bool     // bits set since the last fdatasync
	scratch  [8]byte
}

const (
	bitmapMagic  = "BLKDBMP1"
	bitmapHeader = 32
	// MinRegion bounds the region size from below: one block.
	MinRegion = 4096
)

// ErrBitmapCorrupt: a bitmap file whose header does not match.
var ErrBitmapCorrupt = errors.New("replication bitmap corrupt")

// OpenBitmap opens the bitmap at path for a volume of size bytes in
// regions of region bytes, creating it empty (crash-safely: temp file,
// fsync, rename, fsync dir) if it does not exist. An existing file must
// have the same region size; it grows with the volume.
func OpenBitmap(path string, size, region int64) (*Bitmap, error) {
	if region < MinRegion || region&(region-1) != 0 {
		return nil, fmt.Errorf("bitmap region %d: want a power of two of at least %d", region, MinRegion)
	}
	b := &Bitmap{path: path, region: region}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		if err := createBitmap(path, region, nregions(size, region)); err != nil {
			return nil, err
		}
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("bitmap: %w", err)
	}
	b.f = f
	if err := b.load(); err != nil {
		f.Close()
		return nil, fmt.Errorf("bitmap %s: %w", path, err)
	}
	if err := b.Resize(size); err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

func nregions(size, region int64) int64 { return (size + region - 1) / region }

func createBitmap(path string, region, n int64) error {
	b := make([]byte, bitmapHeader+8*((n+63)/64))
	copy(b, bitmapMagic)
	binary.LittleEndian.PutUint64(b[8:], uint64(region))
	binary.LittleEndian.PutUint64(b[16:], uint64(n))
	if err := durable.WriteFile(filepath.Dir(path), filepath.Base(path), b); err != nil {
		return fmt.Errorf("bitmap: %w", err)
	}
	return nil
}

func (b *Bitmap) load() error {
	hdr := make([]byte, bitmapHeader)
	if _, err := b.f.ReadAt(hdr, 0); err != nil {
		return fmt.Errorf("%w: header: %v", ErrBitmapCorrupt, err)
	}
	if string(hdr[:8]) != bitmapMagic {
		return fmt.Errorf("%w: bad magic", ErrBitmapCorrupt)
	}
	if r := int64(binary.LittleEndian.Uint64(hdr[8:])); r != b.region {
		return fmt.Errorf("%w: region size %d, want %d", ErrBitmapCorrupt, r, b.region)
	}
	n := int64(binary.LittleEndian.Uint64(hdr[16:]))
	if n < 0 || n > 1<<40 {
		return fmt.Errorf("%w: %d regions", ErrBitmapCorrupt, n)
	}
	raw := make([]byte, 8*((n+63)/64))
	if _, err := b.f.ReadAt(raw, bitmapHeader); err != nil {
		return fmt.Errorf("%w: bits: %v", ErrBitmapCorrupt, err)
	}
	b.nbits = n
	b.words = make([]uint64, len(raw)/8)
	for i := range b.words {
		w := binary.LittleEndian.Uint64(raw[8*i:])
		if i == len(b.words)-1 && n%64 != 0 {
			w &= 1<<(n%64) - 1 // bits past the end are not regions
		}
		b.words[i] = w
		b.count += int64(bits.OnesCount64(w))
	}
	b.cleared = make([]uint64, (len(b.words)+63)/64)
	return nil
}

// Region is the region size in bytes.
func (b *Bitmap) Region() int64 { return b.region }

// Regions is the number of regions.
func (b *Bitmap) Regions() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nbits
}

// Count is the number of set regions.
func (b *Bitmap) Count() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.count
}

// Resize grows the bitmap to cover a volume of size bytes (new regions
// clear); it never shrinks.
func (b *Bitmap) Resize(size int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := nregions(size, b.region)
	if n <= b.nbits {
		return nil
	}
	nw := int((n + 63) / 64)
	if err := b.f.Truncate(bitmapHeader + 8*int64(nw)); err != nil {
		return fmt.Errorf("bitmap: grow: %w", err)
	}
	var hdr [8]byte
	binary.LittleEndian.PutUint64(hdr[:], uint64(n))
	if _, err := b.f.WriteAt(hdr[:], 16); err != nil {
		return fmt.Errorf("bitmap: grow: %w", err)
	}
	for len(b.words) < nw {
		b.words = append(b.words, 0)
	}
	for len(b.cleared) < (nw+63)/64 {
		b.cleared = append(b.cleared, 0)
	}
	b.nbits = n
	b.unsynced = true
	return nil
}

// SetRange marks the regions that [off, off+n) touches and writes the
// words it changed to the file before returning.
func (b *Bitmap) SetRange(off, n int64) error {
	if n <= 0 {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	first, last := off/b.region, (off+n-1)/b.region
	last = min(last, b.nbits-1)
	for r := first; r <= last; {
		wi := r / 64
		w := b.words[wi]
		for ; r <= last && r/64 == wi; r++ {
			w |= 1 << (r % 64)
		}
		if w != b.words[wi] {
			b.count += int64(bits.OnesCount64(w &^ b.words[wi]))
			b.words[wi] = w
			if err := b.writeWordLocked(int(wi)); err != nil {
				return err
			}
			b.unsynced = true
		}
	}
	return nil
}

// SetAll marks every region: a replica whose history is unknown.
func (b *Bitmap) SetAll() error {
	b.mu.Lock()
	n := b.nbits
	b.mu.Unlock()
	if n == 0 {
		return nil
	}
	return b.SetRange(0, n*b.region)
}

func (b *Bitmap) writeWordLocked(wi int) error {
	binary.LittleEndian.PutUint64(b.scratch[:], b.words[wi])
	if _, err := b.f.WriteAt(b.scratch[:], bitmapHeader+8*int64(wi)); err != nil {
		return fmt.Errorf("bitmap: %w", err)
	}
	return nil
}

// Test reports whether region r is set.
func (b *Bitmap) Test(r int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return r < b.nbits && b.words[r/64]&(1<<(r%64)) != 0
}

// Clear unmarks region r; Sync writes it back.
func (b *Bitmap) Clear(r int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r >= b.nbits {
		return
	}
	wi := r / 64
	if b.words[wi]&(1<<(r%64)) == 0 {
		return
	}
	b.words[wi] &^= 1 << (r % 64)
	b.count--
	b.cleared[wi/64] |= 1 << (wi % 64)
}

// Next returns the first set region at or after r.
func (b *Bitmap) Next(r int64) (int64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for r < b.nbits {
		wi := r / 64
		w := b.words[wi] >> (r % 64)
		if w != 0 {
			r += int64(bits.TrailingZeros64(w))
			return r, r < b.nbits
		}
		r = (wi + 1) * 64
	}
	return 0, false
}

// Sync writes back cleared words and makes every set bit durable.
func (b *Bitmap) Sync() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ci, c := range b.cleared {
		for c != 0 {
			wi := ci*64 + bits.TrailingZeros64(c)
			c &= c - 1
			if err := b.writeWordLocked(wi); err != nil {
				return err
			}
			b.unsynced = true
		}
		b.cleared[ci] = 0
	}
	if !b.unsynced {
		return nil
	}
	if err := b.f.Sync(); err != nil {
		return fmt.Errorf("bitmap: fsync: %w", err)
	}
	b.unsynced = false
	return nil
}

// Close syncs and closes the file.
func (b *Bitmap) Close() error {
	err := b.Sync()
	b.mu.Lock()
	defer b.mu.Unlock()
	return errors.Join(err, b.f.Close())
}

// Remove closes the bitmap and deletes its file.
func (b *Bitmap) Remove() error {
	b.mu.Lock()
	cerr := b.f.Close()
	b.mu.Unlock()
	if err := os.Remove(b.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return errors.Join(cerr, durable.SyncDir(filepath.Dir(b.path)))
}

package stream

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Pattern is an endless deterministic byte stream identified by a seed.
// Byte n is the (n mod 8)th byte of splitmix64(seed, n/8): position
// dependent and without short periods.
type Pattern uint64

func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// Fill writes the pattern's bytes [off, off+len(p)) into p.
func (s Pattern) Fill(p []byte, off int64) {
	for i := 0; i < len(p); {
		pos := off + int64(i)
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], mix(uint64(s)^uint64(pos/8)*0x2545f4914f6cdd1d))
		n := copy(p[i:], w[pos%8:])
		i += n
	}
}

// Bytes returns the pattern's bytes [off, off+n).
func (s Pattern) Bytes(off int64, n int) []byte {
	p := make([]byte, n)
	s.Fill(p, off)
	return p
}

// Verifier checks that what it is written is the pattern from offset 0.
type Verifier struct {
	Pattern Pattern
	// N is how many bytes have been verified.
	N   int64
	buf []byte
}

// Write checks p against the pattern at the current offset. The first
// mismatch is an error naming its offset.
func (v *Verifier) Write(p []byte) (int, error) {
	if cap(v.buf) < len(p) {
		v.buf = make([]byte, len(p))
	}
	want := v.buf[:len(p)]
	v.Pattern.Fill(want, v.N)
	for i := range p {
		if p[i] != want[i] {
			return i, fmt.Errorf("stream %#x: byte %d is %#02x, want %#02x (lost, duplicated or reordered data)", uint64(v.Pattern), v.N+int64(i), p[i], want[i])
		}
	}
	v.N += int64(len(p))
	return len(p), nil
}

// Reader returns a reader of the pattern's bytes [off, off+n).
func (s Pattern) Reader(off, n int64) io.Reader {
	return &reader{s: s, off: off, end: off + n}
}

type reader struct {
	s        Pattern
	off, end int64
}

func (r *reader) Read(p []byte) (int, error) {
	if r.off >= r.end {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.end-r.off)]
	r.s.Fill(p, r.off)
	r.off += int64(len(p))
	return len(p), nil
}

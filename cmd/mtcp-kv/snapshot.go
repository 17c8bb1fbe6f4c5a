package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// The snapshot of a session is binary: a drain moves thousands of idle
// sessions at once, and decoding JSON (reflection, and the goroutine stack
// growth it causes) was the largest cost of adopting them. Layout:
//
//	"kv" version(1) flags(bit 0: Quit)
//	count(uvarint) len(In)(uvarint) In len(Out)(uvarint) Out
//	pairs(uvarint) then pairs × (len(key)(uvarint) key len(value)(uvarint) value)
//
// A snapshot that starts with '{' is the JSON of earlier versions and
// still decodes, so a pool can be upgraded one server at a time.
const (
	snapMagic   = "kv"
	snapVersion = 1
	snapQuit    = 1 << 0
)

// marshal encodes s as a snapshot.
func (s *session) marshal() []byte {
	n := len(snapMagic) + 2 + 4*binary.MaxVarintLen64 + len(s.In) + len(s.Out)
	for k, v := range s.Data {
		n += 2*binary.MaxVarintLen64 + len(k) + len(v)
	}
	b := make([]byte, 0, n)
	b = append(b, snapMagic...)
	var flags byte
	if s.Quit {
		flags |= snapQuit
	}
	b = append(b, snapVersion, flags)
	b = binary.AppendUvarint(b, uint64(s.Count))
	b = appendBytes(b, s.In)
	b = appendBytes(b, s.Out)
	b = binary.AppendUvarint(b, uint64(len(s.Data)))
	// Sorted keys: the same session always gives the same snapshot.
	keys := make([]string, 0, len(s.Data))
	for k := range s.Data {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		b = appendBytes(b, []byte(k))
		b = appendBytes(b, []byte(s.Data[k]))
	}
	return b
}

func appendBytes(b, v []byte) []byte {
	return append(binary.AppendUvarint(b, uint64(len(v))), v...)
}

var errSnapshot = errors.New("bad snapshot")

// unmarshal decodes a snapshot into s, refusing anything malformed.
func (s *session) unmarshal(b []byte) error {
	if len(b) > 0 && b[0] == '{' {
		if err := json.Unmarshal(b, s); err != nil {
			return fmt.Errorf("%w: %v", errSnapshot, err)
		}
		if s.Data == nil {
			s.Data = map[string]string{}
		}
		return nil
	}
	if len(b) < len(snapMagic)+2 || string(b[:len(snapMagic)]) != snapMagic {
		return fmt.Errorf("%w: not an mtcp-kv session", errSnapshot)
	}
	if v := b[len(snapMagic)]; v != snapVersion {
		return fmt.Errorf("%w: version %d, this mtcp-kv reads version %d", errSnapshot, v, snapVersion)
	}
	flags := b[len(snapMagic)+1]
	if flags&^snapQuit != 0 {
		return fmt.Errorf("%w: unknown flags %#x", errSnapshot, flags)
	}
	r := snapReader{b: b[len(snapMagic)+2:]}
	count := r.uvarint()
	in, out := r.bytes(), r.bytes()
	pairs := r.uvarint()
	if r.err == nil && pairs > uint64(len(r.b))/2 {
		r.err = fmt.Errorf("%d keys in %d bytes", pairs, len(r.b))
	}
	data := make(map[string]string, min(pairs, 1024))
	for i := uint64(0); i < pairs && r.err == nil; i++ {
		k, v := r.bytes(), r.bytes()
		data[string(k)] = string(v)
	}
	if r.err == nil && len(r.b) != 0 {
		r.err = fmt.Errorf("%d bytes after the end", len(r.b))
	}
	if r.err == nil && count > 1<<62 {
		r.err = fmt.Errorf("command count %d out of range", count)
	}
	if r.err != nil {
		return fmt.Errorf("%w: %v", errSnapshot, r.err)
	}
	s.Data, s.Count, s.Quit = data, int64(count), flags&snapQuit != 0
	s.In, s.Out = clone(in), clone(out)
	return nil
}

func clone(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return slices.Clone(b)
}

// snapReader reads the fields of a snapshot; the first error sticks.
type snapReader struct {
	b   []byte
	err error
}

func (r *snapReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errors.New("truncated or overlong number")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *snapReader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.err = fmt.Errorf("a field of %d bytes with %d left", n, len(r.b))
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

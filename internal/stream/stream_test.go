package stream

import (
	"bytes"
	"io"
	"testing"
)

func TestVerifierDetectsLossDuplicationReordering(t *testing.T) {
	s := Pattern(42)
	good := s.Bytes(0, 4096)
	if bytes.Equal(good[:2048], good[2048:]) {
		t.Fatal("pattern repeats")
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"lost", append(append([]byte{}, good[:100]...), good[101:]...)},
		{"duplicated", append(append([]byte{}, good[:101]...), good[100:]...)},
		{"reordered", func() []byte {
			b := append([]byte{}, good...)
			b[200], b[201] = b[201], b[200]
			return b
		}()},
	} {
		v := &Verifier{Pattern: s}
		if _, err := v.Write(tc.data); err == nil {
			t.Errorf("%s: not detected", tc.name)
		}
	}
	v := &Verifier{Pattern: s}
	if _, err := io.Copy(v, s.Reader(0, 1<<20)); err != nil || v.N != 1<<20 {
		t.Fatalf("good stream: n=%d err=%v", v.N, err)
	}
	// Fill at arbitrary offsets agrees with one long fill.
	long := s.Bytes(0, 100)
	if !bytes.Equal(long[37:61], s.Bytes(37, 24)) {
		t.Fatal("Fill is not offset-consistent")
	}
}

package main

import (
	"errors"
	"maps"
	"slices"
	"testing"
)

func sameSession(a, b *session) bool {
	return maps.Equal(a.Data, b.Data) && a.Count == b.Count && a.Quit == b.Quit &&
		slices.Equal(a.In, b.In) && slices.Equal(a.Out, b.Out)
}

func TestSnapshotRoundTrip(t *testing.T) {
	for _, s := range []*session{
		{Data: map[string]string{}},
		{Data: map[string]string{"greeting": "hello world", "": "empty key", "k": ""}, Count: 1 << 40,
			In: []byte("GET "), Out: []byte("OK\n"), Quit: true},
	} {
		b := s.marshal()
		var got session
		if err := got.unmarshal(b); err != nil {
			t.Fatalf("%+v: %v", s, err)
		}
		if !sameSession(s, &got) {
			t.Fatalf("round trip: %+v became %+v", s, got)
		}
		if string(s.marshal()) != string(b) {
			t.Fatal("the same session gave two snapshots")
		}
	}
}

func TestSnapshotReadsJSON(t *testing.T) {
	var s session
	if err := s.unmarshal([]byte(`{"data":{"colour":"red"},"count":3,"in":"R0VUIA=="}`)); err != nil {
		t.Fatal(err)
	}
	if s.Data["colour"] != "red" || s.Count != 3 || string(s.In) != "GET " {
		t.Fatalf("%+v", s)
	}
}

func TestSnapshotRefusesGarbage(t *testing.T) {
	good := (&session{Data: map[string]string{"a": "b"}, Count: 2, In: []byte("x")}).marshal()
	cases := map[string][]byte{
		"empty":      nil,
		"magic":      append([]byte("xx"), good[2:]...),
		"version":    append([]byte("kv\x09"), good[3:]...),
		"flags":      append([]byte("kv\x01\x80"), good[4:]...),
		"truncated":  good[:len(good)-1],
		"trailing":   append(slices.Clone(good), 0),
		"long field": append([]byte("kv\x01\x00\x01\x7f"), 'x'),
		"many keys":  []byte("kv\x01\x00\x00\x00\x00\xff\xff\x03"),
		"bad json":   []byte(`{"data":`),
	}
	for name, b := range cases {
		var s session
		if err := s.unmarshal(b); !errors.Is(err, errSnapshot) {
			t.Errorf("%s: %v, want a bad snapshot error", name, err)
		}
	}
}

func FuzzSnapshot(f *testing.F) {
	f.Add((&session{Data: map[string]string{"a": "b"}, Count: 2, In: []byte("x"), Quit: true}).marshal())
	f.Add([]byte(`{"data":{}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s session
		if s.unmarshal(b) != nil || (len(b) > 0 && b[0] == '{') {
			return
		}
		var again session
		if err := again.unmarshal(s.marshal()); err != nil || !sameSession(&s, &again) {
			t.Fatalf("%q decoded to %+v, which does not round-trip: %v", b, s, err)
		}
	})
}

package criu

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

const pg = pageSize

// mapOf builds a lazy map of lazy pagemap entries [start, start+pages)
// over the given mappings.
func mapOf(t *testing.T, vmas []span, entries ...[2]uint64) *lazyMap {
	t.Helper()
	var pes []pagemapEntry
	for _, e := range entries {
		pes = append(pes, pagemapEntry{vaddr: e[0], pages: e[1], flags: peLazy})
	}
	pes = append(pes, pagemapEntry{vaddr: 0x900 * pg, pages: 4}) // not lazy: ignored
	m, err := newLazyMap(pes, vmas)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestLazyMapSplitsAtMappings(t *testing.T) {
	m := mapOf(t, []span{{0x10 * pg, 0x14 * pg}, {0x14 * pg, 0x20 * pg}}, [2]uint64{0x12 * pg, 6})
	if len(m.segs) != 2 || m.segs[0].img != 0x12*pg || len(m.segs[0].state) != 2 || m.segs[1].img != 0x14*pg || len(m.segs[1].state) != 4 {
		t.Fatalf("segments %+v", m.segs)
	}
	if m.missing != 6 {
		t.Fatalf("missing %d, want 6", m.missing)
	}
	if _, err := newLazyMap([]pagemapEntry{{vaddr: 0x30 * pg, pages: 1, flags: peLazy}}, []span{{0x10 * pg, 0x20 * pg}}); err == nil {
		t.Fatal("lazy pages outside every mapping were accepted")
	}
	if _, err := newLazyMap([]pagemapEntry{{vaddr: 0x12 * pg, pages: 1, flags: peLazy}, {vaddr: 0x11 * pg, pages: 1, flags: peLazy}}, []span{{0x10 * pg, 0x20 * pg}}); err == nil {
		t.Fatal("unsorted pagemap entries were accepted")
	}
}

// TestLazyMapRemapOntoDropped moves a mapping (mremap) onto the addresses
// of one unmapped before (the kernel's unmap event for the destination
// comes before the remap): its pages are found there, not the gone ones,
// which would be filled with zeros.
func TestLazyMapRemapOntoDropped(t *testing.T) {
	m := mapOf(t, []span{{0x10 * pg, 0x14 * pg}, {0x40 * pg, 0x44 * pg}, {0x60 * pg, 0x64 * pg}},
		[2]uint64{0x10 * pg, 4}, [2]uint64{0x40 * pg, 4}, [2]uint64{0x60 * pg, 4})
	m.drop(0x10*pg, 0x14*pg)
	m.remap(0x40*pg, 0x10*pg, 4*pg)
	for a := uint64(0x10); a < 0x14; a++ {
		s, i, ok := m.find(a * pg)
		if !ok || s.state[i] == pgGone || s.img+uint64(i)*pg != (a+0x30)*pg {
			t.Fatalf("page at %#x after the remap onto dropped memory: %v, gone %v", a, ok, ok && s.state[i] == pgGone)
		}
	}
	// The mapping at 0x60 moves onto 0x10 in turn, after the unmap
	// event for what was there.
	m.drop(0x10*pg, 0x14*pg)
	m.remap(0x60*pg, 0x10*pg, 4*pg)
	if s, i, ok := m.find(0x11 * pg); !ok || s.img+uint64(i)*pg != 0x61*pg {
		t.Fatalf("page at 0x11 after the second remap: %v %+v %d", ok, s, i)
	}
	if m.missing != 4 {
		t.Fatalf("missing %d, want 4 (the pages of the last mapping moved)", m.missing)
	}
}

func TestLazyMapRemapDropFork(t *testing.T) {
	m := mapOf(t, []span{{0x10 * pg, 0x20 * pg}}, [2]uint64{0x10 * pg, 16})
	// Move pages 0x14..0x18 to 0x40.
	m.remap(0x14*pg, 0x40*pg, 4*pg)
	if s, i, ok := m.find(0x41 * pg); !ok || s.img+uint64(i)*pg != 0x15*pg {
		t.Fatalf("page at 0x41 after the remap: %v %+v %d", ok, s, i)
	}
	if _, _, ok := m.find(0x15 * pg); ok {
		t.Fatal("the page moved away is still found at its old address")
	}
	if s, i, ok := m.find(0x18 * pg); !ok || s.img+uint64(i)*pg != 0x18*pg {
		t.Fatalf("page at 0x18 after the remap: %v", ok)
	}
	// The checkpoint ranges still come in order.
	for k := 1; k < len(m.segs); k++ {
		if m.segs[k].img <= m.segs[k-1].img {
			t.Fatalf("segments out of order: %+v", m.segs)
		}
	}
	// Drop two of the moved pages and one that did not move.
	m.drop(0x42*pg, 0x44*pg)
	m.drop(0x10*pg, 0x11*pg)
	if m.missing != 13 {
		t.Fatalf("missing %d after dropping 3 of 16", m.missing)
	}
	// Fill one in, ask for another.
	s, i, _ := m.find(0x12 * pg)
	m.set(s, i, pgPresent)
	s, i, _ = m.find(0x13 * pg)
	m.set(s, i, pgUrgent)
	if m.missing != 12 {
		t.Fatalf("missing %d, want 12", m.missing)
	}
	// The background goes in checkpoint order, over missing pages only.
	img, n, ok := m.next(0, 100)
	if !ok || img != 0x11*pg || n != 1 {
		t.Fatalf("next: %#x %d %v, want page 0x11 alone", img, n, ok)
	}
	img, n, ok = m.next(0x12*pg, 2)
	if !ok || img != 0x14*pg || n != 2 {
		t.Fatalf("next from 0x12: %#x %d %v, want 2 pages at 0x14", img, n, ok)
	}
	// A forked child needs every page but the dropped ones again.
	c := m.fork()
	if c.missing != 13 {
		t.Fatalf("the child misses %d pages, want 13", c.missing)
	}
	// overlapping finds the parts of a checkpoint range.
	var got [][3]uint64
	m.overlapping(0x13*pg, 3*pg, func(s *lazySeg, i, count int, off uint64) {
		got = append(got, [3]uint64{s.img + uint64(i)*pg, uint64(count), off})
	})
	want := [][3]uint64{{0x13 * pg, 1, 0}, {0x14 * pg, 2, pg}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("overlapping: %v, want %v", got, want)
	}
}

func TestParsePagemapEntry(t *testing.T) {
	enc := func(fields ...[2]uint64) []byte {
		var b []byte
		for _, f := range fields {
			b = protowire.AppendTag(b, protowire.Number(f[0]), protowire.VarintType)
			b = protowire.AppendVarint(b, f[1])
		}
		return b
	}
	for _, c := range []struct {
		name string
		b    []byte
		want pagemapEntry
		ok   bool
	}{
		{"new", enc([2]uint64{1, 0x1000}, [2]uint64{2, 0}, [2]uint64{4, 6}, [2]uint64{5, 70000}), pagemapEntry{0x1000, 70000, 6}, true},
		{"old", enc([2]uint64{1, 0x2000}, [2]uint64{2, 3}), pagemapEntry{0x2000, 3, 0}, true},
		{"no size", enc([2]uint64{1, 0x2000}), pagemapEntry{}, false},
		{"truncated", enc([2]uint64{1, 0x2000})[:2], pagemapEntry{}, false},
	} {
		got, err := parsePagemapEntry(c.b)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("%s: %+v, %v; want %+v", c.name, got, err, c.want)
		}
	}
}

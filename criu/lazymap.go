package criu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/mm"
	"google.golang.org/protobuf/encoding/protowire"
)

// The state of one lazy page of a restored process.
const (
	pgMissing    = iota // not asked for yet
	pgUrgent            // asked for because the process faulted on it
	pgBackground        // asked for in the background transfer
	pgPresent           // filled in
	pgGone              // unmapped or dropped by the process: never to be filled
)

// pagemap entry flags (CRIU's images/pagemap.proto).
const peLazy = 1 << 1

// lazySeg is a run of a restored process's lazy pages: contiguous in the
// checkpoint (img) and, at any time, in the process (run), inside one
// memory mapping. state holds one pg* value per page.
type lazySeg struct {
	img, run uint64
	state    []uint8
}

func (s *lazySeg) size() uint64 { return uint64(len(s.state)) * pageSize }

// lazyMap tracks the lazy pages of one restored process: where each one
// is and whether it is filled in. Its segments stay sorted by checkpoint
// address; the process may move them (remap) and drop them.
type lazyMap struct {
	segs    []lazySeg
	missing int // pages in states below pgPresent
}

// loadLazyMap reads the lazy pages of the checkpointed process pid from
// the pagemap and mm images in dir. Like CRIU's own lazy-pages daemon it
// splits pagemap entries at mapping boundaries, since a page copy cannot
// cross one.
func loadLazyMap(dir string, pid int) (*lazyMap, error) {
	ents, err := readImage(filepath.Join(dir, fmt.Sprintf("mm-%d.img", pid)), "MM")
	if err != nil {
		return nil, err
	}
	if len(ents) != 1 {
		return nil, fmt.Errorf("mm-%d.img: %d entries, want 1", pid, len(ents))
	}
	var me mm.MmEntry
	if err := partial.Unmarshal(ents[0], &me); err != nil {
		return nil, fmt.Errorf("mm-%d.img: %w", pid, err)
	}
	ents, err = readImage(filepath.Join(dir, fmt.Sprintf("pagemap-%d.img", pid)), "PAGEMAP")
	if err != nil {
		return nil, err
	}
	if len(ents) == 0 {
		return nil, fmt.Errorf("pagemap-%d.img: no head", pid)
	}
	var pes []pagemapEntry
	for _, b := range ents[1:] {
		pe, err := parsePagemapEntry(b)
		if err != nil {
			return nil, fmt.Errorf("pagemap-%d.img: %w", pid, err)
		}
		pes = append(pes, pe)
	}
	var vmas []span
	for _, v := range me.GetVmas() {
		vmas = append(vmas, span{v.GetStart(), v.GetEnd()})
	}
	return newLazyMap(pes, vmas)
}

// span is a range of addresses, [start, end).
type span struct{ start, end uint64 }

// newLazyMap builds a map from pagemap entries and the process's mappings
// (both sorted by address, as CRIU writes them).
func newLazyMap(pes []pagemapEntry, vs []span) (*lazyMap, error) {
	m := &lazyMap{}
	for _, pe := range pes {
		if pe.flags&peLazy == 0 {
			continue
		}
		start := pe.vaddr
		end := start + pe.pages*pageSize
		if start%pageSize != 0 || pe.pages > 1<<40 || end < start {
			return nil, fmt.Errorf("pagemap entry at %#x of %d pages", start, pe.pages)
		}
		if n := len(m.segs); n > 0 && start < m.segs[n-1].img+m.segs[n-1].size() {
			return nil, fmt.Errorf("pagemap entry at %#x: not sorted", start)
		}
		for _, v := range vs {
			if start >= end {
				break
			}
			if start >= v.end || end <= v.start {
				continue
			}
			if start < v.start {
				return nil, fmt.Errorf("lazy pages at %#x outside every mapping", start)
			}
			e := min(end, v.end)
			m.segs = append(m.segs, lazySeg{img: start, run: start, state: make([]uint8, (e-start)/pageSize)})
			m.missing += int((e - start) / pageSize)
			start = e
		}
		if start < end {
			return nil, fmt.Errorf("lazy pages at %#x outside every mapping", start)
		}
	}
	return m, nil
}

// pagemapEntry is a pagemap_entry of CRIU's images: pages pages at vaddr.
type pagemapEntry struct {
	vaddr, pages uint64
	flags        uint32
}

// parsePagemapEntry decodes a pagemap_entry. CRIU ≥ 4 keeps the page
// count in field 5 (uint64), which go-criu's definition lacks; older
// images have it in field 2 only.
func parsePagemapEntry(b []byte) (pagemapEntry, error) {
	var pe pagemapEntry
	var compat uint64
	seen := 0
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return pe, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.VarintType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return pe, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return pe, fmt.Errorf("pagemap entry: %w", protowire.ParseError(n))
		}
		b = b[n:]
		switch num {
		case 1:
			pe.vaddr = v
			seen |= 1
		case 2:
			compat = v
			seen |= 2
		case 4:
			pe.flags = uint32(v)
		case 5:
			pe.pages = v
			seen |= 4
		}
	}
	if seen&1 == 0 || seen&6 == 0 {
		return pe, errors.New("pagemap entry without its address or size")
	}
	if seen&4 == 0 {
		pe.pages = compat
	}
	return pe, nil
}

// readImage returns the entries of the CRIU image at path, checking that
// it is the image named kind.
func readImage(path, kind string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ents, err := splitImage(b, uint32(magics.ByName[kind]))
	if err != nil {
		return nil, fmt.Errorf("%s: not a CRIU %s image: %w", path, kind, err)
	}
	return ents, nil
}

// set moves page i of segment s to state st, keeping the count of missing
// pages.
func (m *lazyMap) set(s *lazySeg, i int, st uint8) {
	if s.state[i] < pgPresent {
		m.missing--
	}
	if st < pgPresent {
		m.missing++
	}
	s.state[i] = st
}

// find returns the segment holding the page at run, the process's
// address, and the page's index in it. Gone pages stay in their segments
// at the addresses they left, where mremap may since have moved others:
// a page that is not gone is found first.
func (m *lazyMap) find(run uint64) (*lazySeg, int, bool) {
	var gone *lazySeg
	gi := 0
	for k := range m.segs {
		s := &m.segs[k]
		if run >= s.run && run < s.run+s.size() {
			i := int((run - s.run) / pageSize)
			if s.state[i] != pgGone {
				return s, i, true
			}
			if gone == nil {
				gone, gi = s, i
			}
		}
	}
	return gone, gi, gone != nil
}

// overlapping calls fn for each part of the checkpoint range [img,
// img+n) that a segment holds: the segment, the index of the part's first
// page in it, its page count, and its offset in the range.
func (m *lazyMap) overlapping(img, n uint64, fn func(s *lazySeg, i, count int, off uint64)) {
	end := img + n
	k := sort.Search(len(m.segs), func(k int) bool { return m.segs[k].img+m.segs[k].size() > img })
	for ; k < len(m.segs) && m.segs[k].img < end; k++ {
		s := &m.segs[k]
		a, b := max(img, s.img), min(end, s.img+s.size())
		fn(s, int((a-s.img)/pageSize), int((b-a)/pageSize), a-img)
	}
}

// next returns the first run of missing pages at or after the checkpoint
// address from, at most maxPages long and inside one segment.
func (m *lazyMap) next(from uint64, maxPages int) (img uint64, pages int, ok bool) {
	k := sort.Search(len(m.segs), func(k int) bool { return m.segs[k].img+m.segs[k].size() > from })
	for ; k < len(m.segs); k++ {
		s := &m.segs[k]
		i := 0
		if from > s.img {
			i = int((from - s.img) / pageSize)
		}
		for ; i < len(s.state) && s.state[i] != pgMissing; i++ {
		}
		if i == len(s.state) {
			continue
		}
		j := i
		for j < len(s.state) && s.state[j] == pgMissing && j-i < maxPages {
			j++
		}
		return s.img + uint64(i)*pageSize, j - i, true
	}
	return 0, 0, false
}

// splitRun splits segments so that none straddles the process addresses
// start or end.
func (m *lazyMap) splitRun(start, end uint64) {
	var out []lazySeg
	for _, s := range m.segs {
		for _, cut := range []uint64{start, end} {
			if cut > s.run && cut < s.run+s.size() {
				i := (cut - s.run) / pageSize
				out = append(out, lazySeg{img: s.img, run: s.run, state: s.state[:i:i]})
				s = lazySeg{img: s.img + i*pageSize, run: cut, state: s.state[i:]}
			}
		}
		out = append(out, s)
	}
	m.segs = out
}

// remap follows mremap(2) moving n bytes from the process address from to
// to. (What was at to before is gone: the kernel's unmap event for it
// comes first.)
func (m *lazyMap) remap(from, to, n uint64) {
	m.splitRun(from, from+n)
	for k := range m.segs {
		s := &m.segs[k]
		if s.run >= from && s.run < from+n {
			s.run = s.run - from + to
		}
	}
}

// drop marks the pages at process addresses [start, end) gone.
func (m *lazyMap) drop(start, end uint64) {
	if end <= start {
		return
	}
	m.splitRun(start, end)
	for k := range m.segs {
		s := &m.segs[k]
		if s.run >= start && s.run < end {
			for i := range s.state {
				m.set(s, i, pgGone)
			}
		}
	}
}

// fork returns the map of a child the process forked: every page that is
// not gone must be filled in again in the child, since a page filled in
// the parent while the fork was under way may be missing in the child.
func (m *lazyMap) fork() *lazyMap {
	c := &lazyMap{segs: make([]lazySeg, len(m.segs))}
	for k, s := range m.segs {
		st := make([]uint8, len(s.state))
		for i, v := range s.state {
			if v == pgGone {
				st[i] = pgGone
			} else {
				c.missing++
			}
		}
		c.segs[k] = lazySeg{img: s.img, run: s.run, state: st}
	}
	return c
}

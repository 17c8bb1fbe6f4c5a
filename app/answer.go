package app

import (
	"sync"
	"syscall"
	"time"
)

// coalesceDelay is how long an answer to a batched export holds back the
// connections that are ready while others are still on their way: long
// enough to gather the handlers that stop together, short enough not to
// wait for a slow one.
const coalesceDelay = 2 * time.Millisecond

// answerer gathers the items of the application's answer to one request
// of mtcpd and sends them in frames: once no item is pending, once a
// frame's worth is ready, or (if it coalesces) coalesceDelay after the
// first item of a frame became ready.
type answerer struct {
	s        *server
	l        *link
	id       uint64 // of the request (version 2)
	typ      string // of the answer
	v1       bool   // answer each item in a version-1 message of its own
	coalesce bool

	mu      sync.Mutex
	pending int // items not ready yet, plus one until release
	ready   []readyItem
	size    int
	timer   *time.Timer
}

// readyItem is one item of an answer. An exported connection's item
// carries the connection, whose descriptor goes with it, and its export.
type readyItem struct {
	it item
	c  *served
	ex *exportReq
}

// newAnswerer returns an answerer holding the answer back until release.
func (s *server) newAnswerer(l *link, id uint64, typ string, v1, coalesce bool) *answerer {
	return &answerer{s: s, l: l, id: id, typ: typ, v1: v1, coalesce: coalesce, pending: 1}
}

// expect announces an item that will be added later.
func (a *answerer) expect() {
	a.mu.Lock()
	a.pending++
	a.mu.Unlock()
}

// add adds an item, one announced by expect if expected.
func (a *answerer) add(r readyItem, expected bool) {
	a.mu.Lock()
	if expected {
		a.pending--
	}
	a.ready = append(a.ready, r)
	a.size += r.it.size()
	var out []readyItem
	switch {
	case a.pending == 0 || len(a.ready) >= maxBatch || a.size >= frameBudget:
		out = a.takeLocked()
	case a.coalesce && a.timer == nil:
		a.timer = time.AfterFunc(coalesceDelay, a.flush)
	}
	a.mu.Unlock()
	a.send(out)
}

// release ends the reading of the request: the answer goes once the
// items announced are ready.
func (a *answerer) release() {
	a.mu.Lock()
	a.pending--
	var out []readyItem
	if a.pending == 0 {
		out = a.takeLocked()
	}
	a.mu.Unlock()
	a.send(out)
}

func (a *answerer) flush() {
	a.mu.Lock()
	a.timer = nil
	out := a.takeLocked()
	a.mu.Unlock()
	a.send(out)
}

func (a *answerer) takeLocked() []readyItem {
	if a.timer != nil {
		a.timer.Stop()
		a.timer = nil
	}
	out := a.ready
	a.ready, a.size = nil, 0
	return out
}

// send sends items in as few frames as fit. The exports whose connection
// could not be handed over learn it through their verdict channel.
func (a *answerer) send(items []readyItem) {
	ranges := chunks(len(items), func(i int) int { return items[i].it.size() })
	if a.v1 {
		ranges = ranges[:0]
		for i := range items {
			ranges = append(ranges, [2]int{i, i + 1})
		}
	}
	for _, rg := range ranges {
		part := items[rg[0]:rg[1]]
		rcs := make([]syscall.RawConn, len(part))
		for i, r := range part {
			if r.c != nil {
				rcs[i], _ = r.c.tc.SyscallConn()
			}
		}
		// The descriptors are lent as they are, open for the send, not
		// dup'd nor switched to blocking mode.
		lend(rcs, func(fds []int) { a.sendFrame(part, fds) })
	}
}

func (a *answerer) sendFrame(part []readyItem, lent []int) {
	s := a.s
	m := &message{Type: a.typ, ID: a.id, Items: make([]item, len(part))}
	var fds []int
	var handed []*exportReq
	s.mu.Lock()
	for i, r := range part {
		m.Items[i] = r.it
		if r.c == nil {
			continue
		}
		if lent[i] < 0 {
			m.Items[i].Snapshot = nil
			m.Items[i].Error = "the connection closed while being exported"
			s.unsentLocked(r.ex)
			continue
		}
		m.Items[i].FD = true
		fds = append(fds, lent[i])
		// Before the send: mtcpd may answer at once.
		r.ex.sent = true
		handed = append(handed, r.ex)
	}
	s.mu.Unlock()
	if a.v1 {
		it := m.Items[0]
		m = &message{Type: a.typ, ID: it.ID, Snapshot: it.Snapshot, Error: it.Error, Code: it.Code}
	}
	if err := a.l.send(m, fds...); err != nil {
		s.log.Warn("could not answer mtcpd", "type", a.typ, "items", len(part), "err", err)
		s.mu.Lock()
		for _, ex := range handed {
			s.unsentLocked(ex)
		}
		s.mu.Unlock()
	}
}

// unsentLocked tells an export that its connection was not handed over:
// it stays here.
func (s *server) unsentLocked(ex *exportReq) {
	if !ex.decided {
		ex.decided = true
		ex.verdict <- verdictMsg{v: verdictUnsent}
	}
}

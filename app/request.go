package app

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// The daemon's requests to an application. Every request, single or
// batched, is a list of items: post sends them in as few frames as the
// application's protocol version allows (version 1: one per item, whose
// id is the request's), collect gathers the answers item by item.

// call is one request frame awaiting its answer. Fields after ch are
// guarded by Registry.mu.
type call struct {
	id    uint64
	reply string         // the answer's type
	v1    bool           // a version-1 request: one item, answered by one frame
	index map[uint64]int // item id → position in the caller's batch
	ch    chan reply     // the answer's frames; never blocks the reader

	got       map[uint64]bool // items answered
	abandoned bool            // the caller gave up: late answers are answer's
}

// reply is one frame of an answer, as items (a version-1 answer is one).
type reply struct {
	items []item
	fds   []int // of the items with FD, in order
}

// batchKind describes one kind of request.
type batchKind struct {
	many, manyReply string // version-2 request and answer types
	one, oneReply   string // version-1 ones
}

var (
	kindExport  = batchKind{msgExportMany, msgExportedMany, msgExport, msgExported}
	kindVerdict = batchKind{msgVerdictMany, msgFinishedMany, msgVerdict, msgFinished}
	kindImport  = batchKind{msgImportMany, msgImportedMany, msgImport, msgImported}
)

// batch is a request for items, which have their ids.
type batch struct {
	kind    batchKind
	service string // export, import
	verdict string // verdict
	items   []item
	socks   []syscall.RawConn // import: item k's socket, lent while sending
}

// post sends b's requests to a without waiting for the answers. It
// returns the calls to collect and, for the items it could not send, why.
// Abandoned calls are answered by answer alone.
func (a *appConn) post(b *batch, abandoned bool) ([]*call, []error) {
	errs := make([]error, len(b.items))
	var calls []*call
	ranges := [][2]int{}
	if a.version >= 2 {
		ranges = chunks(len(b.items), func(i int) int { return b.items[i].size() })
	} else {
		for i := range b.items {
			ranges = append(ranges, [2]int{i, i + 1})
		}
	}
	for _, rg := range ranges {
		lo, hi := rg[0], rg[1]
		var rcs []syscall.RawConn
		if b.socks != nil {
			rcs = b.socks[lo:hi]
		}
		lend(rcs, func(fds []int) {
			c := &call{index: map[uint64]int{}, got: map[uint64]bool{}, abandoned: abandoned}
			var sent []item
			var sendFDs []int
			for k := lo; k < hi; k++ {
				it := b.items[k]
				if rcs != nil {
					if fds[k-lo] < 0 {
						errs[k] = errors.New("the socket is closed")
						continue
					}
					it.FD = true
					sendFDs = append(sendFDs, fds[k-lo])
				}
				c.index[it.ID] = k
				sent = append(sent, it)
			}
			if len(sent) == 0 {
				return
			}
			var m *message
			if a.version >= 2 {
				c.id, c.reply = a.r.nextID.Add(1), b.kind.manyReply
				m = &message{Type: b.kind.many, ID: c.id, Service: b.service, Verdict: b.verdict, Items: sent}
			} else {
				it := sent[0]
				c.id, c.reply, c.v1 = it.ID, b.kind.oneReply, true
				m = &message{Type: b.kind.one, ID: c.id, Service: b.service, Verdict: b.verdict, Tuple: it.Tuple, Snapshot: it.Snapshot}
			}
			c.ch = make(chan reply, len(sent))
			if err := a.start(c, m, sendFDs); err != nil {
				for _, it := range sent {
					errs[c.index[it.ID]] = err
				}
				return
			}
			calls = append(calls, c)
		})
	}
	return calls, errs
}

// start records c as pending and sends its request.
func (a *appConn) start(c *call, m *message, fds []int) error {
	r := a.r
	r.mu.Lock()
	select {
	case <-a.done:
		r.mu.Unlock()
		return fmt.Errorf("%w: pid %d serving %s", ErrAppGone, a.pid, a.service)
	default:
	}
	a.pending[c.id] = c
	r.mu.Unlock()
	if err := a.mc.write(m, fds...); err != nil {
		a.mc.close() // a half-written frame leaves the stream unusable
		return fmt.Errorf("%w: pid %d serving %s: %v", ErrAppGone, a.pid, a.service, err)
	}
	return nil
}

// collect waits for the answers to calls and passes each answered item
// with its position in the batch, and its descriptor (or -1), to each.
// It returns, for the items left unanswered when ctx ended or the
// application disconnected, why; it passes on every frame that arrived
// before that.
func (a *appConn) collect(ctx context.Context, calls []*call, each func(k int, it *item, fd int)) map[int]error {
	deliver := func(c *call, rep reply) {
		fi := 0
		for i := range rep.items {
			it := &rep.items[i]
			fd := -1
			if it.FD {
				fd = rep.fds[fi]
				fi++
			}
			each(c.index[it.ID], it, fd)
		}
	}
	var stop error
	left := map[int]bool{}
	for _, c := range calls {
		for _, k := range c.index {
			left[k] = true
		}
	}
	for _, c := range calls {
		n := len(c.index)
		for n > 0 && stop == nil {
			select {
			case rep := <-c.ch:
				deliver(c, rep)
				n -= len(rep.items)
				for i := range rep.items {
					delete(left, c.index[rep.items[i].ID])
				}
				continue
			case <-a.done:
				stop = fmt.Errorf("%w: pid %d serving %s disconnected before answering", ErrAppGone, a.pid, a.service)
			case <-ctx.Done():
				stop = fmt.Errorf("no answer from the application (pid %d) serving %s: %w", a.pid, a.service, context.Cause(ctx))
			}
		}
		if stop == nil {
			continue
		}
		// No frame reaches c.ch once the call is abandoned or the
		// application gone (both under Registry.mu): take what came.
		a.r.mu.Lock()
		c.abandoned = true
		a.r.mu.Unlock()
		for drained := false; !drained; {
			select {
			case rep := <-c.ch:
				deliver(c, rep)
				for i := range rep.items {
					delete(left, c.index[rep.items[i].ID])
				}
			default:
				drained = true
			}
		}
	}
	out := map[int]error{}
	for k := range left {
		out[k] = stop
	}
	return out
}

// answer delivers a frame answering a request to the caller waiting for
// it. A frame that answers nothing pending, or does not match its
// request, is a protocol error.
func (a *appConn) answer(m *message, fds []int) error {
	r := a.r
	r.mu.Lock()
	c := a.pending[m.ID]
	items, err := c.accept(m, len(fds))
	if err != nil {
		r.mu.Unlock()
		closeFDs(fds)
		return err
	}
	if len(c.got) == len(c.index) {
		delete(a.pending, m.ID)
	}
	if !c.abandoned {
		c.ch <- reply{items: items, fds: fds}
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	closeFDs(fds)
	// The caller gave up before the application answered: nobody will
	// decide, so let the connections it exported carry on there.
	var resume []item
	for _, it := range items {
		if it.FD && c.reply != msgImportedMany && c.reply != msgImported {
			resume = append(resume, item{ID: it.ID})
		}
	}
	if len(resume) > 0 {
		r.log.Warn("export answered after its caller gave up; resuming the connections in the application", "service", a.service, "conns", len(resume))
		// Not from the reading goroutine, which must go on reading: the
		// application may be writing to us while we write to it, and
		// two full buffers would hold both until the write timeout
		// breaks the link. Abandoned: nobody waits for the answer.
		go a.post(&batch{kind: kindVerdict, verdict: verdictResume, items: resume}, true)
	}
	return nil
}

// accept checks that m, with nfds descriptors, answers c, marks its items
// answered and returns them. Called with Registry.mu held.
func (c *call) accept(m *message, nfds int) ([]item, error) {
	if c == nil {
		return nil, fmt.Errorf("%w: %s answer to request %d, which is not pending", ErrProtocol, m.Type, m.ID)
	}
	if m.Type != c.reply {
		return nil, fmt.Errorf("%w: %s answer to request %d, which awaits %s", ErrProtocol, m.Type, m.ID, c.reply)
	}
	items := m.Items
	if c.v1 {
		items = []item{{ID: m.ID, Snapshot: m.Snapshot, FD: m.Type == msgExported && m.Error == "", Error: m.Error, Code: m.Code}}
	}
	if len(items) == 0 {
		return nil, fmt.Errorf("%w: %s answer to request %d without items", ErrProtocol, m.Type, m.ID)
	}
	exported := c.reply == msgExported || c.reply == msgExportedMany
	for i := range items {
		it := &items[i]
		if _, ok := c.index[it.ID]; !ok || c.got[it.ID] {
			return nil, fmt.Errorf("%w: %s answer to request %d names item %d, which it does not await", ErrProtocol, m.Type, m.ID, it.ID)
		}
		if it.FD != (exported && it.Error == "") {
			return nil, fmt.Errorf("%w: %s answer to request %d: item %d has a descriptor %v and error %q", ErrProtocol, m.Type, m.ID, it.ID, it.FD, it.Error)
		}
		c.got[it.ID] = true
	}
	if want := fdCount(items); nfds != want {
		return nil, fmt.Errorf("%w: %s answer to request %d with %d descriptors, want %d", ErrProtocol, m.Type, m.ID, nfds, want)
	}
	return items, nil
}

// lend calls f with the descriptors of rcs, each kept open (neither
// dup'd nor switched to blocking mode, as File and Fd would) until f
// returns; fds[i] is -1 where rcs[i] could not lend its descriptor
// because it is closed. Each Control holds its descriptor for the calls
// nested in it, hence the recursion; nil entries (-1) need no nesting,
// which keeps the stack shallow for the answers that carry no descriptor
// (a 250-deep recursion made every goroutine that sent one grow its stack
// several times over).
func lend(rcs []syscall.RawConn, f func(fds []int)) {
	var step func(fds []int)
	step = func(fds []int) {
		for len(fds) < len(rcs) && rcs[len(fds)] == nil {
			fds = append(fds, -1)
		}
		i := len(fds)
		if i == len(rcs) {
			f(fds)
			return
		}
		called := false
		rcs[i].Control(func(fd uintptr) {
			called = true
			step(append(fds, int(fd)))
		})
		if !called {
			step(append(fds, -1))
		}
	}
	step(make([]int, 0, len(rcs)))
}

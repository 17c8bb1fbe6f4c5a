package nat

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
)

// This file turns a Batch into set-element changes. It is pure Go (no
// kernel calls) so that it is tested without root.

// setID names one of the table's fixed sets and maps.
type setID uint8

const (
	setHold4 setID = iota
	setHold6
	setFwd4
	setFwd6
	setReply4
	setReply6
	setGw4
	setGw6
	numSets
)

// setSpec describes one set or map. Every key is a concatenation
// addr . port . addr . port; ports are padded to 4 bytes, as nftables pads
// every component of a concatenation to its 32-bit registers.
type setSpec struct {
	name    string
	kind    Kind
	v6      bool
	dataLen int // 0: a set, not a map
}

func (s setSpec) addrLen() int {
	if s.v6 {
		return 16
	}
	return 4
}

// keyLen is the length of the concatenated key.
func (s setSpec) keyLen() int { return 2 * (s.addrLen() + 4) }

var setSpecs = [numSets]setSpec{
	setHold4:  {name: "hold4", kind: KindHold},
	setHold6:  {name: "hold6", kind: KindHold, v6: true},
	setFwd4:   {name: "fwd4", kind: KindForward, dataLen: 4},
	setFwd6:   {name: "fwd6", kind: KindForward, v6: true, dataLen: 16},
	setReply4: {name: "reply4", kind: KindReplyFrom, dataLen: 4 + 4}, // service addr . service port
	setReply6: {name: "reply6", kind: KindReplyFrom, v6: true, dataLen: 16 + 4},
	setGw4:    {name: "gwreply4", kind: KindGatewayReply, dataLen: 4}, // service addr
	setGw6:    {name: "gwreply6", kind: KindGatewayReply, v6: true, dataLen: 16},
}

func setOf(k Kind, v6 bool) setID {
	var s setID
	switch k {
	case KindHold:
		s = setHold4
	case KindForward:
		s = setFwd4
	case KindReplyFrom:
		s = setReply4
	case KindGatewayReply:
		s = setGw4
	default:
		panic(fmt.Sprintf("nat: no set for %v", k))
	}
	if v6 {
		s++
	}
	return s
}

// concat encodes addr . port . addr . port as a set key.
func concat(a1 netip.Addr, p1 uint16, a2 netip.Addr, p2 uint16) []byte {
	b := make([]byte, 0, 40)
	b = append(b, a1.AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, p1)
	b = append(b, 0, 0)
	b = append(b, a2.AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, p2)
	return append(b, 0, 0)
}

// splitConcat decodes a key made by concat.
func splitConcat(k []byte, v6 bool) (netip.AddrPort, netip.AddrPort, bool) {
	n := 4
	if v6 {
		n = 16
	}
	if len(k) != 2*(n+4) {
		return netip.AddrPort{}, netip.AddrPort{}, false
	}
	a1, _ := netip.AddrFromSlice(k[:n])
	p1 := binary.BigEndian.Uint16(k[n:])
	a2, _ := netip.AddrFromSlice(k[n+4 : 2*n+4])
	p2 := binary.BigEndian.Uint16(k[2*n+4:])
	return netip.AddrPortFrom(a1, p1), netip.AddrPortFrom(a2, p2), true
}

// flowKey is the key of f's hold and forward elements: the client's packets
// as the source host sees them, saddr . sport . daddr . dport.
func flowKey(f Flow) []byte {
	return concat(f.Client.Addr(), f.Client.Port(), f.Service.Addr(), f.Service.Port())
}

// replyKey is the key of a ReplyFrom element: the restored socket's packets
// leaving the target, local . lport . client . cport.
func replyKey(f Flow, local netip.AddrPort) []byte {
	return concat(local.Addr(), local.Port(), f.Client.Addr(), f.Client.Port())
}

// gwKey is the key of a GatewayReply element: the target's replies reaching
// the gateway, target . service port . client . cport.
func gwKey(f Flow, target netip.Addr) []byte {
	return concat(target, f.Service.Port(), f.Client.Addr(), f.Client.Port())
}

// replyData is a ReplyFrom element's value: service addr . service port.
// The rule writes only the address; the port makes Flows exact.
func replyData(f Flow) []byte {
	b := append([]byte(nil), f.Service.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, f.Service.Port())
	return append(b, 0, 0)
}

// decodeEntry turns a set element back into an Entry.
func decodeEntry(s setID, key, val []byte) (Entry, error) {
	spec := setSpecs[s]
	a, b, ok := splitConcat(key, spec.v6)
	if !ok {
		return Entry{}, fmt.Errorf("set %s: element key of %d bytes, want %d", spec.name, len(key), spec.keyLen())
	}
	if len(val) != spec.dataLen {
		return Entry{}, fmt.Errorf("set %s: element %x: value of %d bytes, want %d", spec.name, key, len(val), spec.dataLen)
	}
	e := Entry{Kind: spec.kind}
	switch spec.kind {
	case KindHold:
		e.Flow = Flow{Client: a, Service: b}
	case KindForward:
		e.Flow = Flow{Client: a, Service: b}
		e.Addr, _ = netip.AddrFromSlice(val)
	case KindReplyFrom:
		n := spec.addrLen()
		svc, _ := netip.AddrFromSlice(val[:n])
		e.Flow = Flow{Client: b, Service: netip.AddrPortFrom(svc, binary.BigEndian.Uint16(val[n:]))}
		e.Addr, e.LocalPort = a.Addr(), a.Port()
	case KindGatewayReply:
		svc, _ := netip.AddrFromSlice(val)
		e.Flow = Flow{Client: b, Service: netip.AddrPortFrom(svc, a.Port())}
		e.Addr = a.Addr()
	}
	return e, nil
}

// elemKey identifies one element: its set and its key bytes.
type elemKey struct {
	set setID
	key string
}

// change is one element's final state after a batch.
type change struct {
	present bool
	data    []byte
}

// index remembers, per flow, the keys of the elements that cannot be
// derived from the flow alone: the local address of its ReplyFrom element
// and the target of its GatewayReply element. Remove and replacing
// ReplyFrom/GatewayReply use it.
type index struct {
	reply map[Flow]map[netip.AddrPort]struct{}
	gw    map[Flow]map[netip.Addr]struct{}
}

func newIndex() *index {
	return &index{reply: map[Flow]map[netip.AddrPort]struct{}{}, gw: map[Flow]map[netip.Addr]struct{}{}}
}

// add records e in the index.
func (x *index) add(e Entry) {
	switch e.Kind {
	case KindReplyFrom:
		addTo(x.reply, e.Flow, netip.AddrPortFrom(e.Addr, e.LocalPort))
	case KindGatewayReply:
		addTo(x.gw, e.Flow, e.Addr)
	}
}

func addTo[K comparable](m map[Flow]map[K]struct{}, f Flow, k K) {
	s := m[f]
	if s == nil {
		s = map[K]struct{}{}
		m[f] = s
	}
	s[k] = struct{}{}
}

// elements calls fn with the set and the key of each of f's indexed
// elements (ReplyFrom, GatewayReply), and with what drops it from x.
func (x *index) elements(f Flow, fn func(id setID, key []byte, drop func())) {
	v6 := f.Is6()
	for local := range x.reply[f] {
		fn(setOf(KindReplyFrom, v6), replyKey(f, local), func() { dropFrom(x.reply, f, local) })
	}
	for target := range x.gw[f] {
		fn(setOf(KindGatewayReply, v6), gwKey(f, target), func() { dropFrom(x.gw, f, target) })
	}
}

// dropFrom removes k from f's entries in m, and f once it has none.
func dropFrom[K comparable](m map[Flow]map[K]struct{}, f Flow, k K) {
	s := m[f]
	delete(s, k)
	if len(s) == 0 {
		delete(m, f)
	}
}

// plan is the element changes of one batch, and the index as it will be if
// they are committed.
type plan struct {
	changes map[elemKey]*change
	order   []elemKey // first-touch order, so messages are deterministic
	// The index entries of the flows the batch touches, as they will be.
	reply map[Flow]map[netip.AddrPort]struct{}
	gw    map[Flow]map[netip.Addr]struct{}
	base  *index
}

// makePlan checks every change of ops and computes the element changes.
// It returns an error wrapping ErrInvalid for the first malformed one.
func makePlan(ops []op, base *index) (*plan, error) {
	p := &plan{
		changes: make(map[elemKey]*change, len(ops)),
		order:   make([]elemKey, 0, len(ops)),
		reply:   map[Flow]map[netip.AddrPort]struct{}{},
		gw:      map[Flow]map[netip.Addr]struct{}{},
		base:    base,
	}
	for i, o := range ops {
		if err := p.add(o); err != nil {
			return nil, fmt.Errorf("change %d of the batch: %w", i+1, err)
		}
	}
	return p, nil
}

func (p *plan) touch(s setID, key []byte, present bool, data []byte) {
	k := elemKey{s, string(key)}
	c := p.changes[k]
	if c == nil {
		c = &change{}
		p.changes[k] = c
		p.order = append(p.order, k)
	}
	c.present, c.data = present, data
}

// replyOf returns the flow's ReplyFrom locals as the batch has left them so
// far (copied from the base index on first use).
func (p *plan) replyOf(f Flow) map[netip.AddrPort]struct{} {
	if s, ok := p.reply[f]; ok {
		return s
	}
	s := map[netip.AddrPort]struct{}{}
	for k := range p.base.reply[f] {
		s[k] = struct{}{}
	}
	p.reply[f] = s
	return s
}

func (p *plan) gwOf(f Flow) map[netip.Addr]struct{} {
	if s, ok := p.gw[f]; ok {
		return s
	}
	s := map[netip.Addr]struct{}{}
	for k := range p.base.gw[f] {
		s[k] = struct{}{}
	}
	p.gw[f] = s
	return s
}

func (p *plan) add(o op) error {
	f, err := o.flow.normalize()
	if err != nil {
		return err
	}
	v6 := f.Is6()
	switch o.kind {
	case opHold:
		p.touch(setOf(KindHold, v6), flowKey(f), true, nil)
	case opUnhold:
		p.touch(setOf(KindHold, v6), flowKey(f), false, nil)
	case opForward:
		to, err := checkAddr(f, "forward", o.addr)
		if err != nil {
			return err
		}
		p.touch(setOf(KindForward, v6), flowKey(f), true, to.AsSlice())
	case opReplyFrom:
		a, err := checkAddr(f, "local", o.addr)
		if err != nil {
			return err
		}
		if o.port == 0 {
			return fmt.Errorf("flow %s: %w: local port 0; give the restored socket's port", f, ErrInvalid)
		}
		local := netip.AddrPortFrom(a, o.port)
		s := p.replyOf(f)
		for old := range s {
			p.touch(setOf(KindReplyFrom, v6), replyKey(f, old), false, nil)
			delete(s, old)
		}
		p.touch(setOf(KindReplyFrom, v6), replyKey(f, local), true, replyData(f))
		s[local] = struct{}{}
	case opGatewayReply:
		target, err := checkAddr(f, "target", o.addr)
		if err != nil {
			return err
		}
		s := p.gwOf(f)
		for old := range s {
			p.touch(setOf(KindGatewayReply, v6), gwKey(f, old), false, nil)
			delete(s, old)
		}
		p.touch(setOf(KindGatewayReply, v6), gwKey(f, target), true, f.Service.Addr().AsSlice())
		s[target] = struct{}{}
	case opRemove:
		p.touch(setOf(KindHold, v6), flowKey(f), false, nil)
		p.touch(setOf(KindForward, v6), flowKey(f), false, nil)
		s := p.replyOf(f)
		for old := range s {
			p.touch(setOf(KindReplyFrom, v6), replyKey(f, old), false, nil)
			delete(s, old)
		}
		g := p.gwOf(f)
		for old := range g {
			p.touch(setOf(KindGatewayReply, v6), gwKey(f, old), false, nil)
			delete(g, old)
		}
	case opDeleteEntry:
		e := o.entry
		switch e.Kind {
		case KindHold, KindForward:
			p.touch(setOf(e.Kind, v6), flowKey(f), false, nil)
		case KindReplyFrom:
			local := netip.AddrPortFrom(e.Addr.Unmap(), e.LocalPort)
			p.touch(setOf(e.Kind, v6), replyKey(f, local), false, nil)
			delete(p.replyOf(f), local)
		case KindGatewayReply:
			p.touch(setOf(e.Kind, v6), gwKey(f, e.Addr.Unmap()), false, nil)
			delete(p.gwOf(f), e.Addr.Unmap())
		default:
			return fmt.Errorf("entry %v: %w: unknown kind", e, ErrInvalid)
		}
	default:
		return fmt.Errorf("%w: unknown change %d", ErrInvalid, o.kind)
	}
	return nil
}

// setElem is one element in a kernel message.
type setElem struct {
	key, data  []byte
	timeout    time.Duration // 0: none (deletes)
	expiration time.Duration // 0: none; else the time left, updated in place (Refresh)
}

// setChanges is what a plan does to one set: destroy every touched key
// (a no-op where absent), then add the ones that end present. Destroy and
// add of one key in one transaction replace the element atomically.
type setChanges struct {
	destroy, add []setElem
}

// bySet splits the plan per set, in set order then first-touch order;
// added elements time out after timeout, holds after hold.
func (p *plan) bySet(timeout, hold time.Duration) [numSets]setChanges {
	var out [numSets]setChanges
	var n [numSets]int
	for _, k := range p.order {
		n[k.set]++
	}
	for i := range out {
		out[i].destroy = make([]setElem, 0, n[i])
		out[i].add = make([]setElem, 0, n[i])
	}
	for _, k := range p.order {
		c := p.changes[k]
		sc := &out[k.set]
		sc.destroy = append(sc.destroy, setElem{key: []byte(k.key)})
		if c.present {
			t := timeout
			if k.set == setHold4 || k.set == setHold6 {
				t = hold
			}
			sc.add = append(sc.add, setElem{key: []byte(k.key), data: c.data, timeout: t})
		}
	}
	return out
}

// phases splits the plan into the transactions that carry it out: holds
// lifted in the same batch as other changes are lifted in a second
// transaction, once the first has put every other change fully in place.
//
// The rules refresh the maps' timeouts from the packet path (dynset
// "update"), and the kernel's refresh looks for the element active in
// both generations. Within a transaction that adds a flow's element, the
// element is active in only one of them until the commit is complete: a
// packet of that flow getting through in between (its hold lifted by the
// same transaction) finds the new element by lookup, misses it in the
// refresh, and inserts a duplicate. The duplicate outlives a later
// removal and makes a later replacement fail with EEXIST. With the hold
// lifted only after the first transaction, no packet of the flow meets a
// half-committed element.
//
// last is empty when the plan lifts no hold or changes nothing else.
func (p *plan) phases(timeout, hold time.Duration) (first, last [numSets]setChanges) {
	first = p.bySet(timeout, hold)
	if onlyHolds(first) {
		return first, last
	}
	for _, id := range []setID{setHold4, setHold6} {
		sc := &first[id]
		kept := make(map[string]bool, len(sc.add))
		for _, e := range sc.add {
			kept[string(e.key)] = true
		}
		destroy := sc.destroy[:0:0]
		for _, e := range sc.destroy {
			if kept[string(e.key)] {
				destroy = append(destroy, e)
			} else {
				last[id].destroy = append(last[id].destroy, e)
			}
		}
		sc.destroy = destroy
	}
	return first, last
}

// onlyHolds reports whether ch changes no set but the holds.
func onlyHolds(ch [numSets]setChanges) bool {
	for id, sc := range ch {
		if setSpecs[id].kind != KindHold && len(sc.destroy)+len(sc.add) > 0 {
			return false
		}
	}
	return true
}

// removed lists, per set, the keys the plan removes and does not add
// back, in the sets the packet path refreshes (all but the holds): those
// a racing packet may have re-created (see [Table.Apply]).
func (p *plan) removed() (out [numSets][]setElem) {
	for _, k := range p.order {
		if setSpecs[k.set].kind == KindHold || p.changes[k].present {
			continue
		}
		out[k.set] = append(out[k.set], setElem{key: []byte(k.key)})
	}
	return out
}

// commit folds the plan's index changes into the base index.
func (p *plan) commit() {
	for f, s := range p.reply {
		if len(s) == 0 {
			delete(p.base.reply, f)
		} else {
			p.base.reply[f] = s
		}
	}
	for f, s := range p.gw {
		if len(s) == 0 {
			delete(p.base.gw, f)
		} else {
			p.base.gw[f] = s
		}
	}
}

package nat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var (
	f4 = Flow{Client: netip.MustParseAddrPort("10.77.1.2:40001"), Service: netip.MustParseAddrPort("10.77.2.11:7001")}
	f6 = Flow{Client: netip.MustParseAddrPort("[fd77:1::2]:40001"), Service: netip.MustParseAddrPort("[fd77:2::11]:7001")}
)

func TestFlowNormalize(t *testing.T) {
	mapped := Flow{
		Client:  netip.AddrPortFrom(netip.MustParseAddr("::ffff:10.0.0.1"), 1),
		Service: netip.MustParseAddrPort("10.0.0.2:2"),
	}
	n, err := mapped.normalize()
	if err != nil || !n.Client.Addr().Is4() || n.Is6() {
		t.Fatalf("IPv4-mapped client: got %v, %v; want the IPv4 flow", n, err)
	}
	for _, tc := range []struct {
		name string
		f    Flow
		want string
	}{
		{"mixed families", Flow{Client: f4.Client, Service: f6.Service}, "different families"},
		{"zero client port", Flow{Client: netip.AddrPortFrom(f4.Client.Addr(), 0), Service: f4.Service}, "port 0"},
		{"zero service port", Flow{Client: f4.Client, Service: netip.AddrPortFrom(f4.Service.Addr(), 0)}, "port 0"},
		{"zero value", Flow{}, "must be set"},
		{"unspecified", Flow{Client: netip.MustParseAddrPort("0.0.0.0:1"), Service: f4.Service}, "unspecified"},
		{"zone", Flow{Client: netip.MustParseAddrPort("[fe80::1%eth0]:1"), Service: netip.MustParseAddrPort("[fe80::2]:2")}, "zone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.f.normalize()
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("normalize(%v) = %v; want ErrInvalid saying %q", tc.f, err, tc.want)
			}
		})
	}
}

func TestKeyEncoding(t *testing.T) {
	k := flowKey(f4)
	want := []byte{10, 77, 1, 2, 0x9c, 0x41, 0, 0, 10, 77, 2, 11, 0x1b, 0x59, 0, 0}
	if !bytes.Equal(k, want) {
		t.Fatalf("flowKey(%v) = % x; want % x", f4, k, want)
	}
	if n := len(flowKey(f6)); n != setSpecs[setHold6].keyLen() {
		t.Fatalf("IPv6 key is %d bytes; want %d", n, setSpecs[setHold6].keyLen())
	}
}

// TestEntryRoundTrip checks that what a batch installs decodes back to the
// same flow, kind and address, for every kind and family.
func TestEntryRoundTrip(t *testing.T) {
	for _, f := range []Flow{f4, f6} {
		target := netip.MustParseAddr("10.77.2.12")
		if f.Is6() {
			target = netip.MustParseAddr("fd77:2::12")
		}
		local := netip.AddrPortFrom(target, 7999) // a restored socket on another port
		var b Batch
		b.Hold(f)
		b.Forward(f, target)
		b.ReplyFrom(f, local)
		b.GatewayReply(f, target)
		p, err := makePlan(b.ops, newIndex())
		if err != nil {
			t.Fatal(err)
		}
		got := map[Kind]Entry{}
		for id, sc := range p.bySet(time.Minute, time.Minute) {
			for _, el := range sc.add {
				e, err := decodeEntry(setID(id), el.key, el.data)
				if err != nil {
					t.Fatal(err)
				}
				got[e.Kind] = e
			}
		}
		want := map[Kind]Entry{
			KindHold:         {Flow: f, Kind: KindHold},
			KindForward:      {Flow: f, Kind: KindForward, Addr: target},
			KindReplyFrom:    {Flow: f, Kind: KindReplyFrom, Addr: target, LocalPort: 7999},
			KindGatewayReply: {Flow: f, Kind: KindGatewayReply, Addr: target},
		}
		for k, w := range want {
			if got[k] != w {
				t.Errorf("%v: decoded %+v; want %+v", k, got[k], w)
			}
		}
	}
}

// TestPlanLastWins checks the batch semantics: the last change of an
// element wins, every touched key is destroyed first, and ReplyFrom and
// GatewayReply replace the flow's earlier element.
func TestPlanLastWins(t *testing.T) {
	a, b2 := netip.MustParseAddr("10.77.2.12"), netip.MustParseAddr("10.77.2.13")
	idx := newIndex()
	idx.add(Entry{Flow: f4, Kind: KindReplyFrom, Addr: a, LocalPort: 7001})

	var b Batch
	b.Hold(f4)
	b.Unhold(f4)
	b.Forward(f4, a)
	b.Forward(f4, b2)
	b.ReplyFrom(f4, netip.AddrPortFrom(b2, 7001))
	p, err := makePlan(b.ops, idx)
	if err != nil {
		t.Fatal(err)
	}
	ch := p.bySet(time.Minute, time.Minute)
	if n := len(ch[setHold4].add); n != 0 {
		t.Errorf("Hold then Unhold adds %d hold elements; want 0", n)
	}
	if n := len(ch[setHold4].destroy); n != 1 {
		t.Errorf("Hold then Unhold destroys %d hold elements; want 1", n)
	}
	if add := ch[setFwd4].add; len(add) != 1 || !bytes.Equal(add[0].data, b2.AsSlice()) {
		t.Errorf("two Forwards add %v; want one element to %v", add, b2)
	}
	if n := len(ch[setReply4].destroy); n != 2 {
		t.Errorf("replacing ReplyFrom destroys %d elements; want 2 (the old one and the new key)", n)
	}
	if add := ch[setReply4].add; len(add) != 1 || !bytes.Equal(add[0].key, replyKey(f4, netip.AddrPortFrom(b2, 7001))) {
		t.Errorf("replacing ReplyFrom adds %v; want the new local only", add)
	}
	if len(idx.reply[f4]) != 1 {
		t.Fatal("the index changed before commit")
	}
	p.commit()
	if _, ok := idx.reply[f4][netip.AddrPortFrom(b2, 7001)]; !ok || len(idx.reply[f4]) != 1 {
		t.Errorf("index after commit: %v; want only the new local", idx.reply[f4])
	}

	var r Batch
	r.Remove(f4)
	p, err = makePlan(r.ops, idx)
	if err != nil {
		t.Fatal(err)
	}
	ch = p.bySet(time.Minute, time.Minute)
	for _, s := range []setID{setHold4, setFwd4, setReply4} {
		if len(ch[s].destroy) != 1 || len(ch[s].add) != 0 {
			t.Errorf("Remove: set %s: %d destroys, %d adds; want 1, 0", setSpecs[s].name, len(ch[s].destroy), len(ch[s].add))
		}
	}
	p.commit()
	if len(idx.reply) != 0 {
		t.Errorf("index after Remove: %v; want empty", idx.reply)
	}
}

func TestPlanRejectsWholeBatch(t *testing.T) {
	var b Batch
	b.Forward(f4, netip.MustParseAddr("10.77.2.12"))
	b.Forward(f4, netip.MustParseAddr("fd77:2::12")) // wrong family
	_, err := makePlan(b.ops, newIndex())
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "change 2") {
		t.Fatalf("got %v; want ErrInvalid naming change 2", err)
	}
	b.Reset()
	b.ReplyFrom(f4, netip.MustParseAddrPort("10.77.2.12:0"))
	if _, err := makePlan(b.ops, newIndex()); !errors.Is(err, ErrInvalid) {
		t.Fatalf("ReplyFrom with local port 0: got %v; want ErrInvalid", err)
	}
}

func TestOptionsDefaults(t *testing.T) {
	o, err := Options{}.withDefaults()
	if err != nil || o.Table != "mtcp" || o.Queue != 7 || o.Idle != 10*time.Minute || o.QueueMaxLen != 4096 {
		t.Fatalf("defaults: %+v, %v", o, err)
	}
	for _, bad := range []Options{{Table: "a b"}, {Table: strings.Repeat("x", 65)}, {Idle: -time.Second}, {Idle: time.Microsecond}} {
		if _, err := bad.withDefaults(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v: got %v; want ErrInvalid", bad, err)
		}
	}
}

// tcpPacket builds an IP packet carrying a TCP header from f.Client to
// f.Service.
func tcpPacket(f Flow, ext ...byte) []byte {
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], f.Client.Port())
	binary.BigEndian.PutUint16(tcp[2:], f.Service.Port())
	if f.Client.Addr().Is4() {
		h := make([]byte, 20)
		h[0], h[9] = 0x45, protoTCP
		copy(h[12:], f.Client.Addr().AsSlice())
		copy(h[16:], f.Service.Addr().AsSlice())
		return append(h, tcp...)
	}
	h := make([]byte, 40)
	h[0], h[6] = 0x60, protoTCP
	if len(ext) > 0 {
		h[6] = protoDstOpts
	}
	copy(h[8:], f.Client.Addr().AsSlice())
	copy(h[24:], f.Service.Addr().AsSlice())
	return append(append(h, ext...), tcp...)
}

func TestPacketFlow(t *testing.T) {
	for _, f := range []Flow{f4, f6} {
		if got, ok := packetFlow(tcpPacket(f)); !ok || got != f {
			t.Errorf("packetFlow(%v packet) = %v, %v", f, got, ok)
		}
	}
	// IPv6 with a destination-options header before TCP.
	dst := []byte{protoTCP, 0, 1, 4, 0, 0, 0, 0}
	if got, ok := packetFlow(tcpPacket(f6, dst...)); !ok || got != f6 {
		t.Errorf("IPv6 with extension header: %v, %v", got, ok)
	}
	// IPv6 with an authentication header (AH, 16 bytes: length 2) before
	// TCP: its length counts differently.
	ah := tcpPacket(f6, protoAH, 0, 0, 0, 0, 0, 0, 0)
	ah = append(ah[:40], append([]byte{protoTCP, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, ah[48:]...)...)
	ah[6] = protoAH
	if got, ok := packetFlow(ah); !ok || got != f6 {
		t.Errorf("IPv6 with AH: %v, %v", got, ok)
	}
	udp := tcpPacket(f4)
	udp[9] = 17
	frag := tcpPacket(f4)
	frag[7] = 1 // fragment offset 8
	for name, p := range map[string][]byte{"udp": udp, "later fragment": frag, "short": tcpPacket(f4)[:22], "empty": nil} {
		if _, ok := packetFlow(p); ok {
			t.Errorf("%s: parsed", name)
		}
	}
}

func FuzzPacketFlow(f *testing.F) {
	f.Add(tcpPacket(f4))
	f.Add(tcpPacket(f6))
	f.Add(tcpPacket(f6, protoTCP, 0, 1, 4, 0, 0, 0, 0))
	f.Fuzz(func(t *testing.T, p []byte) {
		fl, ok := packetFlow(p)
		if ok && (!fl.Client.IsValid() || !fl.Service.IsValid()) {
			t.Fatalf("ok with invalid flow %v", fl)
		}
	})
}

// TestPlanPhases: a batch that lifts holds and changes other elements
// lifts the holds in a second transaction; a batch of holds alone, or of
// other changes alone, is one.
func TestPlanPhases(t *testing.T) {
	s2, s3 := netip.MustParseAddr("10.77.2.12"), netip.MustParseAddr("10.77.2.13")
	other := Flow{Client: netip.MustParseAddrPort("10.77.1.2:40002"), Service: f4.Service}
	count := func(ch [numSets]setChanges) (n int) {
		for _, sc := range ch {
			n += len(sc.destroy) + len(sc.add)
		}
		return n
	}
	for _, tc := range []struct {
		name       string
		batch      func(b *Batch)
		first      map[setID][2]int // set: destroys, adds
		last       map[setID][2]int
		lastLifted int
		removed    map[setID]int // what Apply sweeps afterwards
	}{
		{name: "switch", batch: func(b *Batch) { b.Remove(f4); b.Forward(f4, s3) },
			first: map[setID][2]int{setFwd4: {1, 1}}, last: map[setID][2]int{setHold4: {1, 0}}},
		{name: "switch home", batch: func(b *Batch) { b.Remove(f4) },
			first: map[setID][2]int{setFwd4: {1, 0}}, last: map[setID][2]int{setHold4: {1, 0}},
			removed: map[setID]int{setFwd4: 1}},
		{name: "switch beside a new hold", batch: func(b *Batch) { b.Remove(f4); b.Forward(f4, s2); b.Hold(other) },
			first: map[setID][2]int{setFwd4: {1, 1}, setHold4: {1, 1}}, last: map[setID][2]int{setHold4: {1, 0}}},
		{name: "holds only", batch: func(b *Batch) { b.Unhold(f4); b.Hold(other) },
			first: map[setID][2]int{setHold4: {2, 1}}},
		{name: "forward only", batch: func(b *Batch) { b.Forward(f4, s2) },
			first: map[setID][2]int{setFwd4: {1, 1}}},
		{name: "remove, held or not", batch: func(b *Batch) { b.Remove(f4); b.Remove(other) },
			first: map[setID][2]int{setFwd4: {2, 0}}, last: map[setID][2]int{setHold4: {2, 0}},
			removed: map[setID]int{setFwd4: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b Batch
			tc.batch(&b)
			p, err := makePlan(b.ops, newIndex())
			if err != nil {
				t.Fatal(err)
			}
			first, last := p.phases(time.Minute, time.Minute)
			for i, want := range []map[setID][2]int{tc.first, tc.last} {
				got := [][numSets]setChanges{first, last}[i]
				n := 0
				for id, dn := range want {
					if len(got[id].destroy) != dn[0] || len(got[id].add) != dn[1] {
						t.Errorf("transaction %d, %s: %d destroys, %d adds; want %d, %d", i+1, setSpecs[id].name, len(got[id].destroy), len(got[id].add), dn[0], dn[1])
					}
					n += dn[0] + dn[1]
				}
				if count(got) != n {
					t.Errorf("transaction %d has %d changes; want %d", i+1, count(got), n)
				}
			}
			// Together the two do what the plan does.
			if all := p.bySet(time.Minute, time.Minute); count(all) != count(first)+count(last) {
				t.Errorf("the transactions hold %d changes; the plan %d", count(first)+count(last), count(all))
			}
			// Removed elements are looked for again, holds aside.
			for id, els := range p.removed() {
				if len(els) != tc.removed[setID(id)] {
					t.Errorf("removed from %s: %d; want %d", setSpecs[id].name, len(els), tc.removed[setID(id)])
				}
			}
		})
	}
}

// TestHoldTimeout: rewrites get the table's idle timeout, holds their
// own (traffic does not refresh them).
func TestHoldTimeout(t *testing.T) {
	const idle, hold = 24 * time.Hour, 7 * time.Minute
	for _, f := range []Flow{f4, f6} {
		var b Batch
		b.Hold(f)
		b.Forward(f, f.Service.Addr())
		p, err := makePlan(b.ops, newIndex())
		if err != nil {
			t.Fatal(err)
		}
		for id, sc := range p.bySet(idle, hold) {
			want := idle
			if setSpecs[id].kind == KindHold {
				want = hold
			}
			for _, el := range sc.add {
				if el.timeout != want {
					t.Errorf("%s: timeout %v, want %v", setSpecs[id].name, el.timeout, want)
				}
			}
		}
	}
}

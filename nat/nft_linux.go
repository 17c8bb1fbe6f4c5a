//go:build linux

package nat

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// This file owns nf_tables: the table layout installed by Open, element
// changes, one-transaction commits and set dumps. google/nftables encodes
// the rule expressions (meta, cmp, payload, lookup, dynset, counter, queue,
// the xtables target) and names the set data types; the messages around
// them are assembled here, because google/nftables v0.3.0 cannot express
// what this package needs:
//   - NFTA_PAYLOAD_CSUM_FLAGS with csum type NONE: its Payload marshaller
//     drops the flags unless CsumType > 0, so an IPv6 address write could
//     not ask for the TCP pseudo-header fix-up (see payloadWrite);
//   - NFT_MSG_DESTROYSETELEM (Linux 6.3), the delete that does not fail on
//     a missing element, without which Remove/Unhold of an expired element
//     would abort the whole batch with ENOENT;
//   - a send buffer sized to the batch: an nfnetlink batch must arrive in
//     one sendmsg, and a 10,000-flow batch (~1 MB) exceeds the default
//     netlink send buffer (EMSGSIZE); Conn.Flush does not size it;
//   - set dumps with large reads (see dumpBuf): GetSetElements of 100,000
//     elements took 12.8 s here, the dump below 1.9 s.

// nftMsg is an nf_tables message type (linux/netfilter/nf_tables.h, enum
// nf_tables_msg_types).
type nftMsg uint8

const (
	nftMsgNewTable   nftMsg = unix.NFT_MSG_NEWTABLE
	nftMsgNewChain   nftMsg = unix.NFT_MSG_NEWCHAIN
	nftMsgNewRule    nftMsg = unix.NFT_MSG_NEWRULE
	nftMsgDelRule    nftMsg = unix.NFT_MSG_DELRULE // with only table and chain: flush the chain
	nftMsgNewSet     nftMsg = unix.NFT_MSG_NEWSET
	nftMsgNewSetElem nftMsg = unix.NFT_MSG_NEWSETELEM
	// nftMsgDestroyTable deletes a table, succeeding if it is absent
	// (NFT_MSG_DESTROYTABLE, Linux 6.3; not in golang.org/x/sys/unix).
	nftMsgDestroyTable nftMsg = 26
	// nftMsgDestroySetElem deletes set elements, skipping absent ones
	// (NFT_MSG_DESTROYSETELEM, Linux 6.3; not in golang.org/x/sys/unix).
	nftMsgDestroySetElem nftMsg = 30
)

// nftSetFlags are set flags (linux/netfilter/nf_tables.h, enum
// nft_set_flags).
type nftSetFlags uint32

const (
	nftSetMap     nftSetFlags = unix.NFT_SET_MAP     // elements carry data
	nftSetTimeout nftSetFlags = unix.NFT_SET_TIMEOUT // elements may time out
	nftSetEval    nftSetFlags = unix.NFT_SET_EVAL    // updated from the packet path ("dynamic")
)

// nftReg is an nf_tables data register (linux/netfilter/nf_tables.h, enum
// nft_registers). The 32-bit registers are used: a concatenated key takes
// one register per component, an IPv6 address four.
type nftReg uint32

const (
	// regKey holds the key: 4 registers (IPv4) or 10 (IPv6).
	regKey nftReg = unix.NFT_REG32_00
	// regData4 and regData6 hold a map's value, past the key.
	regData4 nftReg = unix.NFT_REG32_04
	regData6 nftReg = unix.NFT_REG32_10 // up to 5 registers: NFT_REG32_10..14
)

// nftChainPolicy is a base chain's policy, a netfilter verdict
// (linux/netfilter.h).
type nftChainPolicy uint32

const nfAccept nftChainPolicy = 1 // NF_ACCEPT

// nftHook is a netfilter hook (linux/netfilter.h, enum nf_inet_hooks).
type nftHook uint32

const (
	hookPrerouting  nftHook = unix.NF_INET_PRE_ROUTING
	hookPostrouting nftHook = unix.NF_INET_POST_ROUTING
)

// Chain priorities (linux/netfilter_ipv4.h, enum nf_ip_hook_priorities).
const (
	// prioRaw (NF_IP_PRI_RAW): before conntrack (-200), so conntrack sees
	// the rewritten packet and the stateless rewrite needs no ct state.
	prioRaw int32 = -300
	// prioSrcNAT (NF_IP_PRI_NAT_SRC): the last word on a leaving packet.
	prioSrcNAT int32 = 100
)

// Payload checksum handling (linux/netfilter/nf_tables.h, enum
// nft_payload_csum_types and nft_payload_csum_flags).
type nftCsumType uint32

const (
	csumNone nftCsumType = unix.NFT_PAYLOAD_CSUM_NONE
	csumInet nftCsumType = unix.NFT_PAYLOAD_CSUM_INET
	// l4csumPseudoHdr makes the kernel fix the TCP checksum, which covers
	// the addresses through the pseudo-header (NFT_PAYLOAD_L4CSUM_PSEUDOHDR).
	l4csumPseudoHdr uint32 = unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR
	// ipv4CsumOffset is the IPv4 header checksum's offset (RFC 791).
	ipv4CsumOffset uint32 = 10
)

// Header offsets (RFC 791, RFC 8200, RFC 9293).
const (
	ip4Saddr   = 12
	ip4Daddr   = 16
	ip6Saddr   = 8
	ip6Daddr   = 24
	tcpSport   = 0
	tcpDport   = 2
	chainPre   = "prerouting"
	chainPost  = "postrouting"
	maxElemMsg = 60 << 10 // an element list is one attribute: at most 64 KiB
	// maxSetSize bounds every set and map. A set used by a dynset ("update
	// @map") gets 65535 from the kernel unless it has a size, which would
	// cap mtcp at 65,535 flows per family and kind.
	maxSetSize = 1 << 20
)

// xtNFQueueRev is the xtables NFQUEUE target revision used
// (linux/netfilter/xt_NFQUEUE.h, struct xt_NFQ_info_v3).
const xtNFQueueRev = 3

// holdVerdict is how the hold rule hands packets to NFQUEUE.
type holdVerdict uint8

const (
	// holdNative uses nf_tables' own queue expression (CONFIG_NFT_QUEUE).
	holdNative holdVerdict = iota
	// holdXT uses the xtables NFQUEUE target through nft_compat, for
	// kernels built without nft_queue (this one: CONFIG_NFT_QUEUE is
	// unset). nft(8) then lists the table as "managed by iptables-nft"
	// and needs libxtables to show the rule's verdict.
	holdXT
)

// nftConn is the nf_tables side of a Table: a netlink socket bound to the
// namespace of the thread that opened it.
type nftConn struct {
	sock  *nlSock
	table string
	buf   []byte
}

// opTimeout bounds one netlink exchange: the kernel answers a transaction
// as soon as it has processed it, so this only guards against a bug.
const opTimeout = 30 * time.Second

func dialNFT(table string) (*nftConn, error) {
	s, err := dialNetfilter("nftables")
	if err != nil {
		return nil, err
	}
	return &nftConn{sock: s, table: table, buf: make([]byte, dumpBuf)}, nil
}

func (n *nftConn) close() error { return n.sock.close() }

// nftReq is one message of a transaction.
type nftReq struct {
	msg   nftMsg
	flags nlFlags
	attrs []byte
	what  string // for errors: "add rule hold4", ...
}

// txError is a failed transaction: the first failing message and its
// error. The kernel applies nothing of a failed transaction.
type txError struct {
	what string
	err  error
	more int // further failing messages
}

func (e *txError) Error() string {
	s := e.what + ": " + e.err.Error()
	if e.more > 0 {
		s += fmt.Sprintf(" (and %d more failures in the same transaction)", e.more)
	}
	return s + "; nothing was changed"
}

func (e *txError) Unwrap() error { return e.err }

// commit sends reqs as one nfnetlink batch, i.e. one nf_tables
// transaction: all of it applies or none.
func (n *nftConn) commit(reqs []nftReq) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	var w msgWriter
	begin := n.sock.nextSeq()
	w.add(nfnlMsgBatchBegin, nlmRequest, begin, unix.AF_UNSPEC, uint16(nfnlSubsysNFTables), nil)
	what := make(map[uint32]string, len(reqs))
	for _, r := range reqs {
		seq := n.sock.nextSeq()
		what[seq] = r.what
		w.add(nfMsgType(nfnlSubsysNFTables, uint8(r.msg)), nlmRequest|nlmAck|r.flags, seq, unix.NFPROTO_INET, 0, r.attrs)
	}
	w.add(nfnlMsgBatchEnd, nlmRequest, n.sock.nextSeq(), unix.AF_UNSPEC, uint16(nfnlSubsysNFTables), nil)
	if err := n.sock.fitSndbuf(len(w.b)); err != nil {
		return err
	}
	if err := n.sock.send(ctx, w.b); err != nil {
		return err
	}
	// One ack or error per message, delivered once the kernel has
	// processed the whole batch; a batch-level failure (EPERM, ENOMEM)
	// is one error against the batch header.
	var first *txError
	for len(what) > 0 {
		msgs, err := n.sock.recv(ctx, n.buf)
		if err != nil {
			return fmt.Errorf("reading the transaction's acknowledgements: %w", err)
		}
		for _, m := range msgs {
			if m.typ != nlmsgError {
				continue
			}
			aerr := ackError(m)
			if m.seq == begin {
				if aerr == nil {
					continue
				}
				return &txError{what: "transaction", err: aerr}
			}
			w, ok := what[m.seq]
			if !ok {
				continue // a late reply to an earlier exchange
			}
			delete(what, m.seq)
			if aerr != nil {
				if first == nil {
					first = &txError{what: w, err: aerr}
				} else {
					first.more++
				}
			}
		}
	}
	if first != nil {
		return first
	}
	return nil
}

// attrs marshals netlink attributes; the inputs are built here, so an
// error is a bug.
func attrs(a ...netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(a)
	if err != nil {
		panic(fmt.Sprintf("nat: marshal attributes: %v", err))
	}
	return b
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func (n *nftConn) tableReq() nftReq {
	return nftReq{msg: nftMsgNewTable, flags: nlmCreate, what: "create table inet " + n.table,
		attrs: attrs(
			netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: cstr(n.table)},
			netlink.Attribute{Type: unix.NFTA_TABLE_FLAGS, Data: be32(0)},
		)}
}

func (n *nftConn) destroyTableReq() nftReq {
	return nftReq{msg: nftMsgDestroyTable, what: "delete table inet " + n.table,
		attrs: attrs(netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: cstr(n.table)})}
}

// chainReq creates (or, if it exists with the same hook, keeps) a base
// filter chain.
func (n *nftConn) chainReq(name string, hook nftHook, prio int32) nftReq {
	return nftReq{msg: nftMsgNewChain, flags: nlmCreate, what: "create chain " + name,
		attrs: attrs(
			netlink.Attribute{Type: unix.NFTA_CHAIN_TABLE, Data: cstr(n.table)},
			netlink.Attribute{Type: unix.NFTA_CHAIN_NAME, Data: cstr(name)},
			netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: attrs(
				netlink.Attribute{Type: unix.NFTA_HOOK_HOOKNUM, Data: be32(uint32(hook))},
				netlink.Attribute{Type: unix.NFTA_HOOK_PRIORITY, Data: be32(uint32(prio))},
			)},
			netlink.Attribute{Type: unix.NFTA_CHAIN_POLICY, Data: be32(uint32(nfAccept))},
			netlink.Attribute{Type: unix.NFTA_CHAIN_TYPE, Data: cstr("filter")},
		)}
}

// flushChainReq deletes every rule of a chain.
func (n *nftConn) flushChainReq(name string) nftReq {
	return nftReq{msg: nftMsgDelRule, what: "flush chain " + name,
		attrs: attrs(
			netlink.Attribute{Type: unix.NFTA_RULE_TABLE, Data: cstr(n.table)},
			netlink.Attribute{Type: unix.NFTA_RULE_CHAIN, Data: cstr(name)},
		)}
}

// keyType is the nftables data type of a set's key, for nft(8)'s display:
// ipv4_addr . inet_service . ipv4_addr . inet_service (or ipv6_addr).
func keyType(v6 bool) nftables.SetDatatype {
	a := nftables.TypeIPAddr
	if v6 {
		a = nftables.TypeIP6Addr
	}
	return nftables.MustConcatSetType(a, nftables.TypeInetService, a, nftables.TypeInetService)
}

func dataType(s setSpec) nftables.SetDatatype {
	a := nftables.TypeIPAddr
	if s.v6 {
		a = nftables.TypeIP6Addr
	}
	if s.kind == KindReplyFrom {
		return nftables.MustConcatSetType(a, nftables.TypeInetService)
	}
	return a
}

// setReq creates (or, if it exists identical, keeps) one set or map. A set
// that exists with a different definition makes the kernel answer EEXIST.
func (n *nftConn) setReq(id setID) nftReq {
	s := setSpecs[id]
	flags := nftSetTimeout
	kt := keyType(s.v6)
	a := []netlink.Attribute{
		{Type: unix.NFTA_SET_TABLE, Data: cstr(n.table)},
		{Type: unix.NFTA_SET_NAME, Data: cstr(s.name)},
		{Type: unix.NFTA_SET_KEY_TYPE, Data: be32(kt.GetNFTMagic())},
		{Type: unix.NFTA_SET_KEY_LEN, Data: be32(uint32(s.keyLen()))},
		{Type: unix.NFTA_SET_ID, Data: be32(uint32(id) + 1)},
		{Type: unix.NLA_F_NESTED | unix.NFTA_SET_DESC, Data: attrs(
			netlink.Attribute{Type: unix.NFTA_SET_DESC_SIZE, Data: be32(maxSetSize)},
		)},
	}
	if s.dataLen > 0 {
		flags |= nftSetMap | nftSetEval
		dt := dataType(s)
		a = append(a,
			netlink.Attribute{Type: unix.NFTA_SET_DATA_TYPE, Data: be32(dt.GetNFTMagic())},
			netlink.Attribute{Type: unix.NFTA_SET_DATA_LEN, Data: be32(uint32(s.dataLen))},
		)
	}
	a = append(a, netlink.Attribute{Type: unix.NFTA_SET_FLAGS, Data: be32(uint32(flags))})
	return nftReq{msg: nftMsgNewSet, flags: nlmCreate, what: "create set " + s.name, attrs: attrs(a...)}
}

// ruleReq appends a rule to a chain. Each element of exprs is one
// expression as expr.Marshal encodes it.
func (n *nftConn) ruleReq(chain, what string, exprs ...[]byte) nftReq {
	var list []netlink.Attribute
	for _, e := range exprs {
		list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: e})
	}
	return nftReq{msg: nftMsgNewRule, flags: nlmCreate | nlmAppend, what: "add rule " + what,
		attrs: attrs(
			netlink.Attribute{Type: unix.NFTA_RULE_TABLE, Data: cstr(n.table)},
			netlink.Attribute{Type: unix.NFTA_RULE_CHAIN, Data: cstr(chain)},
			netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: attrs(list...)},
		)}
}

// ex encodes google/nftables expressions.
func ex(es ...expr.Any) [][]byte {
	out := make([][]byte, 0, len(es))
	for _, e := range es {
		b, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			panic(fmt.Sprintf("nat: marshal %T: %v", e, err))
		}
		out = append(out, b)
	}
	return out
}

// payloadWrite writes len bytes from reg into the network header at off
// and asks for the checksum fix-ups the nft command line adds by itself:
// IPv4 header checksum (csumInet at offset 10) and, for both families, the
// TCP checksum through the pseudo-header. It is encoded here, not with
// expr.Payload, because google/nftables v0.3.0 omits CsumFlags when
// CsumType is NONE, which is the IPv6 case (no IP header checksum).
func payloadWrite(reg nftReg, off, n uint32, v6 bool) []byte {
	ct, co := csumInet, ipv4CsumOffset
	if v6 {
		ct, co = csumNone, 0
	}
	return attrs(
		netlink.Attribute{Type: unix.NFTA_EXPR_NAME, Data: cstr("payload")},
		netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: attrs(
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_SREG, Data: be32(uint32(reg))},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_BASE, Data: be32(unix.NFT_PAYLOAD_NETWORK_HEADER)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_OFFSET, Data: be32(off)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_LEN, Data: be32(n)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_CSUM_TYPE, Data: be32(uint32(ct))},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_CSUM_OFFSET, Data: be32(co)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_CSUM_FLAGS, Data: be32(l4csumPseudoHdr)},
		)},
	)
}

// match is "meta nfproto ipvX meta l4proto tcp", then the packet's
// saddr . sport . daddr . dport loaded into the key registers.
func match(v6 bool, extra ...expr.Any) []expr.Any {
	proto := byte(unix.NFPROTO_IPV4)
	al, sa, da := uint32(4), uint32(ip4Saddr), uint32(ip4Daddr)
	if v6 {
		proto, al, sa, da = unix.NFPROTO_IPV6, 16, ip6Saddr, ip6Daddr
	}
	r := uint32(regKey)
	aRegs := al / 4
	es := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: r},
		&expr.Cmp{Op: expr.CmpOpEq, Register: r, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: r},
		&expr.Cmp{Op: expr.CmpOpEq, Register: r, Data: []byte{unix.IPPROTO_TCP}},
	}
	es = append(es, extra...)
	return append(es,
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: r, Base: expr.PayloadBaseNetworkHeader, Offset: sa, Len: al},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: r + aRegs, Base: expr.PayloadBaseTransportHeader, Offset: tcpSport, Len: 2},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: r + aRegs + 1, Base: expr.PayloadBaseNetworkHeader, Offset: da, Len: al},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: r + 2*aRegs + 1, Base: expr.PayloadBaseTransportHeader, Offset: tcpDport, Len: 2},
	)
}

// markBit loads the packet's mark into the key register and keeps only
// bit.
func markBit(bit uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: uint32(regKey)},
		&expr.Bitwise{SourceRegister: uint32(regKey), DestRegister: uint32(regKey), Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, bit), Xor: make([]byte, 4)},
	}
}

// quietRule drops what sockets marked with the quiet bit send, before any
// rewrite: TCP only, so that another tool's packets whose marks happen to
// have the bit are spared at least when they are not TCP.
func (n *nftConn) quietRule(quiet uint32) nftReq {
	es := append([]expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: uint32(regKey)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: uint32(regKey), Data: []byte{unix.IPPROTO_TCP}},
	}, markBit(quiet)...)
	es = append(es,
		&expr.Cmp{Op: expr.CmpOpNeq, Register: uint32(regKey), Data: make([]byte, 4)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
	return n.ruleReq(chainPost, "quiet", ex(es...)...)
}

// holdRule: packets of a held flow, unless their mark has the inject bit,
// go to NFQUEUE q without the bypass flag: with no reader they are
// dropped, never delivered to the frozen socket (which would answer with
// a RST).
func (n *nftConn) holdRule(v6 bool, q uint16, inject uint32, how holdVerdict) nftReq {
	s := setSpecs[setOf(KindHold, v6)]
	es := match(v6, append(markBit(inject),
		&expr.Cmp{Op: expr.CmpOpEq, Register: uint32(regKey), Data: make([]byte, 4)})...)
	es = append(es,
		&expr.Lookup{SourceRegister: uint32(regKey), SetName: s.name, SetID: uint32(setOf(KindHold, v6)) + 1},
		&expr.Counter{},
	)
	switch how {
	case holdNative:
		es = append(es, &expr.Queue{Num: q, Total: 1})
	case holdXT:
		// struct xt_NFQ_info_v3 {u16 queuenum, queues_total, flags},
		// host byte order, padded to XT_ALIGN (8). flags 0: no bypass.
		info := make(xt.Unknown, 8)
		binary.NativeEndian.PutUint16(info[0:], q)
		binary.NativeEndian.PutUint16(info[2:], 1)
		es = append(es, &expr.Target{Name: "NFQUEUE", Rev: xtNFQueueRev, Info: &info})
	}
	return n.ruleReq(chainPre, s.name, ex(es...)...)
}

// rewriteRule: look the packet up in map id; on a hit write the value over
// the packet's saddr or daddr, then refresh the element's idle timeout
// (dynset update).
//
// The refresh reads the element's value back from the rewritten header
// (ip daddr or ip saddr, plus tcp sport for ReplyFrom) instead of reusing
// the lookup's register: nft(8) 1.0.6 aborts listing the whole ruleset
// (netlink_parse_concat_expr assertion) on a dynset fed from a map lookup.
// The key is still the registers loaded before the rewrite: nft prints
// the refresh as "update @m { ip saddr . tcp sport . ip daddr . tcp dport :
// ip daddr }", which reads as if the key were reloaded, but it is not.
// The value matters only if a packet races a delete of its element: the
// update then re-creates the element (with that value) until it times out.
func (n *nftConn) rewriteRule(id setID, chain string, daddr bool, idle time.Duration) nftReq {
	s := setSpecs[id]
	data := regData4
	off := uint32(ip4Saddr)
	if s.v6 {
		data, off = regData6, ip6Saddr
	}
	if daddr {
		off += uint32(s.addrLen())
	}
	es := append(match(s.v6),
		&expr.Lookup{SourceRegister: uint32(regKey), DestRegister: uint32(data), IsDestRegSet: true, SetName: s.name, SetID: uint32(id) + 1},
		&expr.Counter{},
	)
	b := ex(es...)
	b = append(b, payloadWrite(data, off, uint32(s.addrLen()), s.v6))
	refresh := []expr.Any{&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: uint32(data),
		Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(s.addrLen())}}
	if s.kind == KindReplyFrom {
		refresh = append(refresh, &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: uint32(data) + uint32(s.addrLen()/4),
			Base: expr.PayloadBaseTransportHeader, Offset: tcpSport, Len: 2})
	}
	refresh = append(refresh, &expr.Dynset{SrcRegKey: uint32(regKey), SrcRegData: uint32(data), SetName: s.name, SetID: uint32(id) + 1,
		Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: idle})
	b = append(b, ex(refresh...)...)
	return n.ruleReq(chain, s.name, b...)
}

// layout is the whole fixed layout, as one transaction that creates what
// is missing, keeps identical sets and their elements, and replaces the
// chains' rules (flush + add, atomically: no packet sees an empty chain).
func (n *nftConn) layout(o Options, how holdVerdict) []nftReq {
	reqs := []nftReq{n.tableReq()}
	for id := range numSets {
		reqs = append(reqs, n.setReq(id))
	}
	reqs = append(reqs,
		n.chainReq(chainPre, hookPrerouting, prioRaw),
		n.chainReq(chainPost, hookPostrouting, prioSrcNAT),
		n.flushChainReq(chainPre),
		n.flushChainReq(chainPost),
	)
	reqs = append(reqs, n.quietRule(o.QuietMark))
	for _, v6 := range []bool{false, true} {
		reqs = append(reqs, n.holdRule(v6, o.Queue, o.InjectMark, how))
	}
	for _, v6 := range []bool{false, true} {
		// Source host or gateway: client->service gets daddr = target.
		reqs = append(reqs, n.rewriteRule(setOf(KindForward, v6), chainPre, true, o.Idle))
	}
	for _, v6 := range []bool{false, true} {
		// Gateway: target->client gets saddr = service.
		reqs = append(reqs, n.rewriteRule(setOf(KindGatewayReply, v6), chainPre, false, o.Idle))
	}
	for _, v6 := range []bool{false, true} {
		// Target host: local->client gets saddr = service.
		reqs = append(reqs, n.rewriteRule(setOf(KindReplyFrom, v6), chainPost, false, o.Idle))
	}
	return reqs
}

// elemReqs turns per-set changes into messages: every destroy first, then
// every add, each list cut to fit one attribute.
func (n *nftConn) elemReqs(ch [numSets]setChanges) []nftReq {
	var reqs []nftReq
	for id := range numSets {
		reqs = append(reqs, n.elemMsgs(id, nftMsgDestroySetElem, ch[id].destroy)...)
	}
	for id := range numSets {
		reqs = append(reqs, n.elemMsgs(id, nftMsgNewSetElem, ch[id].add)...)
	}
	return reqs
}

func (n *nftConn) elemMsgs(id setID, msg nftMsg, elems []setElem) []nftReq {
	if len(elems) == 0 {
		return nil
	}
	name := setSpecs[id].name
	verb, flags := "add elements to ", nlmCreate
	if msg == nftMsgDestroySetElem {
		verb, flags = "delete elements from ", 0
	}
	var reqs []nftReq
	var list []byte
	count := 0
	flush := func() {
		reqs = append(reqs, nftReq{msg: msg, flags: flags, what: fmt.Sprintf("%s%s (%d)", verb, name, count),
			attrs: attrs(
				netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: cstr(n.table)},
				netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: cstr(name)},
				netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: list},
			)})
		list, count = nil, 0
	}
	for _, e := range elems {
		if len(list)+elemLen(e) > maxElemMsg {
			flush()
		}
		if list == nil {
			list = make([]byte, 0, min(maxElemMsg, len(elems)*elemLen(e)))
		}
		list = appendElem(list, e)
		count++
	}
	flush()
	return reqs
}

// Set elements are many and small: they are encoded by hand rather than
// with netlink.MarshalAttributes, which allocates per attribute (10,000
// elements took 31 ms of Go time that way, most of an Apply's user time).

const nlaHdrLen = 4 // struct nlattr

func nlaAlign(n int) int { return (n + 3) &^ 3 }

// appendNLA appends one attribute header for a payload of n bytes.
func appendNLA(b []byte, typ uint16, n int) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(nlaHdrLen+n))
	return binary.NativeEndian.AppendUint16(b, typ)
}

func pad(b []byte, n int) []byte {
	for range nlaAlign(n) - n {
		b = append(b, 0)
	}
	return b
}

// valueLen is the size of a nested {NFTA_DATA_VALUE: v} attribute's payload.
func valueLen(v []byte) int { return nlaHdrLen + nlaAlign(len(v)) }

func elemLen(e setElem) int {
	n := nlaHdrLen + valueLen(e.key)
	if e.timeout > 0 {
		n += nlaHdrLen + 8
	}
	if e.expiration > 0 {
		n += nlaHdrLen + 8
	}
	if e.data != nil {
		n += nlaHdrLen + valueLen(e.data)
	}
	return nlaHdrLen + n
}

// appendElem appends NFTA_LIST_ELEM {KEY {DATA_VALUE}, TIMEOUT,
// EXPIRATION, DATA {DATA_VALUE}}.
func appendElem(b []byte, e setElem) []byte {
	b = appendNLA(b, unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM, elemLen(e)-nlaHdrLen)
	b = appendNLA(b, unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_KEY, valueLen(e.key))
	b = appendNLA(b, unix.NFTA_DATA_VALUE, len(e.key))
	b = pad(append(b, e.key...), len(e.key))
	if e.timeout > 0 {
		b = appendNLA(b, unix.NFTA_SET_ELEM_TIMEOUT, 8)
		b = binary.BigEndian.AppendUint64(b, uint64(e.timeout.Milliseconds()))
	}
	if e.expiration > 0 {
		b = appendNLA(b, unix.NFTA_SET_ELEM_EXPIRATION, 8)
		b = binary.BigEndian.AppendUint64(b, uint64(e.expiration.Milliseconds()))
	}
	if e.data != nil {
		b = appendNLA(b, unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_DATA, valueLen(e.data))
		b = appendNLA(b, unix.NFTA_DATA_VALUE, len(e.data))
		b = pad(append(b, e.data...), len(e.data))
	}
	return b
}

// getBatch bounds the lookups sent in one datagram: each answer (the
// element, then an acknowledgement) must fit the socket's receive buffer
// before it is read. With the default buffer (rmem_default, 208 KiB),
// 256 acknowledgements of missing elements fill it exactly, and one found
// element more overflows it (ENOBUFS, measured on Linux 6.18): half that
// leaves room for every element of a batch to be found.
const getBatch = 128

// present returns those of elems (keys only) that the set holds, looked up
// one by one (NFT_MSG_GETSETELEM), many lookups to a datagram.
func (n *nftConn) present(id setID, elems []setElem) ([]setElem, error) {
	var out []setElem
	err := n.lookup(id, elems, func(e setElem, _ rawElem) { out = append(out, e) })
	return out, err
}

// lookup looks elems (keys only) up in the set one by one
// (NFT_MSG_GETSETELEM), many lookups to a datagram, and calls found with
// each one the set holds and the element as the kernel has it (its data
// and expiration).
func (n *nftConn) lookup(id setID, elems []setElem, found func(setElem, rawElem)) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	name := setSpecs[id].name
	for len(elems) > 0 {
		chunk := elems[:min(getBatch, len(elems))]
		elems = elems[len(chunk):]
		var w msgWriter
		which := make(map[uint32]setElem, len(chunk))
		for _, e := range chunk {
			seq := n.sock.nextSeq()
			which[seq] = e
			w.add(nfMsgType(nfnlSubsysNFTables, unix.NFT_MSG_GETSETELEM), nlmRequest|nlmAck, seq, unix.NFPROTO_INET, 0, attrs(
				netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: cstr(n.table)},
				netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: cstr(name)},
				netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: appendElem(nil, setElem{key: e.key})},
			))
		}
		if err := n.sock.fitSndbuf(len(w.b)); err != nil {
			return err
		}
		if err := n.sock.send(ctx, w.b); err != nil {
			return fmt.Errorf("look up elements of %s: %w", name, err)
		}
		// Each lookup ends with an acknowledgement: an error of 0 after
		// the element when it is there, ENOENT when it is not.
		got := make(map[uint32]rawElem, len(chunk))
		for len(which) > 0 {
			msgs, err := n.sock.recv(ctx, n.buf)
			if err != nil {
				return fmt.Errorf("look up elements of %s: %w", name, err)
			}
			for _, m := range msgs {
				e, ok := which[m.seq]
				if !ok {
					continue
				}
				if m.typ != nlmsgError {
					if len(m.data) >= nfgenmsgLen {
						if els, err := decodeElems(nil, m.data[nfgenmsgLen:]); err == nil && len(els) == 1 {
							got[m.seq] = els[0]
						}
					}
					continue
				}
				delete(which, m.seq)
				switch err := ackError(m); {
				case err == nil:
					found(e, got[m.seq])
				case !isErrno(err, syscall.ENOENT):
					return fmt.Errorf("look up an element of %s: %w", name, err)
				}
			}
		}
	}
	return nil
}

// rawElem is one element read back from the kernel.
// dumpBuf is the receive buffer of set dumps. The kernel fills each dump
// datagram up to the largest buffer recvmsg was given (at most ~32 KiB),
// and restarts its walk of the set from the first element for every
// datagram, so a dump costs O(n^2 / elements per datagram). With the
// page-sized reads of google/nftables' GetSetElements, 100,000 elements
// took 12.8 s of kernel time here; big datagrams cut that by about eight.
const dumpBuf = 64 << 10

// elements reads one set back (see settle).
func (n *nftConn) elements(id setID) ([]rawElem, error) {
	els, err := settle(func() ([]rawElem, int, error) { return n.dump(id) })
	if err != nil {
		return nil, fmt.Errorf("list set %s: %w", setSpecs[id].name, err)
	}
	return els, nil
}

// dump reads one set back once. parts is how many datagrams the kernel
// sent it in: one walk of the set each.
func (n *nftConn) dump(id setID) (els []rawElem, parts int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*opTimeout)
	defer cancel()
	name := setSpecs[id].name
	var w msgWriter
	seq := n.sock.nextSeq()
	w.add(nfMsgType(nfnlSubsysNFTables, unix.NFT_MSG_GETSETELEM), nlmRequest|nlFlags(unix.NLM_F_DUMP), seq, unix.NFPROTO_INET, 0, attrs(
		netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: cstr(n.table)},
		netlink.Attribute{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: cstr(name)},
	))
	if err := n.sock.send(ctx, w.b); err != nil {
		return nil, 0, fmt.Errorf("list set %s: %w", name, err)
	}
	if len(n.buf) < dumpBuf {
		n.buf = make([]byte, dumpBuf)
	}
	var out []rawElem
	for {
		msgs, err := n.sock.recv(ctx, n.buf)
		if err != nil {
			return nil, 0, fmt.Errorf("list set %s: %w", name, err)
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue
			}
			switch m.typ {
			case nlmsgDone:
				return out, parts, nil
			case nlmsgError:
				if err := ackError(m); err != nil {
					return nil, 0, fmt.Errorf("list set %s: %w", name, err)
				}
			default:
				if len(m.data) < nfgenmsgLen {
					continue
				}
				parts++
				if out, err = decodeElems(out, m.data[nfgenmsgLen:]); err != nil {
					return nil, 0, fmt.Errorf("list set %s: %w", name, err)
				}
			}
		}
	}
}

// decodeElems appends the elements of one NFT_MSG_NEWSETELEM message.
func decodeElems(out []rawElem, b []byte) ([]rawElem, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return out, err
	}
	ad.ByteOrder = binary.BigEndian
	value := func(nad *netlink.AttributeDecoder) []byte {
		var v []byte
		for nad.Next() {
			if nad.Type() == unix.NFTA_DATA_VALUE {
				v = append([]byte(nil), nad.Bytes()...)
			}
		}
		return v
	}
	for ad.Next() {
		if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				var e rawElem
				list.Nested(func(el *netlink.AttributeDecoder) error {
					el.ByteOrder = binary.BigEndian
					for el.Next() {
						switch el.Type() {
						case unix.NFTA_SET_ELEM_KEY:
							el.Nested(func(k *netlink.AttributeDecoder) error { e.key = value(k); return nil })
						case unix.NFTA_SET_ELEM_DATA:
							el.Nested(func(d *netlink.AttributeDecoder) error { e.data = value(d); return nil })
						case unix.NFTA_SET_ELEM_EXPIRATION:
							e.expires = time.Duration(el.Uint64()) * time.Millisecond
						}
					}
					return nil
				})
				out = append(out, e)
			}
			return nil
		})
	}
	return out, ad.Err()
}

// isErrno reports whether err is (or wraps) errno.
func isErrno(err error, errno syscall.Errno) bool { return errors.Is(err, errno) }

// Package nat holds, steers and rewrites individual TCP flows with
// nftables, so that a connection migrated from one server to another keeps
// talking to the address its client dialled (DESIGN.md, "Keeping the
// client's view unchanged").
//
// # Model
//
// A [Flow] is a connection as its client sees it: client address and the
// service address it dialled. mtcp owns one table per network namespace,
// `table inet mtcp` (see [Options]). Its rules are fixed at [Open]; a flow
// costs set elements only, one hash lookup per packet whatever the number
// of flows. Each element kind lives in a set or map of its own, one per
// family, keyed by a concatenation saddr . sport . daddr . dport:
//
//	hold4/6      client . cport . service . sport         Hold (source host)
//	fwd4/6       client . cport . service . sport : addr   Forward (source host, gateway)
//	gwreply4/6   target . sport . client . cport : service addr   GatewayReply (gateway)
//	reply4/6     local . lport . client . cport : service addr . sport   ReplyFrom (target host)
//
// Chains: prerouting at priority raw (-300, before conntrack, so the
// rewrites are stateless and conntrack sees the rewritten packet) holds,
// then forwards (daddr set), then rewrites gateway replies (saddr set);
// postrouting at priority srcnat (100) rewrites the target's replies
// (saddr set). A [Batch] collects element changes and [Table.Apply] makes
// them one nftables transaction, so a switch from one Forward to another
// is atomic for packets; a batch of 10,000 Forwards takes about 60 ms
// here. The holds a batch lifts together with other changes are lifted in
// a second transaction right after the first, once the flows' new
// elements are fully in place: the packets a hold kept back meet only
// finished rules (see [Table.Apply] for why).
//
// The roles of a migration of flow F from host A to host B:
//
//	A: Apply(Hold(F))                      before the freeze
//	B: Apply(ReplyFrom(F, B's socket))     after the restore
//	A: ApplyThen(Unhold(F), Forward(F, B), Queue.Pass(F)); Queue.Release(F)   the switch
//	gateway instead of A: Forward(F, B) and GatewayReply(F, B)
//
// # Holding with NFQUEUE
//
// A hold sends the flow's packets (except those whose mark has the bit
// Options.InjectMark, as the segments repair injects have) to NFQUEUE
// Options.Queue without the bypass flag: with nobody reading the queue
// they are dropped, never delivered to the frozen socket, which would
// answer with a RST. [Queue] reads them and keeps them in the kernel;
// [Queue.Release] gives them the verdict NF_REPEAT and adds the inject
// bit to their mark (the rest of it is kept), which sends them through
// the prerouting hook again, past the hold, where they meet whatever
// follows
// it: seen here, a packet held on s1 and released after its hold was
// replaced by a Forward to s2 reached s2, and held segments released after
// Unhold reached the local socket once each, in order, with no
// retransmission by the client (about 0.2 ms from Apply(Unhold) to the end
// of Release for three segments). A switch releases them before it lifts
// the hold ([Table.ApplyThen], [Queue.Pass]): released after, they would
// be overtaken by the flow's new packets, which go straight on, and the
// receiver, seeing a gap, would have the client retransmit. A lifting of
// holds that fails is tried twice more; if it still fails, Apply's error
// wraps [ErrHoldsKept] and the holds stay: a Pass left on sends what they
// queue on at once until they time out, and [Queue.EndPass] ends it
// before the flow is held again.
//
// This kernel is built without nf_tables' queue expression
// (CONFIG_NFT_QUEUE unset) and rejects a QUEUE verdict from an immediate.
// Open then uses the xtables NFQUEUE target through nft_compat
// (iptables-nft does the same). nft(8) lists such a table with the warning
// "table inet mtcp is managed by iptables-nft, do not touch!" and, unless
// the iptables package (libxtables) is installed, shows the hold rules
// without their verdict. Where nft_queue exists, Open uses it.
//
// # Timeouts
//
// Every element times out after Options.Idle (10 minutes by default)
// without traffic: the rewrite rules refresh their element on every packet
// (dynset "update"), and [Table.Refresh] restarts it for silent flows that
// live on. Holds are not refreshed: a hold left by a crashed daemon ends
// after Options.HoldIdle. The timeout is a safety net: a
// daemon removes a flow's elements ([Batch.Remove]) when the connection
// ends, and runs [Table.Reconcile] at start. A packet that races the
// Remove of its element can re-create it through the refresh (with the
// same value): Apply looks for such elements right after its commit, and
// a goroutine once more 50 to 100 ms later, long after any packet
// evaluated across the commit is done (unless its CPU was held up that
// long in the middle of it), and removes them. Only a flow that keeps
// sending through several such removals keeps its element, until
// Options.Idle. That goroutine removes what it finds under the removed
// keys unless a later batch of the same Table added them back: another
// process that adds the same flow's element in that time (longer while
// the element keeps coming back) loses it.
//
// # Checksums
//
// Address writes ask the kernel for the checksum fix-ups that the nft
// command line adds by itself: the IPv4 header checksum, and for both
// families the TCP checksum through its pseudo-header
// (NFT_PAYLOAD_L4CSUM_PSEUDOHDR). google/nftables does not add them, and
// cannot express the IPv6 case (flags without an IP checksum), so the
// writes are encoded in this package.
//
// # Reading the table with nft(8)
//
// nft list ruleset shows the table, with two oddities besides the
// iptables-nft warning above: the refresh reads "update @fwd4 { ip saddr
// . tcp sport . ip daddr . tcp dport : ip daddr }" after the rewrite, but
// its key is the tuple loaded before the rewrite (nft prints the
// expressions it remembers for those registers); and reply maps hold
// address . port values of which only the address is written. The table
// is mtcp's: do not save and restore it with nft -f; Open rebuilds it.
//
// # Namespaces and privileges
//
// Open and OpenQueue bind their netlink sockets to the calling thread's
// network namespace (run them inside nat/netns.Do to reach another one);
// the Table and Queue can then be used from any goroutine. Both need
// CAP_NET_ADMIN in that namespace, and Linux 6.3 or later (the "destroy"
// nf_tables messages, which delete without failing on a missing element
// or table). Elsewhere than Linux, Open and OpenQueue return an error
// wrapping [ErrUnsupported].
//
// # Tests
//
// Pure tests (no privileges) cover flow checking, key encoding, batch
// semantics and packet parsing, with a fuzz target for the parser. The
// other tests need root and skip otherwise: they make throwaway namespaces
// (mtt<pid>x<hex>-name) or a testbed (tests/testbed) and use
// `nft list ruleset` as the oracle. They check that Open is idempotent,
// that Destroy removes everything and that the root namespace is never
// touched; that malformed batches change nothing; Reconcile; removal of
// expired elements; 10,000 flows in one batch (and BenchmarkApply10k);
// real TCP traffic through Forward + ReplyFrom and through gateway
// steering, IPv4 and IPv6, with checksum offload turned off so that every
// checksum is verified by its receiver (with offload on, veth delivers
// unverified packets and a broken fix-up goes unnoticed); idle refresh and
// expiry; holding with NFQUEUE (no retransmission, no duplicate, in
// order); NF_REPEAT meeting a Forward that replaced the hold; and the
// release race.
package nat

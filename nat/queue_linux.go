//go:build linux

package nat

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nfqnlMsg is an nfnetlink_queue message type
// (linux/netfilter/nfnetlink_queue.h, enum nfqnl_msg_types).
type nfqnlMsg uint8

const (
	nfqnlMsgPacket  nfqnlMsg = 0 // NFQNL_MSG_PACKET: kernel -> user
	nfqnlMsgVerdict nfqnlMsg = 1 // NFQNL_MSG_VERDICT
	nfqnlMsgConfig  nfqnlMsg = 2 // NFQNL_MSG_CONFIG
)

// nfqAttr is an nfnetlink_queue attribute
// (linux/netfilter/nfnetlink_queue.h, enum nfqnl_attr_type and
// nfqnl_attr_config).
type nfqAttr uint16

const (
	nfqaPacketHdr  nfqAttr = 1  // NFQA_PACKET_HDR: struct nfqnl_msg_packet_hdr
	nfqaVerdictHdr nfqAttr = 2  // NFQA_VERDICT_HDR: struct nfqnl_msg_verdict_hdr
	nfqaMark       nfqAttr = 3  // NFQA_MARK: the packet's new mark (big endian)
	nfqaPayload    nfqAttr = 10 // NFQA_PAYLOAD: the packet from its network header

	nfqaCfgCmd         nfqAttr = 1 // NFQA_CFG_CMD: struct nfqnl_msg_config_cmd
	nfqaCfgParams      nfqAttr = 2 // NFQA_CFG_PARAMS: struct nfqnl_msg_config_params
	nfqaCfgQueueMaxLen nfqAttr = 3 // NFQA_CFG_QUEUE_MAXLEN
	nfqaCfgMask        nfqAttr = 4 // NFQA_CFG_MASK
	nfqaCfgFlags       nfqAttr = 5 // NFQA_CFG_FLAGS
)

// nfqnlCfgCmd is a queue configuration command
// (linux/netfilter/nfnetlink_queue.h, enum nfqnl_msg_config_cmds).
type nfqnlCfgCmd uint8

const nfqnlCfgCmdBind nfqnlCfgCmd = 1 // NFQNL_CFG_CMD_BIND

const (
	// nfqnlCopyPacket copies packet data (NFQNL_COPY_PACKET,
	// linux/netfilter/nfnetlink_queue.h, enum nfqnl_config_mode).
	nfqnlCopyPacket = 2
	// nfqaCfgFGSO lets GSO packets through unsegmented (NFQA_CFG_F_GSO).
	nfqaCfgFGSO uint32 = 1 << 2
	// copyRange: an IPv6 header with a few extension headers plus the TCP
	// ports fit easily; the rest of the packet stays in the kernel.
	copyRange = 128
)

// nfVerdict is a netfilter verdict (linux/netfilter.h).
type nfVerdict uint32

const (
	// nfRepeat sends the packet through the same hook again, so it meets
	// the rules that replaced its hold (NF_REPEAT).
	nfRepeat nfVerdict = 4
)

// queueAckTimeout bounds the wait for the kernel's acknowledgement of a
// release; the kernel answers at once, so only a bug makes it expire.
const queueAckTimeout = 10 * time.Second

// Queue reads the packets that holds send to NFQUEUE and keeps them in the
// kernel until they are released. Its methods are safe for concurrent use.
//
// The kernel keeps each held packet; Queue only remembers its id and flow
// (from the first 128 bytes the kernel copies) and mark. Releasing issues
// the verdict NF_REPEAT with Options.InjectMark added to the packet's
// mark: it goes through the prerouting hook again, passes the hold,
// whether or not the hold is still there, and meets the rules after it (a
// Forward, or nothing, and then it is delivered locally).
type Queue struct {
	num    uint16
	inject uint32 // Options.InjectMark
	sock   *nlSock
	done   chan struct{} // closed when the reader exits

	mu       sync.Mutex
	held     map[Flow][]heldPacket // in arrival order
	nheld    int
	released map[Flow]uint32 // flow -> barrier seq until which its packets are repeated at once
	passing  map[Flow]bool   // flows whose packets are repeated at once until their Release (Pass)
	allUntil uint32          // barrier seq until which every packet is repeated at once (ReleaseAll, Close)
	closing  bool
	waiters  map[uint32]*waiter // barrier seq -> release waiting for it
	readErr  error
	atOnce   int // packets sent on as soon as read (released or closing)

	// testHookPacket, if set, runs in the reader for each queued packet
	// before it is handled (tests use it to stall the reader).
	testHookPacket func()
}

// heldPacket is a packet the kernel keeps for the Queue: its id, and the
// mark it had.
type heldPacket struct{ id, mark uint32 }

// waiter is a release waiting for the acknowledgement of its barrier.
type waiter struct {
	lo, hi uint32 // the seqs of its verdicts, hi the barrier
	errs   []error
	done   chan struct{}
}

// OpenQueue binds NFQUEUE number o.Queue in the calling thread's network
// namespace and starts a goroutine reading it. Only o.Queue,
// o.QueueMaxLen and o.InjectMark are used. It needs CAP_NET_ADMIN in the
// namespace; only one process (one Queue) can bind a queue number at a
// time.
func OpenQueue(o Options) (*Queue, error) {
	o, err := o.withDefaults()
	name := fmt.Sprintf("queue %d", o.Queue)
	if err != nil {
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	s, err := dialNetfilter("nfqueue")
	if err != nil {
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	q := &Queue{num: o.Queue, inject: o.InjectMark, sock: s, done: make(chan struct{}),
		held: map[Flow][]heldPacket{}, released: map[Flow]uint32{}, passing: map[Flow]bool{}, waiters: map[uint32]*waiter{}}
	if err := q.bind(o.QueueMaxLen); err != nil {
		s.close()
		return nil, &OpError{Op: "open", Table: name, Err: err}
	}
	go q.read()
	return q, nil
}

func (q *Queue) name() string { return fmt.Sprintf("queue %d", q.num) }

// bind binds the queue and configures it, then waits for the ack (the
// reader is not running yet).
func (q *Queue) bind(maxLen uint32) error {
	// A full receive buffer makes the kernel drop packets (no bypass):
	// give it room for maxLen small copies.
	if err := q.sock.setRcvbuf(int(maxLen) * 1024); err != nil {
		return fmt.Errorf("raise the receive buffer: %w", err)
	}
	params := binary.BigEndian.AppendUint32(nil, copyRange)
	params = append(params, nfqnlCopyPacket) // struct nfqnl_msg_config_params is packed: 5 bytes
	a := attrs(
		netlink.Attribute{Type: uint16(nfqaCfgCmd), Data: []byte{byte(nfqnlCfgCmdBind), 0, 0, 0}},
		netlink.Attribute{Type: uint16(nfqaCfgParams), Data: params},
		netlink.Attribute{Type: uint16(nfqaCfgQueueMaxLen), Data: be32(maxLen)},
		netlink.Attribute{Type: uint16(nfqaCfgMask), Data: be32(nfqaCfgFGSO)},
		netlink.Attribute{Type: uint16(nfqaCfgFlags), Data: be32(nfqaCfgFGSO)},
	)
	var w msgWriter
	seq := q.sock.nextSeq()
	w.add(nfMsgType(nfnlSubsysQueue, uint8(nfqnlMsgConfig)), nlmRequest|nlmAck, seq, unix.AF_UNSPEC, q.num, a)
	ctx, cancel := context.WithTimeout(context.Background(), queueAckTimeout)
	defer cancel()
	if err := q.sock.send(ctx, w.b); err != nil {
		return err
	}
	buf := make([]byte, 1<<16)
	for {
		msgs, err := q.sock.recv(ctx, buf)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.typ == nlmsgError && m.seq == seq {
				err := ackError(m)
				switch {
				case errors.Is(err, syscall.EBUSY):
					return fmt.Errorf("bind: %w: queue %d is already read by another socket (another mtcpd?)", err, q.num)
				case errors.Is(err, syscall.EPERM):
					// The kernel says EPERM both to a process without
					// CAP_NET_ADMIN and for a queue bound by another socket.
					if port := queueOwner(q.num); port != "" {
						return fmt.Errorf("bind: %w: queue %d is already read by another socket (netlink port %s; another mtcpd?)", err, q.num, port)
					}
					return fmt.Errorf("bind: %w: needs CAP_NET_ADMIN in the network namespace", err)
				case err != nil:
					return fmt.Errorf("bind: %w", err)
				}
				return nil
			}
		}
	}
}

// queueOwner returns the netlink port that has bound queue num in the
// calling thread's namespace, or "" (from
// /proc/net/netfilter/nfnetlink_queue: queue number, peer port id, ...).
func queueOwner(num uint16) string {
	b, err := os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_queue")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == strconv.Itoa(int(num)) {
			return f[1]
		}
	}
	return ""
}

// read is the reader goroutine.
func (q *Queue) read() {
	defer close(q.done)
	buf := make([]byte, 1<<16)
	for {
		msgs, err := q.sock.recv(context.Background(), buf)
		if err != nil {
			if errors.Is(err, syscall.ENOBUFS) {
				// The receive buffer overflowed: the kernel dropped
				// packets it could not hand over. Nothing held is lost.
				continue
			}
			q.mu.Lock()
			if !q.closing {
				q.readErr = err
			}
			for seq, w := range q.waiters {
				w.errs = append(w.errs, fmt.Errorf("queue reader stopped: %w", err))
				close(w.done)
				delete(q.waiters, seq)
			}
			q.mu.Unlock()
			return
		}
		for _, m := range msgs {
			switch {
			case m.typ == nlmsgError:
				q.ack(m.seq, ackError(m))
			case m.typ == nfMsgType(nfnlSubsysQueue, uint8(nfqnlMsgPacket)):
				q.packet(m.data)
			}
		}
	}
}

// ack handles an acknowledgement or error for one of our messages.
func (q *Queue) ack(seq uint32, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if errors.Is(err, syscall.ENOENT) {
		// A verdict for a packet the kernel no longer queues: it dropped
		// it (a netfilter hook of the namespace was unregistered, which
		// flushes every queue, or its device went down). Nothing is left
		// to release: not a failure of the release.
		err = nil
	}
	if err != nil {
		for _, w := range q.waiters {
			if seq >= w.lo && seq <= w.hi {
				w.errs = append(w.errs, err)
			}
		}
	}
	// Every packet queued before this message has now been read: marks
	// set up to it (by a barrier, whether or not its waiter still waits)
	// have done their job.
	for f, until := range q.released {
		if until <= seq {
			delete(q.released, f)
		}
	}
	if q.allUntil != 0 && q.allUntil <= seq {
		q.allUntil = 0
	}
	w, ok := q.waiters[seq]
	if !ok {
		return // an error for an immediate repeat, or a waiter that gave up
	}
	delete(q.waiters, seq)
	close(w.done)
}

// packet handles one queued packet.
func (q *Queue) packet(data []byte) {
	if len(data) < nfgenmsgLen {
		return
	}
	ad, err := netlink.NewAttributeDecoder(data[nfgenmsgLen:])
	if err != nil {
		return
	}
	var p heldPacket
	var haveID bool
	var payload []byte
	for ad.Next() {
		switch nfqAttr(ad.Type()) {
		case nfqaPacketHdr:
			if b := ad.Bytes(); len(b) >= 4 {
				p.id, haveID = binary.BigEndian.Uint32(b), true
			}
		case nfqaMark: // sent only when the packet has a mark
			if b := ad.Bytes(); len(b) >= 4 {
				p.mark = binary.BigEndian.Uint32(b)
			}
		case nfqaPayload:
			payload = ad.Bytes()
		}
	}
	if !haveID {
		return
	}
	f, ok := packetFlow(payload)
	q.mu.Lock()
	hook := q.testHookPacket
	q.mu.Unlock()
	if hook != nil {
		hook()
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, rel := q.released[f]; !ok || rel || q.passing[f] || q.closing || q.allUntil != 0 {
		// Released (or unreadable, which no hold rule queues): send it
		// on at once, under the lock so it cannot overtake packets of
		// its flow that a Release is re-injecting.
		var w msgWriter
		q.verdict(&w, p, nfRepeat)
		q.sock.send(context.Background(), w.b)
		q.atOnce++
		return
	}
	q.held[f] = append(q.held[f], p)
	q.nheld++
}

// verdict adds the verdict v for packet p to w. The inject bit is added
// to the packet's mark: repeated, it passes the hold that queued it. The
// rest of its mark is kept, for the rules and routes that follow.
func (q *Queue) verdict(w *msgWriter, p heldPacket, v nfVerdict) uint32 {
	seq := q.sock.nextSeq()
	hdr := binary.BigEndian.AppendUint32(nil, uint32(v))
	hdr = binary.BigEndian.AppendUint32(hdr, p.id)
	w.add(nfMsgType(nfnlSubsysQueue, uint8(nfqnlMsgVerdict)), nlmRequest, seq, unix.AF_UNSPEC, q.num,
		attrs(netlink.Attribute{Type: uint16(nfqaVerdictHdr), Data: hdr},
			netlink.Attribute{Type: uint16(nfqaMark), Data: binary.BigEndian.AppendUint32(nil, p.mark|q.inject)}))
	return seq
}

// Done is closed when the Queue's reader stops: after Close, or on a
// failure to read the queue ([Queue.Err]). A Queue whose reader stopped
// releases nothing more, and what its holds queue stays in the kernel
// until the queue fills up or the socket is closed (then the kernel drops
// it): its owner should close it and stop using its holds.
func (q *Queue) Done() <-chan struct{} { return q.done }

// Err returns why the reader stopped, or nil while it runs and after
// Close.
func (q *Queue) Err() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.readErr == nil {
		return nil
	}
	return &OpError{Op: "read", Table: q.name(), Err: q.readErr}
}

// Held returns how many packets the Queue holds.
func (q *Queue) Held() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.nheld
}

// HeldOf returns how many packets of f the Queue holds (0 for a flow it
// cannot take).
func (q *Queue) HeldOf(f Flow) int {
	n, err := f.normalize()
	if err != nil {
		return 0
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.held[n])
}

// Release sends every held packet of the flows on with the verdict
// NF_REPEAT, in the order they arrived, and returns how many. The packets
// pass the flows' holds (they get the inject mark bit), so the rules that
// follow the holds decide where they go; call it once those are the flows'
// new rules.
//
// Packets of these flows that the kernel queued before the call but the
// reader had not read yet are sent on as soon as they are read. Release
// returns once the kernel has acknowledged the verdicts. It ends a Pass.
func (q *Queue) Release(flows ...Flow) (int, error) {
	fs, err := normalizeAll(flows)
	if err != nil {
		return 0, &OpError{Op: "release", Table: q.name(), Err: err}
	}
	return q.release(fs, false, false)
}

// Pass is Release, and then sends the flows' packets that their holds
// queue on as soon as they are read, in order, until Release is called
// for the flows. A switch calls it once the flows' new rules are in but
// before their holds are lifted ([Table.ApplyThen]): the held packets go
// on ahead of the packets that arrive once the holds are gone, instead of
// being overtaken by them, which the receiver would take for losses.
func (q *Queue) Pass(flows ...Flow) (int, error) {
	fs, err := normalizeAll(flows)
	if err != nil {
		return 0, &OpError{Op: "pass", Table: q.name(), Err: err}
	}
	return q.release(fs, false, true)
}

// EndPass ends a Pass of the flows without sending anything on: the
// packets their holds queue from then on stay held until Release. A Pass
// normally ends with the Release that follows the lifting of its holds;
// call EndPass before holding again a flow whose holds could not be
// lifted ([ErrHoldsKept]), whose Pass was therefore left on.
func (q *Queue) EndPass(flows ...Flow) error {
	q.mu.Lock()
	none := len(q.passing) == 0
	q.mu.Unlock()
	if none {
		return nil // the usual case, and the cheap one for a batch
	}
	fs, err := normalizeAll(flows)
	if err != nil {
		return &OpError{Op: "end pass", Table: q.name(), Err: err}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, f := range fs {
		delete(q.passing, f)
	}
	return nil
}

func normalizeAll(flows []Flow) ([]Flow, error) {
	fs := make([]Flow, 0, len(flows))
	for _, f := range flows {
		n, err := f.normalize()
		if err != nil {
			return nil, err
		}
		fs = append(fs, n)
	}
	return fs, nil
}

// ReleaseAll sends every held packet on with NF_REPEAT, like Release for
// every flow, and returns how many.
func (q *Queue) ReleaseAll() (int, error) { return q.release(nil, true, false) }

// maxVerdictDatagram keeps each verdict datagram well inside the default
// netlink send buffer.
const maxVerdictDatagram = 32 << 10

func (q *Queue) release(flows []Flow, all, pass bool) (int, error) {
	q.mu.Lock()
	if q.readErr != nil || q.closingDone() {
		err := q.readErr
		if err == nil {
			err = ErrClosed
		}
		q.mu.Unlock()
		return 0, &OpError{Op: "release", Table: q.name(), Err: err}
	}
	w, n, err := q.releaseLocked(flows, all)
	switch {
	case all:
		clear(q.passing)
	case pass:
		for _, f := range flows {
			q.passing[f] = true
		}
	default:
		for _, f := range flows {
			delete(q.passing, f)
		}
	}
	q.mu.Unlock()
	if err != nil {
		return 0, &OpError{Op: "release", Table: q.name(), Err: err}
	}
	if err := q.wait(w); err != nil {
		return n, &OpError{Op: "release", Table: q.name(), Err: err}
	}
	return n, nil
}

// closingDone reports whether Close has run (the socket is gone).
func (q *Queue) closingDone() bool {
	select {
	case <-q.done:
		return true
	default:
		return q.closing
	}
}

// releaseLocked sends NF_REPEAT for the held packets of flows (every flow
// if all), then a barrier whose acknowledgement tells that every packet
// queued before it has been read. Until then, packets of these flows are
// repeated as soon as they are read. It returns the barrier's waiter.
func (q *Queue) releaseLocked(flows []Flow, all bool) (*waiter, int, error) {
	if all {
		flows = flows[:0]
		for f := range q.held {
			flows = append(flows, f)
		}
	}
	w := &waiter{lo: q.sock.seq.Load() + 1, done: make(chan struct{})}
	var dg msgWriter
	n := 0
	flush := func() error {
		if len(dg.b) == 0 {
			return nil
		}
		err := q.sock.send(context.Background(), dg.b)
		dg.b = dg.b[:0]
		return err
	}
	var sendErr error
	for _, f := range flows {
		for _, p := range q.held[f] {
			q.verdict(&dg, p, nfRepeat)
			n++
			if len(dg.b) >= maxVerdictDatagram {
				sendErr = errors.Join(sendErr, flush())
			}
		}
		q.nheld -= len(q.held[f])
		delete(q.held, f)
	}
	// The barrier: an empty config message for our queue, acknowledged.
	w.hi = q.sock.nextSeq()
	dg.add(nfMsgType(nfnlSubsysQueue, uint8(nfqnlMsgConfig)), nlmRequest|nlmAck, w.hi, unix.AF_UNSPEC, q.num, nil)
	for _, f := range flows {
		q.released[f] = w.hi
	}
	if all {
		q.allUntil = w.hi
	}
	q.waiters[w.hi] = w
	if err := errors.Join(sendErr, flush()); err != nil {
		delete(q.waiters, w.hi)
		return nil, n, fmt.Errorf("send verdicts: %w", err)
	}
	return w, n, nil
}

func (q *Queue) wait(w *waiter) error {
	t := time.NewTimer(queueAckTimeout)
	defer t.Stop()
	select {
	case <-w.done:
	case <-t.C:
		// Its acknowledgement lost (the socket's buffer overran): it
		// waits no more. A later barrier's acknowledgement ends the
		// releases it covered (released).
		q.mu.Lock()
		delete(q.waiters, w.hi)
		q.mu.Unlock()
		return fmt.Errorf("no acknowledgement from the kernel after %v", queueAckTimeout)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(w.errs) > 0 {
		return fmt.Errorf("verdicts: %w", errors.Join(w.errs...))
	}
	return nil
}

// Close releases every held packet (NF_REPEAT, so that nothing is silently
// lost), waits for the kernel to take them, and unbinds the queue. From
// then on, packets of flows whose hold is still installed are dropped by
// the kernel (the hold has no bypass), until the hold is removed. Close
// is idempotent.
func (q *Queue) Close() error {
	q.mu.Lock()
	if q.closing {
		q.mu.Unlock()
		<-q.done
		return nil
	}
	var errs []error
	var w *waiter
	if q.readErr == nil {
		var err error
		w, _, err = q.releaseLocked(nil, true)
		errs = append(errs, err)
	}
	q.closing = true // from now on the reader repeats whatever it reads
	q.mu.Unlock()
	if w != nil {
		errs = append(errs, q.wait(w))
	}
	errs = append(errs, q.sock.close())
	<-q.done
	if err := errors.Join(errs...); err != nil {
		return &OpError{Op: "close", Table: q.name(), Err: err}
	}
	return nil
}

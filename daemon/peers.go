package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/peer"
)

// peerConn is the control channel to one peer and what its heartbeats
// said last.
type peerConn struct {
	cfg PeerConfig

	mu       sync.Mutex
	client   *peer.Client
	status   *peer.StatusReply
	err      error
	lastSeen time.Time
	rtt      time.Duration
	// late counts the heartbeats in a row that got no answer in time.
	late int
}

// lateHeartbeats is how many heartbeats in a row may go unanswered in
// time before the connection to the peer is closed and dialled again,
// as long as no other request waits on it; stuckHeartbeats, whatever
// waits. A heartbeat shares its connection with migrations: one stuck
// behind a large transfer frame on a slow link must not close the
// connection under the transfer, but a connection to a host that died
// must go even while requests wait on it.
const (
	lateHeartbeats  = 5
	stuckHeartbeats = 3 * lateHeartbeats
)

// dropAfterHeartbeat tells whether a heartbeat that ended with err, the
// late-th in a row without an answer in time, with pending other requests
// waiting on the same connection, should close that connection: at once
// if it failed (closed, refused, garbled), but if it was only late, once
// late reaches lateHeartbeats with nothing else waiting, or
// stuckHeartbeats whatever waits.
func dropAfterHeartbeat(err error, late, pending int) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, context.DeadlineExceeded):
		return late >= lateHeartbeats && pending == 0 || late >= stuckHeartbeats
	}
	return true
}

// HeartbeatInterval is how often the daemon asks each peer for its status.
const HeartbeatInterval = time.Second

// peer returns a connected client for the named peer, dialling it if
// needed.
func (d *Daemon) peer(ctx context.Context, name string) (*peer.Client, error) {
	d.peersMu.Lock()
	pc, ok := d.peers[name]
	if !ok {
		cfg, known := d.cfg.Peer(name)
		if !known {
			d.peersMu.Unlock()
			return nil, fmt.Errorf("%q is not a peer of %s (see peers: in its configuration)", name, d.cfg.Name)
		}
		pc = &peerConn{cfg: cfg}
		d.peers[name] = pc
	}
	d.peersMu.Unlock()
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.client != nil {
		if pc.client.Err() == nil {
			return pc.client, nil
		}
		// The peer closed it (a restart): dial again rather than fail
		// the call with the old connection's end.
		pc.client = nil
	}
	c, err := peer.Dial(ctx, pc.cfg.Addr, name, d.tls)
	if err != nil {
		pc.err = err
		return nil, err
	}
	pc.client = c
	return c, nil
}

// dropPeer closes a peer's connection c after an error, so that the next
// call dials again; if another call has dialled anew meanwhile, that
// connection stays.
func (d *Daemon) dropPeer(name string, c *peer.Client, err error) {
	d.peersMu.Lock()
	pc := d.peers[name]
	d.peersMu.Unlock()
	if pc == nil {
		return
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.client != nil && pc.client == c {
		pc.client.Close()
		pc.client = nil
		pc.late = 0
	}
	pc.err = err
}

func (d *Daemon) closePeers() {
	d.peersMu.Lock()
	defer d.peersMu.Unlock()
	for _, pc := range d.peers {
		pc.mu.Lock()
		if pc.client != nil {
			pc.client.Close()
			pc.client = nil
		}
		pc.mu.Unlock()
	}
}

// heartbeats asks every peer for its status each HeartbeatInterval.
func (d *Daemon) heartbeats(ctx context.Context) {
	t := time.NewTicker(HeartbeatInterval)
	defer t.Stop()
	for {
		var wg sync.WaitGroup
		for _, p := range d.cfg.Peers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.heartbeat(ctx, p.Name)
			}()
		}
		wg.Wait()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (d *Daemon) heartbeat(ctx context.Context, name string) {
	hctx, cancel := context.WithTimeout(ctx, HeartbeatInterval)
	defer cancel()
	start := time.Now()
	c, err := d.peer(hctx, name)
	var st *peer.StatusReply
	if err == nil {
		st, err = c.Status(hctx)
	}
	d.peersMu.Lock()
	pc := d.peers[name]
	d.peersMu.Unlock()
	pc.mu.Lock()
	if err == nil {
		pc.late = 0
	} else if c != nil && errors.Is(err, context.DeadlineExceeded) {
		pc.late++
	}
	drop := c != nil && dropAfterHeartbeat(err, pc.late, c.Pending())
	pc.mu.Unlock()
	if drop {
		d.dropPeer(name, c, err)
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.err = err
	if err == nil {
		pc.status, pc.lastSeen, pc.rtt = st, time.Now(), time.Since(start)
	}
}

func (d *Daemon) peerStatus() []admin.PeerStatus {
	var out []admin.PeerStatus
	missed := time.Duration(d.peerMissed())
	for _, p := range d.cfg.Peers {
		ps := admin.PeerStatus{Name: p.Name, Addr: p.Addr}
		d.peersMu.Lock()
		pc := d.peers[p.Name]
		d.peersMu.Unlock()
		if pc != nil {
			pc.mu.Lock()
			ps.LastSeen, ps.RTT = pc.lastSeen, pc.rtt
			// Down after `missed` heartbeats without an answer, as the
			// policy counts them, not at the first one late (a drain's
			// transfers share the heartbeats' connection).
			ps.Healthy = !pc.lastSeen.IsZero() && time.Since(pc.lastSeen) < missed*HeartbeatInterval
			if pc.err != nil {
				ps.Error = pc.err.Error()
			}
			if pc.status != nil {
				ps.Load, ps.Conns = pc.status.Load, pc.status.Conns
			}
			pc.mu.Unlock()
		}
		out = append(out, ps)
	}
	return out
}

// Status answers a peer's heartbeat.
func (d *Daemon) Status(ctx context.Context, from string) (*peer.StatusReply, error) {
	r := &peer.StatusReply{Name: d.cfg.Name, Load: loadAverage(), Time: time.Now(), Figures: d.figures()}
	r.Conns = d.numConns()
	if d.apps != nil {
		r.Services = d.apps.Services()
	}
	return r, nil
}

// loadAverage is the one-minute load average (0 if unknown).
func loadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return f
}

// remoteTarget is a peer as the migrate.Target of a transaction.
type remoteTarget struct {
	d    *Daemon
	name string
	cfg  PeerConfig
	c    *peer.Client
	tx   uint64
	app  string
}

func (t *remoteTarget) Name() string { return t.name }

func (t *remoteTarget) Addr(family int) netip.Addr {
	a, _ := pickFamily(t.cfg.ServiceAddrs, family == 6)
	return a
}

func (t *remoteTarget) Prepare(ctx context.Context, n int) error {
	r, err := t.c.Prepare(ctx, &peer.PrepareRequest{TxID: t.tx, Service: t.app, Count: n})
	if err != nil {
		return err
	}
	if !r.OK {
		return fmt.Errorf("%s refused: %s", t.name, r.Reason)
	}
	return nil
}

// Transfer sends the items in as few requests as the peer's frame limit
// allows; the target collects them under the transaction's id.
func (t *remoteTarget) Transfer(ctx context.Context, items []migrate.Item) ([]error, error) {
	errs := make([]error, 0, len(items))
	req := &peer.TransferRequest{TxID: t.tx}
	empty := req.WireSize()
	size := empty // req's WireSize, kept as items go in
	send := func() error {
		if len(req.Items) == 0 {
			return nil
		}
		r, err := t.c.Transfer(ctx, req)
		if err != nil {
			return err
		}
		errs = append(errs, resultErrors(r.Results, len(req.Items))...)
		req, size = &peer.TransferRequest{TxID: t.tx}, empty
		return nil
	}
	for _, it := range items {
		pi := peer.Item{Flow: peer.FlowID{Client: it.Flow.Client, Service: it.Flow.Service},
			Service: it.App, State: it.State, App: it.Snapshot}
		if len(req.Items) > 0 && size+pi.WireSize() > t.c.MaxFrame() {
			if err := send(); err != nil {
				return nil, err
			}
		}
		req.Items = append(req.Items, pi)
		size += pi.WireSize()
	}
	if err := send(); err != nil {
		return nil, err
	}
	return errs, nil
}

func resultErrors(rs []peer.ItemResult, n int) []error {
	errs := make([]error, n)
	for i := range errs {
		switch {
		case i >= len(rs):
			errs[i] = errors.New("no result from the target")
		case !rs[i].OK:
			errs[i] = errors.New(rs[i].Error)
		}
	}
	return errs
}

// Commit reports the flows the target could not bring to life as
// migrate.FlowErrors (its results follow the restored items, in the order
// of flows).
//
// A commit whose connection to the target was lost before its answer came
// is asked for once more on a new connection: the target answers it as it
// did the first (or does it now, if the first never reached it).
func (t *remoteTarget) Commit(ctx context.Context, flows []migrate.Flow) error {
	req := &peer.CommitRequest{TxID: t.tx}
	var r *peer.CommitReply
	first := true
	err := t.again(ctx, "commit", func(c *peer.Client) (err error) {
		if first && slices.Contains(faults, "commit-drop") {
			// The connection breaks while the target commits (tests).
			time.AfterFunc(50*time.Microsecond, func() { c.Close() })
		}
		r, err = c.Commit(ctx, req)
		if first && err == nil && fault(ctx, "commit-answer") != nil {
			r, err = nil, fmt.Errorf("%w: the answer lost (%s=commit-answer-refuse)", peer.ErrClosed, FaultEnv)
		}
		first = false
		return err
	})
	if err != nil {
		return err
	}
	if len(r.Results) > len(flows) {
		return fmt.Errorf("the target answered %d results for %d flows", len(r.Results), len(flows))
	}
	fe := migrate.FlowErrors{}
	for i, err := range resultErrors(r.Results, len(flows)) {
		if err != nil {
			fe[flows[i]] = err
		}
	}
	if len(fe) > 0 {
		return fe
	}
	return nil
}

func (t *remoteTarget) Abort(ctx context.Context, flows []migrate.Flow) error {
	req := &peer.AbortRequest{TxID: t.tx, Reason: "source aborted"}
	return t.again(ctx, "abort", func(c *peer.Client) error { return c.Abort(ctx, req) })
}

// again runs call on the connection to the target and, if that connection
// was lost before the answer came, once more on a new one. A commit or an
// abort asked twice is answered as the first was (Daemon.Commit remembers
// its answers; an abort of a transfer gone is done).
func (t *remoteTarget) again(ctx context.Context, op string, call func(c *peer.Client) error) error {
	err := call(t.c)
	if !errors.Is(err, peer.ErrClosed) || ctx.Err() != nil {
		return err
	}
	t.d.dropPeer(t.name, t.c, err)
	c, derr := t.d.peer(ctx, t.name)
	if derr != nil {
		return errors.Join(err, derr)
	}
	t.d.log.Warn(op+": the connection to the target was lost, asking again", "to", t.name, "tx", t.tx, "err", err)
	t.c = c
	return call(c)
}

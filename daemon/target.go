package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
	"github.com/mtcp-dev/mtcp/repair"
)

// incoming is a transfer restored here, waiting for commit or abort.
type incoming struct {
	from    string
	started time.Time // for OrphanTimeout
	items   []*inItem
}

type inItem struct {
	flow  migrate.Flow
	app   string
	snap  []byte
	local netip.AddrPort
	r     *repair.Restored
	rw    *rewrite // the reply-source rewrite being installed for it, if any
}

// rewrite is a batch of reply-source rewrites that Transfer installs after
// its restores, answering without waiting for it. The sockets are restored
// quiet (repair.RestoreOptions.Quiet): what they acknowledge in repair
// mode is dropped, not sent from this host's own address. Commit waits
// for the rewrite before a socket leaves repair mode.
type rewrite struct {
	done chan struct{}
	err  error
}

// wait returns the rewrite's outcome once it is in (nil for no rewrite).
func (rw *rewrite) wait(ctx context.Context) error {
	if rw == nil {
		return nil
	}
	select {
	case <-rw.done:
		return rw.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// maxBlanks bounds the blank sockets kept ready per family.
const maxBlanks = 2048

// Prepare answers whether this server can take r.Count connections, and
// starts making blank sockets for them so that restoring stays off the
// frozen window. It does not wait for them: they are made while the
// source quiesces and captures, and a restore that finds none makes its
// own.
func (d *Daemon) Prepare(ctx context.Context, from string, r *peer.PrepareRequest) (*peer.PrepareReply, error) {
	if d.apps == nil {
		return &peer.PrepareReply{OK: false, Reason: d.cfg.Name + " is a gateway, not a server"}, nil
	}
	if err := fault(ctx, "prepare"); err != nil {
		return &peer.PrepareReply{OK: false, Reason: err.Error()}, nil
	}
	if r.Service != "" {
		if _, ok := d.appFor(servicePort(r.Service)); !ok {
			return &peer.PrepareReply{OK: false, Reason: fmt.Sprintf("no application registered on %s for service %s", d.cfg.Name, r.Service)}, nil
		}
	}
	for _, v6 := range []bool{false, true} {
		if _, ok := d.cfg.ServiceAddr(v6); !ok {
			continue
		}
		want := min(r.Count, maxBlanks)
		d.mu.Lock()
		running := d.blankWant[v6] > len(d.blanks[v6])
		if want > len(d.blanks[v6]) && !d.blanksClosed {
			d.blankWant[v6] = max(d.blankWant[v6], want)
			if !running {
				go d.makeBlanks(v6)
			}
		}
		d.mu.Unlock()
	}
	return &peer.PrepareReply{OK: true}, nil
}

// makeBlanks makes blank sockets of a family until there are
// d.blankWant[v6] of them. Prepare starts it; one runs per family.
func (d *Daemon) makeBlanks(v6 bool) {
	for {
		d.mu.Lock()
		if d.blanksClosed || len(d.blanks[v6]) >= d.blankWant[v6] {
			d.blankWant[v6] = 0
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		b, err := repair.NewBlank(v6)
		d.mu.Lock()
		if err != nil || d.blanksClosed {
			d.blankWant[v6] = 0
			d.mu.Unlock()
			if err != nil {
				d.log.Warn("cannot make blank sockets ahead of restores; restores make their own", "err", err)
			} else {
				b.Close()
			}
			return
		}
		d.blanks[v6] = append(d.blanks[v6], b)
		d.mu.Unlock()
	}
}

func (d *Daemon) takeBlank(v6 bool) *repair.Blank {
	d.mu.Lock()
	defer d.mu.Unlock()
	bs := d.blanks[v6]
	if len(bs) == 0 {
		return nil
	}
	b := bs[len(bs)-1]
	d.blanks[v6] = bs[:len(bs)-1]
	return b
}

// Transfer restores the items in repair mode, on this host's own service
// address, and installs the rewrite that gives their replies the address
// the client dialled (forward steering; in gateway steering the gateway
// rewrites). It answers once the sockets are restored; the rewrites go in
// meanwhile, and Commit waits for them. From the answer on the source may
// switch the flows here, and a socket in repair mode acknowledges the
// client segments that reach it: the sockets are restored quiet (marked
// for the nat table to drop what they send) until their commit, so that
// no acknowledgement leaves from this host's own address, which the
// client would answer with a RST.
func (d *Daemon) Transfer(ctx context.Context, from string, r *peer.TransferRequest) (*peer.TransferReply, error) {
	if d.apps == nil {
		return nil, fmt.Errorf("%s is a gateway, not a server", d.cfg.Name)
	}
	if err := fault(ctx, "transfer"); err != nil {
		return nil, err
	}
	in := &incoming{from: from, started: time.Now()}
	results := make([]peer.ItemResult, len(r.Items))
	var b nat.Batch
	rw := &rewrite{done: make(chan struct{})}
	for i, it := range r.Items {
		item, err := d.restoreOne(it)
		if err != nil {
			results[i] = peer.ItemResult{Error: err.Error()}
			continue
		}
		results[i] = peer.ItemResult{OK: true}
		in.items = append(in.items, item)
		if d.rewritesReplies(item.flow, item.local) {
			b.ReplyFrom(natFlow(item.flow), item.local)
			item.rw = rw
		}
	}
	if b.Len() > 0 {
		go func() {
			if err := d.nat.Apply(&b); err != nil {
				rw.err = fmt.Errorf("installing reply rewrites: %w", err)
			}
			close(rw.done)
		}()
	}
	if err := ctx.Err(); err != nil {
		// The source gave up on this transfer (and may have sent its
		// Abort already): nothing restored may stay behind.
		return nil, errors.Join(err, d.discardIncoming(in))
	}
	d.mu.Lock()
	prev, ok := d.restoring[r.TxID]
	switch {
	case ok && prev.from != from:
		d.mu.Unlock()
		d.discardIncoming(in)
		return nil, fmt.Errorf("transaction %d on %s belongs to %s, not %s", r.TxID, d.cfg.Name, prev.from, from)
	case ok:
		// A batch too large for one frame arrives in several requests.
		prev.items = append(prev.items, in.items...)
	case len(in.items) > 0:
		// Nothing restored, nothing to wait for: a Commit of this
		// transaction is refused, and no entry is left behind (the
		// source sends no Abort when the target restored nothing).
		d.restoring[r.TxID] = in
	}
	d.mu.Unlock()
	return &peer.TransferReply{Results: results}, nil
}

// checkFlow refuses a flow sent by a peer that no connection of the pool
// can have: a malformed one, a client address of this host's own kind
// (loopback, link-local, multicast), a service address no member owns.
func (d *Daemon) checkFlow(f migrate.Flow) error {
	if err := natFlow(f).Check(); err != nil {
		return err
	}
	if c := f.Client.Addr().Unmap(); c.IsLoopback() || c.IsMulticast() || c.IsLinkLocalUnicast() {
		return fmt.Errorf("flow %v: the client's address %v is not one a connection of the pool's clients can have", f, c)
	}
	if _, ok := d.owner(f.Service.Addr().Unmap()); !ok {
		return fmt.Errorf("flow %v: %v is not a service address of the pool", f, f.Service.Addr())
	}
	return nil
}

func (d *Daemon) restoreOne(it peer.Item) (*inItem, error) {
	f := migrate.Flow{Client: it.Flow.Client, Service: it.Flow.Service}
	if err := d.checkFlow(f); err != nil {
		return nil, err
	}
	if len(it.App) > app.MaxSnapshot {
		return nil, fmt.Errorf("flow %v: snapshot of %d bytes, the limit is %d", f, len(it.App), app.MaxSnapshot)
	}
	port := servicePort(it.Service)
	if port != f.Service.Port() {
		return nil, fmt.Errorf("flow %v is not one of service %s (port %d)", f, it.Service, port)
	}
	// The application here may listen on another address than the
	// source's (its own, say): the port decides, and the import goes to
	// the name it registered under.
	svc, ok := d.appFor(port)
	if !ok {
		return nil, fmt.Errorf("no application registered on %s for service %s", d.cfg.Name, it.Service)
	}
	st, err := repair.Decode(it.State)
	if err != nil {
		return nil, err
	}
	if unmapAP(st.Remote) != f.Client {
		return nil, fmt.Errorf("state is for client %v, not %v", st.Remote, f.Client)
	}
	v6 := f.Client.Addr().Is6()
	own, err := d.ownAddr(v6)
	if err != nil {
		return nil, err
	}
	item := &inItem{flow: f, app: svc, snap: it.App, local: netip.AddrPortFrom(own, f.Service.Port())}
	// Back here during a drain that moved it away: its old socket, kept
	// frozen until the drain ends, holds the 4-tuple.
	if err := d.takeDeferred(item.tuple()); err != nil {
		return nil, err
	}
	// A socket that needs a reply rewrite here stays quiet until it is in.
	quiet := d.rewritesReplies(f, item.local)
	if item.r, err = repair.Restore(st, repair.RestoreOptions{Local: item.local, Remote: f.Client, Blank: d.takeBlank(v6), Quiet: quiet, Injector: d.inject, Marks: d.cfg.Marks.repair()}); err != nil {
		return nil, err
	}
	return item, nil
}

// rewritesReplies reports whether this host gives the replies of flow f,
// restored here on local, the address the client dialled: with forward
// steering, when local is not that address.
func (d *Daemon) rewritesReplies(f migrate.Flow, local netip.AddrPort) bool {
	return local != f.Service && d.cfg.Steering == "forward"
}

// CommitMemory is how long a target remembers a commit's answer, for a
// source that asks again because it did not get it.
const CommitMemory = 2 * time.Minute

// commitRecord is a commit done or under way: done is closed once reply
// holds its answer.
type commitRecord struct {
	from  string
	at    time.Time
	done  chan struct{}
	reply *peer.CommitReply
}

// Commit brings a transfer's restored sockets to life and hands them to
// their applications. Asked again for the same transaction (its source
// did not get the answer), it gives the first commit's answer.
func (d *Daemon) Commit(ctx context.Context, from string, r *peer.CommitRequest) (*peer.CommitReply, error) {
	d.mu.Lock()
	if rec, ok := d.commits[r.TxID]; ok && rec.from == from {
		d.mu.Unlock()
		d.log.Info("commit asked again: answering as the first time", "from", from, "tx", r.TxID)
		select {
		case <-rec.done:
			return rec.reply, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	in, ok := d.restoring[r.TxID]
	if ok && in.from != from {
		d.mu.Unlock()
		return nil, fmt.Errorf("transaction %d on %s belongs to %s, not %s", r.TxID, d.cfg.Name, in.from, from)
	}
	delete(d.restoring, r.TxID)
	rec := &commitRecord{from: from, at: time.Now(), done: make(chan struct{})}
	if ok {
		d.commits[r.TxID] = rec
	}
	d.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no transfer %d waiting on %s", r.TxID, d.cfg.Name)
	}
	defer func() {
		if rec.reply == nil { // d.commit panicked: a retry must not wait for ever
			rec.reply = &peer.CommitReply{Results: slices.Repeat([]peer.ItemResult{{Error: "the commit failed on " + d.cfg.Name}}, len(in.items))}
		}
		close(rec.done)
	}()
	// The commit goes on if the connection it came on ends (the server
	// cancels the requests of a lost connection): the source asks again
	// on a new one and must find it done, not half done. Its deadline
	// stays.
	cctx := context.WithoutCancel(ctx)
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		cctx, cancel = context.WithDeadline(cctx, dl)
		defer cancel()
	}
	rec.reply = d.commit(cctx, in)
	return rec.reply, nil
}

// commit is Commit's work on a transfer taken from restoring.
func (d *Daemon) commit(ctx context.Context, in *incoming) *peer.CommitReply {
	results := make([]peer.ItemResult, len(in.items))
	// The sockets come to life first, all of them: from here on every
	// moment counts for the clients. Then each application takes its
	// connections in one batched import.
	files := make([]*os.File, len(in.items))
	byApp := map[string][]int{}
	for i, item := range in.items {
		f, err := commitSocket(ctx, item)
		if err != nil {
			results[i] = peer.ItemResult{Error: err.Error()}
			d.log.Error("commit failed", "flow", item.flow, "err", err)
			// Its socket is gone: the reaper, finding none, removes its
			// rules here and at its steering point.
			d.mu.Lock()
			d.moved[item.tuple()] = item.flow
			d.adopted[item.tuple()] = true
			d.movedChanged()
			d.mu.Unlock()
			continue
		}
		files[i] = f
		byApp[item.app] = append(byApp[item.app], i)
	}
	for svc, idx := range byApp {
		socks := make([]syscall.Conn, len(idx))
		snaps := make([][]byte, len(idx))
		d.mu.Lock()
		for k, i := range idx {
			socks[k], snaps[k] = app.WithTCPOptions(files[i], tcpOptions(in.items[i].r.Sockopts())), in.items[i].snap
			d.moved[in.items[i].tuple()] = in.items[i].flow
		}
		d.movedChanged()
		d.mu.Unlock()
		var errs []error
		if err := fault(ctx, "import"); err != nil {
			errs = slices.Repeat([]error{err}, len(socks))
		} else {
			errs = d.apps.ImportMany(ctx, svc, socks, snaps)
		}
		d.mu.Lock()
		for k, i := range idx {
			t := in.items[i].tuple()
			if errs[k] != nil {
				// The application did not take it, and the socket is
				// closed with nobody serving it (the client sees the
				// connection end); or it took it after ctx ended (the
				// error says so, but the connection lives on). The
				// reaper tells the two apart, as for any connection
				// taken: it removes the flow's rules once the socket
				// is gone, and keeps them while it is served.
				d.adopted[t] = true
				results[i] = peer.ItemResult{Error: errs[k].Error()}
				d.log.Error("commit failed", "flow", in.items[i].flow, "err", errs[k])
				continue
			}
			// The application reported the connection before
			// acknowledging the import, so from now on its absence from
			// apps.Conns means it ended.
			d.adopted[t] = true
			results[i] = peer.ItemResult{OK: true}
		}
		d.mu.Unlock()
	}
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
	return &peer.CommitReply{Results: results}
}

// tuple is the restored socket's own ends.
func (item *inItem) tuple() app.Tuple { return app.Tuple{Local: item.local, Remote: item.flow.Client} }

// commitSocket takes a restored socket out of repair mode, once its reply
// rewrite is in, and returns a descriptor of it for its application. If
// the rewrite failed the socket goes silently: its replies would reach
// the client from an address it never dialled.
func commitSocket(ctx context.Context, item *inItem) (*os.File, error) {
	if err := item.rw.wait(ctx); err != nil {
		return nil, errors.Join(err, item.r.Abort())
	}
	if err := fault(ctx, "commit-socket"); err != nil {
		return nil, errors.Join(err, item.r.Abort())
	}
	if err := item.r.Commit(); err != nil {
		return nil, err
	}
	return item.r.File()
}

// Abort throws a transfer's restored sockets away; they are still in
// repair mode, so the client sees nothing.
func (d *Daemon) Abort(ctx context.Context, from string, r *peer.AbortRequest) error {
	d.mu.Lock()
	in, ok := d.restoring[r.TxID]
	if ok && in.from != from {
		d.mu.Unlock()
		return fmt.Errorf("transaction %d on %s belongs to %s, not %s", r.TxID, d.cfg.Name, in.from, from)
	}
	delete(d.restoring, r.TxID)
	d.mu.Unlock()
	if !ok {
		return nil // nothing was restored, or it was already aborted
	}
	err := d.discardIncoming(in)
	d.log.Info("transfer aborted", "from", from, "tx", r.TxID, "reason", r.Reason, "flows", len(in.items))
	return err
}

// discardIncoming aborts restored sockets (still in repair mode: silent)
// and removes their reply rewrites.
func (d *Daemon) discardIncoming(in *incoming) error {
	var errs []error
	var b nat.Batch
	for _, item := range in.items {
		errs = append(errs, item.r.Abort())
		if item.rw != nil {
			// Wait for the rewrite to be in (or to have failed), or
			// removing it could come first and leave it behind.
			<-item.rw.done
			b.Remove(natFlow(item.flow))
		}
	}
	if b.Len() > 0 {
		errs = append(errs, d.nat.Apply(&b))
	}
	return errors.Join(errs...)
}

// tcpOptions are the TCP_NODELAY and keepalive settings of o, which the
// application that adopts the socket sets again (net.FileConn imposes
// Go's).
func tcpOptions(o repair.Sockopts) app.TCPOptions {
	return app.TCPOptions{NoDelay: o.NoDelay, KeepAlive: o.KeepAlive, KeepIdle: time.Duration(o.KeepIdle) * time.Second,
		KeepInterval: time.Duration(o.KeepIntvl) * time.Second, KeepCount: int(o.KeepCnt)}
}

package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/repair"
)

func (d *Daemon) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		// Lists are [] rather than null when empty (a gateway has no
		// services), for scripts reading -o json.
		s := admin.Status{Name: d.cfg.Name, Role: d.cfg.Role, Steering: d.cfg.Steering, Peers: d.peerStatus(), Services: []string{}}
		if s.Peers == nil {
			s.Peers = []admin.PeerStatus{}
		}
		s.Conns = d.numConns()
		if d.apps != nil {
			s.Services = d.apps.Services()
		}
		admin.WriteJSON(w, http.StatusOK, s)
	})
	mux.HandleFunc("GET /v1/conns", func(w http.ResponseWriter, r *http.Request) {
		admin.WriteJSON(w, http.StatusOK, d.conns(r.Context()))
	})
	mux.HandleFunc("POST /v1/migrate", func(w http.ResponseWriter, r *http.Request) {
		var req admin.MigrateRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			admin.WriteError(w, http.StatusBadRequest, fmt.Errorf("bad request: %w", err))
			return
		}
		flows, err := d.selectFlows(r.Context(), &req)
		if err != nil {
			admin.WriteError(w, http.StatusBadRequest, err)
			return
		}
		rep, err := d.Migrate(r.Context(), flows, req.To)
		if rep == nil {
			admin.WriteError(w, http.StatusBadRequest, err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, rep)
	})
	mux.HandleFunc("POST /v1/drain", d.serveDrain)
	mux.HandleFunc("POST /v1/process", d.serveProcess)
	return mux
}

// conns lists the connections served here, with their TCP figures: those
// of the applications registered here, then those of processes (see
// processConns).
func (d *Daemon) conns(ctx context.Context) []admin.Conn {
	flows := d.localFlows()
	diag := map[netip.AddrPort]repair.Conn{}
	list, err := repair.List(ctx, repair.ListOptions{})
	if err == nil {
		for _, c := range list {
			diag[c.Remote] = c
		}
	}
	out := make([]admin.Conn, 0, len(flows))
	served := make(map[app.Tuple]bool, len(flows))
	for _, lf := range flows {
		served[lf.Tuple] = true
		c := admin.Conn{Client: lf.Flow.Client.String(), Service: lf.Flow.Service.String(), Local: lf.Tuple.Local.String(), App: lf.App}
		if dc, ok := diag[lf.Flow.Client]; ok && dc.Local == lf.Tuple.Local {
			c.State, c.RTT, c.Retrans = dc.State.String(), dc.Info.RTT, dc.Info.TotalRetrans
			if err := dc.Migratable(); err != nil {
				c.Migratable = err.Error()
			}
		}
		out = append(out, c)
	}
	for _, pc := range d.processConns(ctx, list, served) {
		c := admin.Conn{Client: pc.flow.Client.String(), Service: pc.flow.Service.String(), Local: pc.local.String(),
			PID: pc.owner.PID, Command: pc.owner.Comm, State: pc.conn.State.String(), RTT: pc.conn.Info.RTT, Retrans: pc.conn.Info.TotalRetrans}
		if err := pc.conn.Migratable(); err != nil {
			c.Migratable = err.Error()
		}
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Client < out[j].Client })
	return out
}

// selectFlows resolves a migrate request's selection to flows served here.
func (d *Daemon) selectFlows(ctx context.Context, req *admin.MigrateRequest) ([]migrate.Flow, error) {
	n := 0
	for _, set := range []bool{len(req.Flows) > 0, req.Service != "", req.All} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New("give exactly one of flows, service and all")
	}
	return chooseFlows(d.localFlows(), req, func(ap netip.AddrPort) error {
		if pc, ok := d.processConnOf(ctx, ap); ok {
			return fmt.Errorf("the connection from %v is held by process %d (%s), and no application registered with mtcpd serves it: it moves only with its whole process (mtcpctl migrate --pid %d --to PEER), unless that process uses mtcp's app library and has not registered with mtcpd yet (it reconnects after mtcpd restarts)", ap, pc.owner.PID, pc.owner.Comm, pc.owner.PID)
		}
		return fmt.Errorf("no connection from %v is served here (see mtcpctl conns)", ap)
	})
}

// chooseFlows picks the flows of req (exactly one of its selections)
// among local; unknown says why a client address names none of them.
func chooseFlows(local []localFlow, req *admin.MigrateRequest, unknown func(netip.AddrPort) error) ([]migrate.Flow, error) {
	var out []migrate.Flow
	switch {
	case req.All:
		for _, lf := range local {
			out = append(out, lf.Flow)
		}
	case req.Service != "":
		// ":PORT", "PORT", or "ADDR:PORT": those dialled to ADDR only.
		svc := req.Service
		if !strings.Contains(svc, ":") {
			svc = ":" + svc
		}
		host, p, err := net.SplitHostPort(svc)
		port, perr := strconv.ParseUint(p, 10, 16)
		if err = errors.Join(err, perr); err != nil || port == 0 {
			return nil, fmt.Errorf("service %q: want :PORT or ADDR:PORT: %w", req.Service, err)
		}
		var addr netip.Addr
		if host != "" {
			a, err := netip.ParseAddr(host)
			if err != nil {
				return nil, fmt.Errorf("service %q: want :PORT or ADDR:PORT: %w", req.Service, err)
			}
			addr = a.Unmap()
		}
		for _, lf := range local {
			if lf.Flow.Service.Port() == uint16(port) && (!addr.IsValid() || lf.Flow.Service.Addr().Unmap() == addr) {
				out = append(out, lf.Flow)
			}
		}
	default:
		byClient := map[netip.AddrPort][]migrate.Flow{}
		for _, lf := range local {
			byClient[lf.Flow.Client] = append(byClient[lf.Flow.Client], lf.Flow)
		}
		for _, s := range req.Flows {
			ap, err := netip.ParseAddrPort(s)
			if err != nil {
				return nil, fmt.Errorf("flow %q: want the client's IP:PORT: %w", s, err)
			}
			fs := byClient[unmapAP(ap)]
			switch {
			case len(fs) == 0:
				return nil, unknown(unmapAP(ap))
			case len(fs) > 1:
				// One client port, several services dialled: which?
				var svcs []string
				for _, f := range fs {
					svcs = append(svcs, f.Service.String())
				}
				return nil, fmt.Errorf("the client address %v has connections to %s here, which --flow cannot tell apart", ap, strings.Join(svcs, " and "))
			}
			if !slices.Contains(out, fs[0]) { // named twice: moved once
				out = append(out, fs[0])
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no connection matches")
	}
	return out, nil
}

// Migrate moves flows served here to the peer named to and reports what
// happened. The report is nil only when the request itself is invalid.
func (d *Daemon) Migrate(ctx context.Context, flows []migrate.Flow, to string) (*admin.Report, error) {
	return d.migrate(ctx, flows, to, nil)
}

// checkTarget refuses a target that cannot take connections: this
// server, a name not in the pool, the gateway.
func (d *Daemon) checkTarget(to string) error {
	switch _, ok := d.cfg.Peer(to); {
	case to == d.cfg.Name:
		return fmt.Errorf("the connections are already on %s", to)
	case !ok:
		return fmt.Errorf("%q is not a peer of %s", to, d.cfg.Name)
	case to == d.cfg.Gateway:
		return fmt.Errorf("%s is the pool's gateway, which serves no connections", to)
	}
	return nil
}

// migrate is Migrate; a drain's later collects the frozen sockets to
// discard once it has moved everything.
func (d *Daemon) migrate(ctx context.Context, flows []migrate.Flow, to string, later *laterDiscards) (*admin.Report, error) {
	if err := d.checkTarget(to); err != nil {
		return nil, err
	}
	end, ok := d.beginMigration()
	if !ok {
		return nil, errStopping
	}
	defer end()
	cfg, _ := d.cfg.Peer(to)
	rep := &admin.Report{To: to, Moved: []string{}, Failed: map[string]string{}, Timings: map[string]time.Duration{}}
	c, err := d.peer(ctx, to)
	if err != nil {
		for _, f := range flows {
			rep.Failed[f.Client.String()] = err.Error()
		}
		rep.Aborted, rep.Error, rep.TargetFailed = true, err.Error(), len(flows)
		return rep, err
	}
	// One transaction per application service: the target checks it has
	// the application before anything is frozen.
	byApp := map[string][]migrate.Flow{}
	locate := d.locator()
	for _, f := range flows {
		_, svc, err := locate(f)
		if err != nil {
			rep.Failed[f.Client.String()] = err.Error()
			continue
		}
		byApp[svc] = append(byApp[svc], f)
	}
	var errs []error
	for svc, fs := range byApp {
		tgt := &remoteTarget{d: d, name: to, cfg: cfg, c: c, tx: d.nextTx(), app: svc}
		start := time.Now()
		mr, err := migrate.Run(ctx, fs, source{d: d, later: later}, steering{d}, tgt, migrate.Deadlines{})
		observe(mr, time.Since(start))
		if lost := lostAtSwitch(mr); len(lost) > 0 {
			// Not counted in d.txs: it tries for minutes, and a
			// stopping daemon need not wait for it (the holds expire).
			go d.keepSwitching(lost, tgt)
		}
		errs = append(errs, err)
		for _, f := range mr.Moved {
			rep.Moved = append(rep.Moved, f.Client.String())
		}
		for f, e := range mr.Failed {
			rep.Failed[f.Client.String()] = e.Error()
			if pe, ok := errors.AsType[*migrate.PhaseError](e); ok && (pe.Phase == migrate.PhasePrepare || pe.Phase == migrate.PhaseTransfer || pe.Phase == migrate.PhaseCommit) {
				rep.TargetFailed++
			}
		}
		for p, t := range mr.Timings {
			rep.Timings[string(p)] += t
		}
		rep.Aborted = rep.Aborted || mr.Aborted
		d.log.Info("migration", "to", to, "app", svc, "moved", len(mr.Moved), "failed", len(mr.Failed), "aborted", mr.Aborted,
			"commit_after_switch", mr.CommitAfterSwitch, "err", err)
	}
	err = errors.Join(errs...)
	if err != nil {
		rep.Error = err.Error()
	}
	return rep, err
}

// streamLines starts a streamed answer of JSON lines (progress) and
// returns the function that sends one line at once.
//
// A line that its client does not take within streamWriteTimeout ends the
// stream (the lines after it are dropped), so that a client that stopped
// reading (a paused pager, a stalled ssh session) does not hold up what
// sends them. The client is then taken for gone: net/http cancels the
// request's context, and a drain stops after the batches under way, as
// when its client disconnects.
func streamLines(w http.ResponseWriter) func(v any) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	return func(v any) {
		rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
		if enc.Encode(v) == nil {
			rc.Flush()
		}
	}
}

// streamWriteTimeout bounds the wait for a client to take a progress line.
var streamWriteTimeout = 30 * time.Second

// drainInFlight is how many batches of a drain migrate at once. Each
// holds its connections frozen (and their descriptors open) until it
// commits, so it bounds what a drain holds at once.
const drainInFlight = 4

// drainDeferMax bounds the given-away sockets a drain keeps open until
// its end (laterDiscards): 50,000, and at most half of this
// process's descriptor limit, which every application link, peer
// connection and migration in flight shares (20,000 on some machines: a
// drain that kept them all would starve the rest).
// Read at the first drain, not when the package is loaded.
var drainDeferMax = sync.OnceValue(func() int { return deferMax(50000) })

// deferMax is max, or half of this process's soft limit on open
// files (/proc/self/limits) if that is less.
func deferMax(max int) int {
	b, err := os.ReadFile("/proc/self/limits")
	if err != nil {
		return max
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				if n, err := strconv.Atoi(f[0]); err == nil && n/2 < max {
					return n / 2
				}
			}
		}
	}
	return max
}

// serveDrain moves everything away in batches, streaming progress lines.
func (d *Daemon) serveDrain(w http.ResponseWriter, r *http.Request) {
	var req admin.DrainRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		admin.WriteError(w, http.StatusBadRequest, fmt.Errorf("bad request: %w", err))
		return
	}
	var targets []string
	switch {
	case req.To != "" && req.Spread:
		admin.WriteError(w, http.StatusBadRequest, errors.New("give either to or spread"))
		return
	case req.To != "":
		if err := d.checkTarget(req.To); err != nil {
			admin.WriteError(w, http.StatusBadRequest, err)
			return
		}
		targets = []string{req.To}
	default:
		for _, p := range d.peerStatus() {
			if p.Healthy && p.Name != d.cfg.Gateway {
				targets = append(targets, p.Name)
			}
		}
		if len(targets) == 0 {
			admin.WriteError(w, http.StatusServiceUnavailable, errors.New("no healthy peer to drain to"))
			return
		}
	}
	batch := req.Batch
	if batch <= 0 {
		batch = 1000
	}
	var flows []migrate.Flow
	for _, lf := range d.localFlows() {
		flows = append(flows, lf.Flow)
	}
	send := streamLines(w)
	p := admin.Progress{Total: len(flows)}
	send(p)
	// Several batches are in flight at a time: while one waits on the
	// network, the target or an application, another is quiesced and
	// captured here, so that both cores stay busy (with two, a drain of
	// 10,000 connections left a fifth of the CPU time idle).
	var (
		mu    sync.Mutex
		errs  []error
		wg    sync.WaitGroup
		sem   = make(chan struct{}, drainInFlight)
		later laterDiscards // the frozen sockets to close at the end
	)
	defer d.deferDiscards(&later)()
	// Every connection is on its target and the drain has said so (or
	// the handler panicked): the frozen copies go now, inert until then.
	defer func() {
		if delay, err := faultDuration("drain-flush-delay"); err == nil && delay > 0 {
			time.Sleep(delay) // tests: connections may come back meanwhile
		}
		if err := later.flush(d); err != nil {
			d.log.Warn("drain: discarding the frozen sockets", "err", err)
		}
	}()
	for i, t := 0, 0; i < len(flows); i, t = i+batch, t+1 {
		part := flows[i:min(i+batch, len(flows))]
		to := targets[t%len(targets)]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			rep, err := d.migrate(r.Context(), part, to, &later)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			}
			if rep == nil {
				p.Failed += len(part)
				return
			}
			p.Done += len(rep.Moved)
			p.Failed += len(rep.Failed)
			p.Reports = append(p.Reports, *rep)
			send(admin.Progress{Total: p.Total, Done: p.Done, Failed: p.Failed})
		}()
	}
	wg.Wait()
	p.Final = true
	if err := errors.Join(errs...); err != nil {
		p.Error = err.Error()
	}
	send(p)
}

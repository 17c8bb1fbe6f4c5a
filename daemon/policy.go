package daemon

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/policy"
	"github.com/mtcp-dev/mtcp/repair"
)

// policyState is the daemon's policy engine and the measurements it
// feeds it. Without a policy file the measurements still run: peers ask
// for this server's load in their heartbeats.
type policyState struct {
	cfg    *Config
	path   string
	log    *slog.Logger
	engine *policy.Engine // nil without a policy file
	sample *loadSampler

	tried   [32]byte // the last file content tried
	seen    [32]byte // the content at the last look, for a change to settle
	readErr string   // the last error reading the file, logged once

	// arrived is when each migrated-in connection was first seen here.
	arrived map[app.Tuple]time.Time
	// nextDecide is when the policy's interval is next due.
	nextDecide time.Time
	// pathsAt is when the connections' TCP figures were last read.
	pathsAt time.Time

	mu    sync.Mutex // guards what Status reads
	load  policy.Load
	paths map[netip.Prefix]time.Duration
	// missed is the policy's peers.missed (0 without a policy): how
	// many heartbeats a peer may miss and still be up.
	missed int
}

// peerMissed is how many heartbeats in a row a peer may miss before it
// counts as down: the policy's peers.missed, or its default.
func (d *Daemon) peerMissed() int {
	if d.pol != nil {
		d.pol.mu.Lock()
		defer d.pol.mu.Unlock()
		if d.pol.missed > 0 {
			return d.pol.missed
		}
	}
	return policy.DefaultMissed
}

// Figure names in peer.StatusReply.Figures.
const (
	figureRTTPrefix = "rtt:" // + client network: median RTT in seconds
)

type reloadKey struct{}

// WithReload returns a context that tells Run to reload its policy file
// whenever ch delivers (mtcpd passes SIGHUP).
func WithReload(ctx context.Context, ch <-chan os.Signal) context.Context {
	return context.WithValue(ctx, reloadKey{}, ch)
}

// newPolicyState loads the policy file, if the configuration names one.
func newPolicyState(cfg *Config, log *slog.Logger) (*policyState, error) {
	ps := &policyState{cfg: cfg, path: cfg.Policy, log: log.With("part", "policy"), sample: newLoadSampler(cfg.Load.Scope), arrived: map[app.Tuple]time.Time{}}
	if ps.path == "" {
		return ps, nil
	}
	b, err := os.ReadFile(ps.path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	pol, err := policy.Parse(b)
	if err == nil {
		err = cfg.CheckPolicy(pol)
	}
	if err != nil {
		policyReloads.WithLabelValues("start", "error").Inc()
		return nil, fmt.Errorf("policy %s: %w", ps.path, err)
	}
	ps.tried = sha256.Sum256(b)
	ps.engine = policy.NewEngine(pol)
	ps.missed = pol.Peers.Missed
	policyReloads.WithLabelValues("start", "ok").Inc()
	policyOK.Set(1)
	ps.log.Info("policy loaded", "file", ps.path, "rules", len(pol.Rules), "interval", pol.Interval.D(), "dry_run", pol.DryRun)
	return ps, nil
}

// reload reads the policy file again; force re-parses an unchanged file
// (SIGHUP). Without force, a changed file is taken once it reads the same
// at two looks in a row. A file that does not parse leaves the running policy in
// place; the error is logged, with its line numbers, and shows in the
// metrics (mtcp_policy_reload_ok 0).
func (ps *policyState) reload(cause string, force bool) {
	b, err := os.ReadFile(ps.path)
	if err != nil {
		if err.Error() != ps.readErr || force {
			ps.readErr = err.Error()
			ps.log.Error("policy reload failed: the running policy stays", "file", ps.path, "cause", cause, "err", err)
			policyReloads.WithLabelValues(cause, "error").Inc()
			policyOK.Set(0)
		}
		return
	}
	// A file that comes back after a failed read is read as a change,
	// even with the same content: the metric said it failed.
	readFailed := ps.readErr != ""
	ps.readErr = ""
	sum := sha256.Sum256(b)
	settled := sum == ps.seen
	ps.seen = sum
	switch {
	case force:
	case sum == ps.tried:
		if !readFailed {
			return
		}
	case !settled:
		// Changed since the last look: maybe half written by an editor
		// that rewrites in place, and a part may parse (without its
		// limits, say). Taken once it reads the same a tick later.
		return
	}
	ps.tried = sum
	pol, err := policy.Parse(b)
	if err == nil {
		err = ps.cfg.CheckPolicy(pol)
	}
	if err != nil {
		ps.log.Error("policy reload failed: the running policy stays", "file", ps.path, "cause", cause, "err", strings.ReplaceAll(err.Error(), "\n", "; "))
		policyReloads.WithLabelValues(cause, "error").Inc()
		policyOK.Set(0)
		return
	}
	ps.engine.SetPolicy(pol)
	// Due now: the next decision waits for the new interval, not for
	// what is left of the old one (10 minutes cut to a second, say).
	// The engine keeps the cooldowns and the timing of the conditions.
	ps.nextDecide = time.Time{}
	ps.mu.Lock()
	ps.missed = pol.Peers.Missed
	ps.mu.Unlock()
	policyReloads.WithLabelValues(cause, "ok").Inc()
	policyOK.Set(1)
	ps.log.Info("policy reloaded", "file", ps.path, "cause", cause, "rules", len(pol.Rules), "interval", pol.Interval.D(), "dry_run", pol.DryRun)
}

// measureInterval is how often load is measured without a policy, and
// at most how long a policy file change goes unnoticed.
const measureInterval = time.Second

// pathsInterval is how often the path costs are measured without a
// policy (see policyTick).
const pathsInterval = 5 * time.Second

// runPolicy measures load and, with a policy file, runs the engine and
// carries out its decisions, until ctx is done.
func (d *Daemon) runPolicy(ctx context.Context) {
	ps := d.pol
	hup, _ := ctx.Value(reloadKey{}).(<-chan os.Signal)
	tick := measureInterval
	if ps.engine != nil {
		tick = min(tick, ps.engine.Policy().Interval.D())
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	// A decision's moves run beside this loop, so that measuring (the
	// figures the peers read), reloads and SIGHUP go on while they wait
	// on a slow target or a large process's checkpoint; the engine
	// decides again only once they have ended. moving is non-nil while
	// they run.
	var moving chan []moveOutcome
	defer func() {
		if moving != nil {
			d.settle(<-moving) // ctx is done: they are giving up
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case outs := <-moving:
			moving = nil
			policyMoving.Set(0)
			d.settle(outs)
			continue
		case <-hup:
			if d.tlsFiles != nil {
				d.tlsFiles.reload("sighup", true)
			}
			if ps.engine != nil {
				ps.reload("sighup", true)
			} else {
				ps.log.Info("SIGHUP: no policy file is configured (policy: in the configuration)")
			}
		case <-t.C:
		}
		if d.tlsFiles != nil {
			d.tlsFiles.reload("change", false)
		}
		if ps.engine != nil {
			ps.reload("change", false)
			if iv := min(measureInterval, ps.engine.Policy().Interval.D()); iv != tick {
				tick = iv
				t.Reset(tick)
			}
		}
		decs := d.policyTick(ctx, moving != nil)
		if n := moves(decs); n > 0 {
			ch := make(chan []moveOutcome, 1)
			moving = ch
			policyMoving.Set(float64(n))
			go func() { ch <- d.carryOutAll(ctx, decs) }()
		} else if len(decs) > 0 {
			d.settle(d.carryOutAll(ctx, decs)) // logged and counted, at once
		}
	}
}

// moves counts the connections that decs move (dry runs move none).
func moves(decs []policy.Decision) int {
	n := 0
	for _, dec := range decs {
		if dec.DryRun {
			continue
		}
		for _, m := range dec.Moves {
			n += len(m.Conns)
		}
	}
	return n
}

// moveOutcome is how a decision's moves went, for the engine
// (policy.Engine.Done): when they ended, how many connections failed by
// target, and the targets that failed all of theirs on their side.
type moveOutcome struct {
	dec     policy.Decision
	at      time.Time
	failed  map[string]int
	refused map[string]bool
}

// carryOutAll carries out decs in order.
func (d *Daemon) carryOutAll(ctx context.Context, decs []policy.Decision) []moveOutcome {
	var outs []moveOutcome
	for _, dec := range decs {
		if failed, refused := d.carryOut(ctx, dec); len(failed) > 0 {
			outs = append(outs, moveOutcome{dec, time.Now(), failed, refused})
		}
	}
	return outs
}

// settle tells the engine how its decisions' moves went; only the policy
// loop calls it, as it does everything else of the engine's.
func (d *Daemon) settle(outs []moveOutcome) {
	for _, o := range outs {
		d.pol.engine.Done(o.dec, o.at, o.failed, o.refused)
	}
}

// policyTick measures and, when the policy's interval is due and no
// earlier decision's moves are under way (busy), decides: it returns the
// decisions to carry out.
func (d *Daemon) policyTick(ctx context.Context, busy bool) []policy.Decision {
	ps := d.pol
	now := time.Now()
	load, err := ps.sample.sample(now)
	if err != nil {
		ps.log.Debug("load measurement incomplete", "err", err)
	}
	// The connections' TCP figures come from one sock_diag dump of every
	// socket, which costs tens of milliseconds with ten thousand
	// connections: without a policy they only feed the path costs, which
	// are medians and change slowly, so they are refreshed every
	// pathsInterval; with a policy, on every tick as before.
	var conns []policy.Conn
	ps.mu.Lock()
	paths := ps.paths
	ps.mu.Unlock()
	if ps.engine != nil || ps.pathsAt.IsZero() || now.Sub(ps.pathsAt) >= pathsInterval {
		conns = d.policyConns(ctx, now)
		load.Conns = len(conns)
		paths = medianPaths(conns)
		ps.pathsAt = now
	} else {
		load.Conns = d.numConns()
	}
	ps.mu.Lock()
	ps.load, ps.paths = load, paths
	ps.mu.Unlock()
	connsOwned.Set(float64(load.Conns))
	heldPackets.Set(float64(d.q.Held()))
	for _, m := range []string{policy.MetricCPU, policy.MetricRunQueue, policy.MetricMemory, policy.MetricMemoryPressure} {
		loadGauge.WithLabelValues(m).Set(load.Metric(m))
	}
	if ps.engine == nil || now.Before(ps.nextDecide) {
		return nil
	}
	s := policy.Snapshot{Now: now, Heartbeat: HeartbeatInterval, Conns: conns,
		Self:  policy.Server{Name: d.cfg.Name, Load: load, Paths: paths, Services: d.services()},
		Peers: d.policyPeers()}
	var decs []policy.Decision
	if busy {
		// Due, and decided at the first tick after the moves end; the
		// peers' health is followed meanwhile.
		ps.log.Debug("policy decision deferred: the last decision's moves are under way")
		decs = ps.engine.PeerHealth(s)
	} else {
		ps.nextDecide = now.Add(ps.engine.Policy().Interval.D() - 10*time.Millisecond)
		decs = d.decide(ps.engine, s)
	}
	for _, p := range s.Peers {
		up := 0.0
		if ps.engine.PeerUp(p.Name) {
			up = 1
		}
		peerUp.WithLabelValues(p.Name).Set(up)
	}
	return decs
}

// decide runs the engine's decision. A bug in it costs that decision, not
// the daemon with the migrations and holds it has in flight.
func (d *Daemon) decide(e *policy.Engine, s policy.Snapshot) (decs []policy.Decision) {
	defer func() {
		if r := recover(); r != nil {
			d.log.Error("policy decision failed: nothing decided this time", "panic", r, "stack", string(debug.Stack()))
			decs = nil
		}
	}()
	return e.Decide(s)
}

func (d *Daemon) services() []string {
	if d.apps == nil {
		return nil
	}
	return d.apps.Services()
}

// carryOut acts on a decision, then logs it and counts it: one log line
// per decision, saying why. It returns how many connections failed to
// move, by target, and the targets that failed all of theirs on their
// side (see policy.Engine.Done).
func (d *Daemon) carryOut(ctx context.Context, dec policy.Decision) (failedTo map[string]int, refused map[string]bool) {
	log := d.pol.log
	dry := strconv.FormatBool(dec.DryRun)
	policyDecisions.WithLabelValues(dec.Rule, dec.Reason, dry).Inc()
	if dec.Rule == "" { // a peer event
		lvl := slog.LevelInfo
		if dec.Reason == policy.ReasonPeerDown {
			lvl = slog.LevelWarn
		}
		log.Log(ctx, lvl, "policy decision", "peer", dec.Peer, "reason", dec.Reason, "detail", dec.Detail)
		return
	}
	attrs := []any{"rule", dec.Rule, "reason", dec.Reason, "trigger", dec.Trigger, "dry_run", dec.DryRun}
	if dec.Reason != policy.ReasonTriggered {
		lvl := slog.LevelInfo
		if dec.Reason == policy.ReasonNotTriggered {
			lvl = slog.LevelDebug
		}
		log.Log(ctx, lvl, "policy decision", append(attrs, "detail", dec.Detail)...)
		return
	}
	moved, failed := 0, 0
	var plan []string
	for _, m := range dec.Moves {
		plan = append(plan, fmt.Sprintf("%s:%d", m.To, len(m.Conns)))
		if dec.DryRun {
			policyMigrations.WithLabelValues(dec.Rule, dec.Trigger, "dry_run").Add(float64(len(m.Conns)))
			continue
		}
		flows := make([]migrate.Flow, len(m.Conns))
		for i, c := range m.Conns {
			flows[i] = migrate.Flow{Client: c.Client, Service: c.Service}
		}
		mctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		rep, err := d.Migrate(mctx, flows, m.To)
		cancel()
		policyMoving.Sub(float64(len(flows)))
		n, f := 0, len(flows)
		if rep != nil {
			n, f = len(rep.Moved), len(flows)-len(rep.Moved)
		}
		moved, failed = moved+n, failed+f
		if f > 0 {
			if failedTo == nil {
				failedTo, refused = map[string]int{}, map[string]bool{}
			}
			failedTo[m.To] += f
			if rep == nil || rep.TargetFailed == f {
				refused[m.To] = true
			}
		}
		policyMigrations.WithLabelValues(dec.Rule, dec.Trigger, "moved").Add(float64(n))
		policyMigrations.WithLabelValues(dec.Rule, dec.Trigger, "failed").Add(float64(f))
		if err != nil {
			attrs = append(attrs, "err_"+m.To, err)
		}
	}
	attrs = append(attrs, "moves", strings.Join(plan, ","))
	if !dec.DryRun {
		attrs = append(attrs, "moved", moved, "failed", failed)
	}
	log.Info("policy decision", append(attrs, "detail", dec.Detail)...)
	return failedTo, refused
}

// policyConns lists the connections served here with their TCP figures
// and, for those that migrated in, when they arrived.
func (d *Daemon) policyConns(ctx context.Context, now time.Time) []policy.Conn {
	flows := d.localFlows()
	if len(flows) == 0 {
		clear(d.pol.arrived)
		return nil
	}
	type pair struct{ l, r netip.AddrPort }
	diag := map[pair]repair.TCPInfo{}
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	list, err := repair.List(lctx, repair.ListOptions{})
	cancel()
	if err != nil {
		d.pol.log.Debug("listing sockets for their TCP figures failed", "err", err)
	}
	for _, c := range list {
		diag[pair{unmapAP(c.Local), unmapAP(c.Remote)}] = c.Info
	}
	d.mu.Lock()
	seen := make(map[app.Tuple]bool, len(flows))
	for _, lf := range flows {
		if _, in := d.moved[lf.Tuple]; in {
			seen[lf.Tuple] = true
			if _, ok := d.pol.arrived[lf.Tuple]; !ok {
				d.pol.arrived[lf.Tuple] = now
			}
		}
	}
	d.mu.Unlock()
	for t := range d.pol.arrived {
		if !seen[t] {
			delete(d.pol.arrived, t)
		}
	}
	out := make([]policy.Conn, 0, len(flows))
	for _, lf := range flows {
		info, ok := diag[pair{unmapAP(lf.Tuple.Local), unmapAP(lf.Tuple.Remote)}]
		out = append(out, policy.Conn{Client: lf.Flow.Client, Service: lf.Flow.Service, App: lf.App,
			RTT: info.RTT, TotalRetrans: info.TotalRetrans, DeliveryRate: info.DeliveryRate, NoInfo: !ok,
			Arrived: d.pol.arrived[lf.Tuple]})
	}
	return out
}

// medianPaths is the median RTT of the connections from each client
// network: this server's path costs, which its peers use for path_cost.
func medianPaths(conns []policy.Conn) map[netip.Prefix]time.Duration {
	by := map[netip.Prefix][]time.Duration{}
	for _, c := range conns {
		if c.RTT > 0 {
			p := policy.ClientPrefix(c.Client.Addr())
			by[p] = append(by[p], c.RTT)
		}
	}
	// Heartbeats carry these every second: keep the networks with the
	// most connections.
	pfxs := make([]netip.Prefix, 0, len(by))
	for p := range by {
		pfxs = append(pfxs, p)
	}
	sort.Slice(pfxs, func(i, j int) bool {
		if len(by[pfxs[i]]) != len(by[pfxs[j]]) {
			return len(by[pfxs[i]]) > len(by[pfxs[j]])
		}
		return pfxs[i].Addr().Less(pfxs[j].Addr())
	})
	out := make(map[netip.Prefix]time.Duration, min(len(pfxs), maxPaths))
	for _, p := range pfxs[:min(len(pfxs), maxPaths)] {
		rtts := by[p]
		slices.Sort(rtts)
		out[p] = rtts[len(rtts)/2]
	}
	return out
}

// maxPaths bounds the client networks a server reports to its peers.
const maxPaths = 256

// figures is this server's load and path costs for its peers
// (peer.StatusReply.Figures).
func (d *Daemon) figures() map[string]float64 {
	if d.pol == nil {
		return nil
	}
	d.pol.mu.Lock()
	defer d.pol.mu.Unlock()
	l := d.pol.load
	f := map[string]float64{
		policy.MetricCPU: l.CPU, policy.MetricRunQueue: l.RunQueue,
		policy.MetricMemory: l.Memory, policy.MetricMemoryPressure: l.MemoryPressure,
	}
	for p, rtt := range d.pol.paths {
		f[figureRTTPrefix+p.String()] = rtt.Seconds()
	}
	return f
}

// policyPeers is the pool as the last heartbeats described it (the
// gateway is not a target and is left out).
func (d *Daemon) policyPeers() []policy.Peer {
	var out []policy.Peer
	for _, pcfg := range d.cfg.Peers {
		if len(pcfg.ServiceAddrs) == 0 || pcfg.Name == d.cfg.Gateway {
			continue
		}
		p := policy.Peer{Server: policy.Server{Name: pcfg.Name}}
		d.peersMu.Lock()
		pc := d.peers[pcfg.Name]
		d.peersMu.Unlock()
		if pc != nil {
			pc.mu.Lock()
			p.LastSeen = pc.lastSeen
			if st := pc.status; st != nil {
				p.Load = loadOf(st.Figures)
				p.Load.Conns = st.Conns
				p.Services = slices.Clone(st.Services)
				p.Paths = pathsOf(st.Figures)
			}
			pc.mu.Unlock()
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func loadOf(f map[string]float64) policy.Load {
	return policy.Load{CPU: f[policy.MetricCPU], RunQueue: f[policy.MetricRunQueue],
		Memory: f[policy.MetricMemory], MemoryPressure: f[policy.MetricMemoryPressure]}
}

func pathsOf(f map[string]float64) map[netip.Prefix]time.Duration {
	out := map[netip.Prefix]time.Duration{}
	for k, v := range f {
		if s, ok := strings.CutPrefix(k, figureRTTPrefix); ok {
			if p, err := netip.ParsePrefix(s); err == nil && v >= 0 {
				out[p] = time.Duration(v * float64(time.Second))
			}
		}
	}
	return out
}

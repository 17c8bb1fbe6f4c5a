package policy

import (
	"fmt"
	"maps"
	"math"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Load is a server's load, as its daemon measured it.
type Load struct {
	CPU            float64 // busy share of all CPUs, 0 to 1
	RunQueue       float64 // runnable tasks
	Memory         float64 // share of memory in use, 0 to 1
	MemoryPressure float64 // share of time stalled on memory (PSI some avg10), 0 to 1
	Conns          int     // connections served
}

// Metric returns the load figure named by one of the Metric constants
// (0 for an unknown name).
func (l Load) Metric(name string) float64 {
	switch name {
	case MetricCPU:
		return l.CPU
	case MetricRunQueue:
		return l.RunQueue
	case MetricMemory:
		return l.Memory
	case MetricMemoryPressure:
		return l.MemoryPressure
	case MetricConns:
		return float64(l.Conns)
	}
	return 0
}

// Server is a member of the pool as the engine sees it.
type Server struct {
	// Name is its name in the pool.
	Name string
	// Load is its latest measured load.
	Load Load
	// Services are the application services with a live application
	// there, e.g. ":7000": only those can receive connections.
	Services []string
	// Paths are its measured round-trip times to client networks (see
	// ClientPrefix): the costs of path_cost.
	Paths map[netip.Prefix]time.Duration
}

// Peer is another member of the pool.
type Peer struct {
	Server
	// LastSeen is when it last answered a heartbeat; zero if never.
	LastSeen time.Time
}

// Conn is a connection served here.
type Conn struct {
	Client  netip.AddrPort // the client's end
	Service netip.AddrPort // the address the client dialled
	App     string         // the application service serving it, e.g. ":7000"

	RTT          time.Duration // smoothed RTT (TCP_INFO)
	TotalRetrans uint32        // segments retransmitted so far (TCP_INFO)
	DeliveryRate uint64        // latest delivery rate, bytes per second (TCP_INFO)
	// NoInfo says that its TCP figures could not be read this time (the
	// listing of sockets failed, or missed it): the three above are not
	// zeros measured, and path conditions leave the connection alone.
	NoInfo bool

	// Arrived is when the connection migrated in; zero if it began here.
	Arrived time.Time
}

func (c Conn) key() connKey { return connKey{c.Client, c.Service} }

// Snapshot is everything the engine decides on. The caller measures it;
// the engine reads no clock and makes no system call.
type Snapshot struct {
	// Now is the time of the snapshot.
	Now time.Time
	// Heartbeat is the interval at which peers are asked for their
	// status: a peer is down after Policy.Peers.Missed of them.
	Heartbeat time.Duration
	// Self is this server.
	Self Server
	// Peers are the other members (not the gateway).
	Peers []Peer
	// Conns are the connections served here.
	Conns []Conn
}

// Reasons of a Decision: the label of the decision metrics.
const (
	ReasonTriggered     = "triggered"       // the rule acts (or would, in dry run)
	ReasonNotTriggered  = "not_triggered"   // the trigger does not hold
	ReasonPending       = "pending"         // the trigger holds, but not yet for its "for"
	ReasonCooldown      = "cooldown"        // the rule acted less than its cooldown ago
	ReasonRateLimit     = "rate_limit"      // the engine moved its limits.rate already
	ReasonNoTarget      = "no_target"       // no peer qualifies (down, maintenance, no application, hysteresis)
	ReasonNothingToMove = "nothing_to_move" // triggered, but no connection may move
	ReasonPeerDown      = "peer_down"       // a peer missed its heartbeats
	ReasonPeerUp        = "peer_up"         // a peer answers its heartbeats (again)
)

// Decision is one thing the engine decided, with why.
type Decision struct {
	Time time.Time
	// Rule is the rule's name; empty for peer events.
	Rule string
	// Peer is the peer of a peer event.
	Peer string
	// Reason is one of the Reason constants.
	Reason string
	// Trigger names the conditions that fired ("cpu", "rtt,retransmits",
	// "maintenance"); empty when nothing fired.
	Trigger string
	// Detail says why, for people: the measured values and the choice of
	// targets.
	Detail string
	// Moves are the connections to move, by target. Empty unless Reason
	// is ReasonTriggered.
	Moves []Move
	// DryRun: the decision is only logged and counted.
	DryRun bool
}

// Move is a batch of connections for one target.
type Move struct {
	To    string
	Conns []Conn
}

// Count is the number of connections the decision moves.
func (d *Decision) Count() int {
	n := 0
	for _, m := range d.Moves {
		n += len(m.Conns)
	}
	return n
}

// Engine decides, at every interval, what to move where. It keeps the
// state that makes decisions stable: when each trigger began to hold
// (for "for" and hysteresis), when each rule last acted (cooldown), what
// the engine moved recently (rate limit), which peers are up. It is not
// safe for concurrent use.
type Engine struct {
	pol    *Policy
	start  time.Time
	rules  map[string]*ruleState
	peerUp map[string]bool
	moved  []stamp
	conns  map[connKey]*connState
	// refused are targets that took none of a move, until when they
	// are avoided (Done).
	refused map[string]time.Time
}

type ruleState struct {
	lastAct time.Time
	conds   map[string]*condState
}

type condState struct {
	// active: the value is past its level, since since; fired: for
	// that long at least (the hysteresis's clear level applies only
	// then).
	active, fired bool
	since         time.Time
}

type stamp struct {
	at   time.Time
	rule string
	n    int
}

// RefusedBackoff is how long the engine's decisions avoid a target that
// failed every connection a decision sent it, on its side (unreachable,
// or refusing them: Done's refused): other peers are chosen meanwhile.
const RefusedBackoff = 30 * time.Second

// Done tells the engine, at time at, what became of a triggered decision
// it made: failed[TO] connections of the move to TO did not move, and
// refused[TO] says that TO failed all of them on its side. The failed
// connections are given back to the rate limit, and a target that
// refused is avoided for RefusedBackoff from at. (Connections that failed
// here, an application that would not give one up, say, are no reason
// to avoid the target.) Call it before the next Decide.
func (e *Engine) Done(d Decision, at time.Time, failed map[string]int, refused map[string]bool) {
	if d.DryRun {
		return
	}
	n := 0
	for _, m := range d.Moves {
		n += min(failed[m.To], len(m.Conns))
		if refused[m.To] {
			if e.refused == nil {
				e.refused = map[string]time.Time{}
			}
			e.refused[m.To] = at.Add(RefusedBackoff)
		}
	}
	for i := range e.moved {
		if st := &e.moved[i]; st.at.Equal(d.Time) && st.rule == d.Rule {
			st.n = max(0, st.n-n)
			break
		}
	}
}

type connKey struct{ client, service netip.AddrPort }

type connState struct {
	retrans   uint32
	retransAt time.Time
	rate      float64
	conds     map[string]*condState // by rule name + "/" + condition
}

// NewEngine returns an engine running pol (which Parse or Validate
// checked).
func NewEngine(pol *Policy) *Engine {
	return &Engine{pol: pol, rules: map[string]*ruleState{}, peerUp: map[string]bool{}, conns: map[connKey]*connState{}}
}

// Policy returns the policy the engine runs.
func (e *Engine) Policy() *Policy { return e.pol }

// SetPolicy replaces the policy. A rule keeps its state (cooldown,
// trigger timing) across the change when its name stays the same, so a
// reload never makes a rule act early.
func (e *Engine) SetPolicy(pol *Policy) {
	was := map[string]*Rule{}
	for i := range e.pol.Rules {
		was[e.pol.Rules[i].Name] = &e.pol.Rules[i]
	}
	keep := map[string]*ruleState{}
	for i := range pol.Rules {
		r := &pol.Rules[i]
		st, ok := e.rules[r.Name]
		if !ok {
			continue
		}
		if old := was[r.Name]; old == nil || !reflect.DeepEqual(old.When, r.When) {
			// New levels or durations: the conditions start afresh
			// (the cooldown stays), so that a condition that was only
			// pending, or fired at other levels, waits its full "for"
			// at the new ones.
			st.conds = map[string]*condState{}
			for _, c := range e.conns {
				maps.DeleteFunc(c.conds, func(k string, _ *condState) bool { return strings.HasPrefix(k, r.Name+"/") })
			}
		}
		keep[r.Name] = st
	}
	e.pol, e.rules = pol, keep
}

// PeerUp reports whether the engine considers the named peer up.
func (e *Engine) PeerUp(name string) bool { return e.peerUp[name] }

// Decide returns the decisions for snapshot s: peer events first, then
// one decision per rule, in the policy's order. A connection is moved by
// at most one rule per snapshot. The engine assumes that triggered,
// non-dry-run decisions are carried out (their cooldowns and the rate
// limit start now).
func (e *Engine) Decide(s Snapshot) []Decision {
	if e.start.IsZero() {
		e.start = s.Now
	}
	out := e.peerHealth(s)
	e.measure(s)
	v := &view{s: s, taken: map[connKey]bool{}, conns: map[string]int{}, self: s.Self.Load.Conns}
	for _, p := range s.Peers {
		v.conns[p.Name] = p.Load.Conns
	}
	// Dry-run decisions see what earlier dry-run decisions would have
	// done, on a copy: real ones never see them.
	dry := &view{s: s, taken: map[connKey]bool{}, conns: maps.Clone(v.conns), self: v.self}
	for i := range e.pol.Rules {
		r := &e.pol.Rules[i]
		// A dry-run rule decides as if the earlier dry-run rules had
		// acted too; it changes nothing a rule that acts sees. (Its
		// moves do not count against the rate limit: they move
		// nothing.)
		rv := v
		if e.pol.DryRun || r.DryRun {
			rv = dry
		}
		d := e.rule(r, rv)
		if !d.DryRun {
			// What it moves is gone for the dry-run rules too.
			dry.apply(d)
		}
		out = append(out, d)
	}
	cut := s.Now.Add(-e.pol.Limits.Per.D())
	e.moved = slices.DeleteFunc(e.moved, func(st stamp) bool { return !st.at.After(cut) })
	maps.DeleteFunc(e.refused, func(_ string, until time.Time) bool { return !s.Now.Before(until) })
	return out
}

// view is one snapshot being decided: what earlier rules took.
type view struct {
	s     Snapshot
	taken map[connKey]bool
	conns map[string]int // peers' connections, counting this snapshot's moves
	self  int            // this server's connections, counting them too
}

// apply counts the moves of decision d in the view: its connections are
// taken, and counted at their targets rather than here. It returns how
// many connections d moves.
func (v *view) apply(d Decision) int {
	total := 0
	for _, m := range d.Moves {
		for _, c := range m.Conns {
			v.taken[c.key()] = true
		}
		v.conns[m.To] += len(m.Conns)
		total += len(m.Conns)
	}
	v.self -= total
	return total
}

// PeerHealth returns the peer events of s alone (peer_up, peer_down), as
// Decide would begin with, for a server that does not decide now (its
// last decision's moves are still under way). The next Decide does not
// repeat them.
func (e *Engine) PeerHealth(s Snapshot) []Decision {
	if e.start.IsZero() {
		e.start = s.Now
	}
	return e.peerHealth(s)
}

func (e *Engine) peerHealth(s Snapshot) []Decision {
	var out []Decision
	hb := s.Heartbeat
	if hb <= 0 {
		hb = time.Second
	}
	limit := time.Duration(e.pol.Peers.Missed) * hb
	for _, p := range s.Peers {
		up := !p.LastSeen.IsZero() && s.Now.Sub(p.LastSeen) <= limit
		was, known := e.peerUp[p.Name]
		if !up && !known && s.Now.Sub(e.start) <= limit {
			continue // not heard from yet, still within its grace
		}
		if known && was == up {
			continue
		}
		e.peerUp[p.Name] = up
		d := Decision{Time: s.Now, Peer: p.Name, Reason: ReasonPeerUp, Trigger: "heartbeat"}
		switch {
		case up:
			d.Detail = fmt.Sprintf("%s answered a heartbeat %v ago", p.Name, max(s.Now.Sub(p.LastSeen), 0).Round(time.Millisecond))
		case p.LastSeen.IsZero():
			d.Reason = ReasonPeerDown
			d.Detail = fmt.Sprintf("%s never answered a heartbeat in %v (%d missed at %v)", p.Name, s.Now.Sub(e.start).Round(time.Millisecond), e.pol.Peers.Missed, hb)
		default:
			d.Reason = ReasonPeerDown
			d.Detail = fmt.Sprintf("%s last answered a heartbeat %v ago (%d missed at %v)", p.Name, s.Now.Sub(p.LastSeen).Round(time.Millisecond), e.pol.Peers.Missed, hb)
		}
		out = append(out, d)
	}
	return out
}

// measure updates per-connection rates and forgets connections gone.
func (e *Engine) measure(s Snapshot) {
	seen := map[connKey]bool{}
	for _, c := range s.Conns {
		k := c.key()
		seen[k] = true
		st := e.conns[k]
		if st == nil {
			st = &connState{conds: map[string]*condState{}}
			e.conns[k] = st
		}
		switch {
		case c.NoInfo:
			// Not a reading: the rate stays, and so does its base.
			continue
		case st.retransAt.IsZero():
			st.retrans, st.retransAt = c.TotalRetrans, s.Now
			continue
		}
		if dt := s.Now.Sub(st.retransAt).Seconds(); dt > 0 {
			st.rate = 0
			if c.TotalRetrans > st.retrans {
				st.rate = float64(c.TotalRetrans-st.retrans) / dt
			}
			st.retrans, st.retransAt = c.TotalRetrans, s.Now
		}
	}
	for k := range e.conns {
		if !seen[k] {
			delete(e.conns, k)
		}
	}
}

// eval applies a threshold with its hysteresis and "for" to value v.
func (t *Threshold) eval(st *condState, v float64, now time.Time) (holds, pending bool) {
	var over bool
	if t.Above != nil {
		level := float64(*t.Above)
		if st.fired && t.Clear != nil {
			level = float64(*t.Clear)
		}
		over = v > level
	} else {
		level := float64(*t.Below)
		if st.fired && t.Clear != nil {
			level = float64(*t.Clear)
		}
		over = v < level
	}
	if !over {
		*st = condState{}
		return false, false
	}
	if !st.active {
		st.active, st.since = true, now
	}
	if now.Sub(st.since) < t.For.D() {
		return false, true
	}
	st.fired = true
	return true, false
}

// describe renders a threshold test for the logs.
func (t *Threshold) describe(name string, v float64, holds, pending bool) string {
	verb, level := "above", t.Above
	if level == nil {
		verb, level = "below", t.Below
	}
	s := fmt.Sprintf("%s %s", name, fmtValue(name, v))
	beyond := (t.Above != nil && v > float64(*level)) || (t.Below != nil && v < float64(*level))
	switch {
	case holds && !beyond:
		// Held by the hysteresis: the value is back, but not past clear.
		s += fmt.Sprintf(" not yet back %s %s (fired %s %s)", map[bool]string{true: "below", false: "above"}[t.Above != nil],
			fmtValue(name, float64(*t.Clear)), verb, fmtValue(name, float64(*level)))
	case holds:
		s += fmt.Sprintf(" %s %s", verb, fmtValue(name, float64(*level)))
		if t.For > 0 {
			s += fmt.Sprintf(" for %v", t.For.D())
		}
	case pending:
		s += fmt.Sprintf(" %s %s, not yet for %v", verb, fmtValue(name, float64(*level)), t.For.D())
	default:
		s += fmt.Sprintf(" not %s %s", verb, fmtValue(name, float64(*level)))
	}
	return s
}

func fmtValue(name string, v float64) string {
	switch name {
	case "rtt":
		return time.Duration(v * float64(time.Second)).Round(10 * time.Microsecond).String()
	case "conns":
		return strconv.FormatFloat(v, 'f', -1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

type serverCond struct {
	name string
	t    *Threshold
	v    float64
}

type pathCond struct {
	name string
	t    *Threshold
	get  func(c Conn, st *connState) float64
	// worse orders two values: the worse first.
	worse func(a, b float64) bool
}

func (r *Rule) pathConds() []pathCond {
	var out []pathCond
	w := &r.When
	if w.RTT != nil {
		out = append(out, pathCond{"rtt", w.RTT, func(c Conn, _ *connState) float64 { return c.RTT.Seconds() }, nil})
	}
	if w.Retransmits != nil {
		out = append(out, pathCond{"retransmits", w.Retransmits, func(_ Conn, st *connState) float64 { return st.rate }, nil})
	}
	if w.DeliveryRate != nil {
		out = append(out, pathCond{"delivery_rate", w.DeliveryRate, func(c Conn, _ *connState) float64 { return float64(c.DeliveryRate) }, nil})
	}
	for i := range out {
		if out[i].t.Above != nil {
			out[i].worse = func(a, b float64) bool { return a > b }
		} else {
			out[i].worse = func(a, b float64) bool { return a < b }
		}
	}
	return out
}

// hasLoadCondition reports whether the rule fires on this server's load:
// then it only moves connections to less loaded peers.
func (r *Rule) hasLoadCondition() bool {
	w := &r.When
	return w.CPU != nil || w.RunQueue != nil || w.Memory != nil || w.MemoryPressure != nil || w.Conns != nil
}

func (r *Rule) loadThreshold(metric string) *Threshold {
	w := &r.When
	switch metric {
	case MetricCPU:
		return w.CPU
	case MetricRunQueue:
		return w.RunQueue
	case MetricMemory:
		return w.Memory
	case MetricMemoryPressure:
		return w.MemoryPressure
	case MetricConns:
		return w.Conns
	}
	return nil
}

// servesPort reports whether an application service ("ADDR:PORT" or
// ":PORT") listens on port.
func servesPort(services []string, port uint16) bool {
	for _, s := range services {
		i := strings.LastIndexByte(s, ':')
		if p, err := strconv.ParseUint(s[i+1:], 10, 16); err == nil && uint16(p) == port {
			return true
		}
	}
	return false
}

func appPort(app string) uint16 {
	i := strings.LastIndexByte(app, ':')
	p, _ := strconv.ParseUint(app[i+1:], 10, 16)
	return uint16(p)
}

func (e *Engine) rule(r *Rule, v *view) Decision {
	s := v.s
	d := Decision{Time: s.Now, Rule: r.Name, DryRun: e.pol.DryRun || r.DryRun}
	rs := e.rules[r.Name]
	if rs == nil {
		rs = &ruleState{conds: map[string]*condState{}}
		e.rules[r.Name] = rs
	}
	cond := func(name string) *condState {
		if rs.conds[name] == nil {
			rs.conds[name] = &condState{}
		}
		return rs.conds[name]
	}
	var mine []Conn
	for _, c := range s.Conns {
		if r.addr.IsValid() && c.Service.Addr().Unmap() != r.addr {
			continue // dialled another address
		}
		if r.port == 0 || appPort(c.App) == r.port || c.Service.Port() == r.port {
			mine = append(mine, c)
		}
	}
	conns := len(s.Conns)
	if r.port != 0 {
		conns = len(mine)
	}

	// Server conditions: every one is evaluated at every snapshot, so
	// that its timing and hysteresis stay current.
	ok, pending := true, false
	var fired, why []string
	w := &r.When
	for _, sc := range []serverCond{
		{"cpu", w.CPU, s.Self.Load.CPU}, {"run_queue", w.RunQueue, s.Self.Load.RunQueue},
		{"memory", w.Memory, s.Self.Load.Memory}, {"memory_pressure", w.MemoryPressure, s.Self.Load.MemoryPressure},
		{"conns", w.Conns, float64(conns)},
	} {
		if sc.t == nil {
			continue
		}
		holds, pend := sc.t.eval(cond(sc.name), sc.v, s.Now)
		why = append(why, sc.t.describe(sc.name, sc.v, holds, pend))
		if holds {
			fired = append(fired, sc.name)
		} else {
			ok, pending = false, pending || pend
		}
	}
	if w.Maintenance {
		if e.pol.inMaintenance(s.Self.Name) {
			fired = append(fired, "maintenance")
			why = append(why, s.Self.Name+" is under maintenance")
		} else {
			ok = false
			why = append(why, s.Self.Name+" is not under maintenance")
		}
	}
	if len(w.During) > 0 {
		in := false
		for i := range w.During {
			in = in || w.During[i].contains(s.Now, e.pol.loc)
		}
		if in {
			fired = append(fired, "during")
			why = append(why, "inside its time window")
		} else {
			ok = false
			why = append(why, "outside its time windows")
		}
	}

	// Path conditions select the connections; their state is kept per
	// connection.
	pcs := r.pathConds()
	var matched []Conn
	worst := map[connKey]float64{}
	connPending := 0
	for _, c := range mine {
		if len(pcs) > 0 && c.NoInfo {
			continue // no figures to judge it by, this time
		}
		st := e.conns[c.key()]
		all, anyPending := true, false
		for i, pc := range pcs {
			cs := st.conds[r.Name+"/"+pc.name]
			if cs == nil {
				cs = &condState{}
				st.conds[r.Name+"/"+pc.name] = cs
			}
			val := pc.get(c, st)
			holds, pend := pc.t.eval(cs, val, s.Now)
			if i == 0 {
				worst[c.key()] = val
			}
			all = all && holds
			anyPending = anyPending || pend
		}
		if all {
			matched = append(matched, c)
		} else if anyPending {
			connPending++
		}
	}
	if len(pcs) > 0 {
		names := make([]string, len(pcs))
		for i, pc := range pcs {
			names[i] = pc.name
		}
		switch {
		case len(matched) > 0:
			fired = append(fired, names...)
			why = append(why, fmt.Sprintf("%d of %d connections match %s", len(matched), len(mine), describePath(pcs, matched, e.conns)))
		case connPending > 0:
			ok, pending = false, true
			why = append(why, fmt.Sprintf("%d connections match %s, not yet for long enough", connPending, strings.Join(names, ",")))
		default:
			ok = false
			why = append(why, fmt.Sprintf("no connection matches %s", strings.Join(names, ",")))
		}
	} else {
		matched = mine
	}
	d.Trigger = strings.Join(fired, ",")
	if !ok {
		d.Reason = ReasonNotTriggered
		if pending {
			d.Reason = ReasonPending
		}
		d.Detail = strings.Join(why, "; ")
		return d
	}

	// Which connections may move.
	cc := e.pol.Limits.ConnCooldown.D()
	var cands []Conn
	recent, busy := 0, 0
	for _, c := range matched {
		switch {
		case v.taken[c.key()]:
			busy++
		case !c.Arrived.IsZero() && s.Now.Sub(c.Arrived) < cc:
			recent++
		default:
			cands = append(cands, c)
		}
	}
	if len(cands) == 0 {
		d.Reason = ReasonNothingToMove
		d.Detail = strings.Join(why, "; ") + fmt.Sprintf("; no connection may move (%d of %d, %d arrived less than %v ago, %d taken by an earlier rule)", len(matched), len(mine), recent, cc, busy)
		return d
	}
	if !rs.lastAct.IsZero() && s.Now.Sub(rs.lastAct) < r.Cooldown.D() {
		d.Reason = ReasonCooldown
		d.Detail = strings.Join(why, "; ") + fmt.Sprintf("; acted %v ago, cooldown %v", s.Now.Sub(rs.lastAct).Round(time.Millisecond), r.Cooldown.D())
		return d
	}
	n := len(cands)
	switch a := &r.Migrate; {
	case a.Count > 0:
		n = min(n, a.Count)
	case a.Fraction != nil:
		// Rounded up: a fraction of a few connections moves at least one.
		n = min(n, max(1, int(math.Ceil(*a.Fraction*float64(len(cands))-1e-9))))
	}
	if lim := e.pol.Limits.Rate; lim > 0 {
		used := 0
		cut := s.Now.Add(-e.pol.Limits.Per.D())
		for _, st := range e.moved {
			if st.at.After(cut) {
				used += st.n
			}
		}
		if used >= lim {
			d.Reason = ReasonRateLimit
			d.Detail = strings.Join(why, "; ") + fmt.Sprintf("; %d connections moved in the last %v, the limit is %d", used, e.pol.Limits.Per.D(), lim)
			return d
		}
		if n > lim-used {
			n = lim - used
			why = append(why, fmt.Sprintf("rate limit leaves %d", n))
		}
	}
	// The worst connections first; otherwise a stable order.
	slices.SortStableFunc(cands, func(a, b Conn) int {
		if len(pcs) > 0 {
			wa, wb := worst[a.key()], worst[b.key()]
			if pcs[0].worse(wa, wb) {
				return -1
			}
			if pcs[0].worse(wb, wa) {
				return 1
			}
		}
		if c := a.Client.Compare(b.Client); c != 0 {
			return c
		}
		return a.Service.Compare(b.Service)
	})
	moves, choice := e.targets(r, v, cands, n)
	if len(moves) == 0 {
		d.Reason = ReasonNoTarget
		d.Detail = strings.Join(why, "; ") + "; " + choice
		return d
	}
	d.Reason, d.Moves = ReasonTriggered, moves
	d.Detail = strings.Join(why, "; ") + "; " + choice
	rs.lastAct = s.Now
	total := v.apply(d)
	if !d.DryRun {
		e.moved = append(e.moved, stamp{s.Now, r.Name, total})
	}
	return d
}

func describePath(pcs []pathCond, matched []Conn, states map[connKey]*connState) string {
	var parts []string
	for _, pc := range pcs {
		worst := math.NaN()
		for _, c := range matched {
			v := pc.get(c, states[c.key()])
			if math.IsNaN(worst) || pc.worse(v, worst) {
				worst = v
			}
		}
		verb, level := "above", pc.t.Above
		if level == nil {
			verb, level = "below", pc.t.Below
		}
		parts = append(parts, fmt.Sprintf("%s %s %s (worst %s)", pc.name, verb, fmtValue(pc.name, float64(*level)), fmtValue(pc.name, worst)))
	}
	return strings.Join(parts, ", ")
}

package policy

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// eligible returns the peers that may receive connections of app port
// port (0: any port of the candidates), with why the others may not.
func (e *Engine) eligible(r *Rule, v *view, port uint16) ([]Peer, []string) {
	var ok []Peer
	var no []string
	for _, p := range v.s.Peers {
		switch {
		case len(r.Migrate.Targets) > 0 && !slices.Contains(r.Migrate.Targets, p.Name):
			continue
		case p.Name == v.s.Self.Name:
			continue
		case !e.peerUp[p.Name]:
			no = append(no, p.Name+" is down")
		case e.pol.inMaintenance(p.Name):
			no = append(no, p.Name+" is under maintenance")
		case v.s.Now.Before(e.refused[p.Name]):
			no = append(no, fmt.Sprintf("%s took none of the last connections sent to it (avoided for %v more)", p.Name, e.refused[p.Name].Sub(v.s.Now).Round(time.Second)))
		case port != 0 && !servesPort(p.Services, port):
			no = append(no, fmt.Sprintf("%s has no live application on port %d", p.Name, port))
		default:
			ok = append(ok, p)
		}
	}
	return ok, no
}

// targets splits the first n candidates (the most urgent first) over the
// peers by the rule's strategy. It returns the moves and a description
// of the choice, which says why nothing moves when moves is empty.
func (e *Engine) targets(r *Rule, v *view, cands []Conn, n int) ([]Move, string) {
	if r.port != 0 {
		return e.targetsOf(r, v, r.port, cands, n)
	}
	// One application per rule decision: the first candidate's that
	// has somewhere to go (another may have no target, and must not
	// keep the others here).
	var ports []uint16
	for _, c := range cands {
		if p := appPort(c.App); !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	var why []string
	for _, port := range ports {
		of := slices.DeleteFunc(slices.Clone(cands), func(c Conn) bool { return appPort(c.App) != port })
		moves, choice := e.targetsOf(r, v, port, of, min(n, len(of)))
		if len(moves) > 0 {
			return moves, choice
		}
		if len(ports) > 1 {
			choice = fmt.Sprintf("port %d: %s", port, choice)
		}
		why = append(why, choice)
	}
	return nil, strings.Join(why, "; ")
}

// targetsOf is targets for candidates of the application on port.
func (e *Engine) targetsOf(r *Rule, v *view, port uint16, cands []Conn, n int) ([]Move, string) {
	peers, no := e.eligible(r, v, port)
	if len(peers) == 0 {
		if len(no) == 0 {
			return nil, "no peer to move to"
		}
		return nil, "no target: " + strings.Join(no, ", ")
	}
	switch r.Migrate.To {
	case PathCost:
		return pathCost(r, peers, cands, n, no)
	case Weighted:
		return weighted(r, peers, cands, n, no)
	}
	return leastLoaded(r, v, peers, cands, n, no)
}

func leastLoaded(r *Rule, v *view, peers []Peer, cands []Conn, n int, no []string) ([]Move, string) {
	by, margin := r.Migrate.By, *r.Migrate.Margin
	// A peer's connections count this snapshot's moves.
	metric := func(p Peer, m string) float64 {
		if m == MetricConns {
			return float64(v.conns[p.Name])
		}
		return p.Load.Metric(m)
	}
	load := func(p Peer) float64 { return metric(p, by) }
	src := v.s.Self.Load.Metric(by)
	if by == MetricConns {
		src = float64(v.self)
	}
	guard := r.hasLoadCondition()
	var ok []Peer
peers:
	for _, p := range peers {
		l := load(p)
		if guard && !(l < src-margin) {
			no = append(no, fmt.Sprintf("%s's %s %s is not below this server's %s by more than %s", p.Name, by, fmtValue(by, l), fmtValue(by, src), fmtValue(by, margin)))
			continue
		}
		// Never to a peer where the rule's load conditions would fire
		// (each of them, not only the one it compares by): it would
		// send the connections back.
		for _, m := range loadMetrics {
			th := r.loadThreshold(m)
			if th == nil || th.Above == nil {
				continue
			}
			quiet := float64(*th.Above)
			if th.Clear != nil {
				quiet = float64(*th.Clear)
			}
			if pl := metric(p, m); pl >= quiet {
				no = append(no, fmt.Sprintf("%s's %s %s would trigger the rule there", p.Name, m, fmtValue(m, pl)))
				continue peers
			}
		}
		ok = append(ok, p)
	}
	if len(ok) == 0 {
		return nil, "no target: " + strings.Join(no, ", ")
	}
	best := math.Inf(1)
	for _, p := range ok {
		best = min(best, load(p))
	}
	// Peers within the margin of the least loaded count as equal: the
	// one with the fewest connections wins, then the first by name.
	var pick Peer
	first := true
	for _, p := range ok {
		if load(p) > best+margin {
			continue
		}
		if first || v.conns[p.Name] < v.conns[pick.Name] || (v.conns[p.Name] == v.conns[pick.Name] && p.Name < pick.Name) {
			pick, first = p, false
		}
	}
	if guard && by == MetricConns {
		// Moving k from src to the target leaves them at src-k and
		// load+k: never make the target busier than this server.
		k := int((src - load(pick)) / 2)
		if k < 1 {
			return nil, fmt.Sprintf("no target: moving one connection to %s would leave it busier than this server", pick.Name)
		}
		n = min(n, k)
	}
	desc := fmt.Sprintf("least_loaded by %s: %s (%s %s, %d connections; here %s)", by, pick.Name, by, fmtValue(by, load(pick)), v.conns[pick.Name], fmtValue(by, src))
	if by == MetricConns {
		desc = fmt.Sprintf("least_loaded by conns: %s (%d connections; here %d)", pick.Name, v.conns[pick.Name], int(src))
	}
	if len(no) > 0 {
		desc += "; not " + strings.Join(no, ", ")
	}
	return []Move{{To: pick.Name, Conns: slices.Clone(cands[:n])}}, fmt.Sprintf("%s gets %d of %d", desc, n, len(cands))
}

func pathCost(r *Rule, peers []Peer, cands []Conn, n int, no []string) ([]Move, string) {
	margin := *r.Migrate.Margin
	by := map[string][]Conn{}
	var order, skipped []string
	for _, c := range cands {
		if n == 0 {
			break
		}
		pfx := ClientPrefix(c.Client.Addr())
		var best string
		var cost time.Duration
		for _, p := range peers {
			pc, ok := p.Paths[pfx]
			if ok && (best == "" || pc < cost) {
				best, cost = p.Name, pc
			}
		}
		switch {
		case best == "":
			skipped = append(skipped, fmt.Sprintf("%v: no peer has measured %v", c.Client, pfx))
			continue
		case float64(cost) >= float64(c.RTT)*(1-margin):
			skipped = append(skipped, fmt.Sprintf("%v: %s's %v to %v is not %.0f%% below its %v", c.Client, best, cost, pfx, margin*100, c.RTT))
			continue
		}
		if by[best] == nil {
			order = append(order, best)
		}
		by[best] = append(by[best], c)
		n--
	}
	var moves []Move
	var parts []string
	for _, t := range order {
		moves = append(moves, Move{To: t, Conns: by[t]})
		parts = append(parts, fmt.Sprintf("%s gets %d", t, len(by[t])))
	}
	desc := "path_cost: " + strings.Join(parts, ", ")
	if len(moves) == 0 {
		desc = "no target by path_cost"
	}
	if len(skipped) > 0 {
		const show = 3
		if len(skipped) > show {
			skipped = append(skipped[:show], fmt.Sprintf("and %d more", len(skipped)-show))
		}
		desc += "; kept " + strings.Join(skipped, ", ")
	}
	if len(no) > 0 {
		desc += "; not " + strings.Join(no, ", ")
	}
	return moves, desc
}

// weighted splits n connections over the peers in proportion to their
// weights (largest remainder; ties to the first by name).
func weighted(r *Rule, peers []Peer, cands []Conn, n int, no []string) ([]Move, string) {
	type share struct {
		name string
		w    float64
		k    int
		rem  float64
	}
	var shares []share
	total := 0.0
	for _, p := range peers {
		w := 1.0
		if len(r.Migrate.Weights) > 0 {
			w = r.Migrate.Weights[p.Name]
		}
		if w > 0 {
			shares = append(shares, share{name: p.Name, w: w})
			total += w
		} else {
			no = append(no, p.Name+" has weight 0")
		}
	}
	if len(shares) == 0 {
		return nil, "no target: " + strings.Join(no, ", ")
	}
	slices.SortFunc(shares, func(a, b share) int { return strings.Compare(a.name, b.name) })
	left := n
	for i := range shares {
		exact := float64(n) * shares[i].w / total
		shares[i].k = int(math.Floor(exact))
		shares[i].rem = exact - float64(shares[i].k)
		left -= shares[i].k
	}
	idx := make([]int, len(shares))
	for i := range idx {
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int {
		switch {
		case shares[a].rem > shares[b].rem:
			return -1
		case shares[a].rem < shares[b].rem:
			return 1
		}
		return 0
	})
	for i := 0; left > 0; i, left = i+1, left-1 {
		shares[idx[i%len(idx)]].k++
	}
	var moves []Move
	var parts []string
	at := 0
	for _, sh := range shares {
		if sh.k == 0 {
			continue
		}
		moves = append(moves, Move{To: sh.name, Conns: slices.Clone(cands[at : at+sh.k])})
		at += sh.k
		parts = append(parts, fmt.Sprintf("%s (weight %g) gets %d", sh.name, sh.w, sh.k))
	}
	desc := "weighted: " + strings.Join(parts, ", ")
	if len(no) > 0 {
		desc += "; not " + strings.Join(no, ", ")
	}
	return moves, desc
}

package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)

func mustParse(t *testing.T, s string) *Policy {
	t.Helper()
	pol, err := Parse([]byte(s))
	if err != nil {
		t.Fatalf("policy: %v\n%s", err, s)
	}
	return pol
}

// conns makes n connections from 10.77.1.2 (IPv4) to :7000, ports from
// base.
func conns(n, base int) []Conn {
	out := make([]Conn, n)
	for i := range out {
		out[i] = Conn{
			Client:  netip.AddrPortFrom(netip.MustParseAddr("10.77.1.2"), uint16(base+i)),
			Service: netip.MustParseAddrPort("10.77.2.11:7000"), App: ":7000",
			RTT: time.Millisecond,
		}
	}
	return out
}

func peer(name string, l Load, at time.Time) Peer {
	return Peer{Server: Server{Name: name, Load: l, Services: []string{":7000"}}, LastSeen: at}
}

// snap is a pool of s1 (self), s2, s3, all up at now.
func snap(now time.Time, self Load, s2, s3 Load, cs []Conn) Snapshot {
	self.Conns = len(cs)
	return Snapshot{Now: now, Heartbeat: time.Second, Self: Server{Name: "s1", Load: self, Services: []string{":7000"}},
		Peers: []Peer{peer("s2", s2, now), peer("s3", s3, now)}, Conns: cs}
}

// ruleDecision returns the decision of the named rule.
func ruleDecision(t *testing.T, ds []Decision, rule string) Decision {
	t.Helper()
	for _, d := range ds {
		if d.Rule == rule {
			return d
		}
	}
	t.Fatalf("no decision for rule %s in %+v", rule, ds)
	return Decision{}
}

func moves(d Decision) string {
	var parts []string
	for _, m := range d.Moves {
		parts = append(parts, fmt.Sprintf("%s:%d", m.To, len(m.Conns)))
	}
	return strings.Join(parts, ",")
}

// TestCPURule walks one rule through time: "for", then acting, cooldown,
// acting again, and the hysteresis of clear.
func TestCPURule(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: hot
    service: ":7000"
    when: {cpu: {above: 0.5, clear: 0.3, for: 2s}}
    migrate: {fraction: 0.5, to: least_loaded, by: cpu, margin: 0.1}
    cooldown: 5s
`)
	e := NewEngine(pol)
	idle := Load{CPU: 0.05}
	cs := conns(8, 1000)
	for i, step := range []struct {
		at         time.Duration
		cpu        float64
		n          int // connections here
		wantReason string
		wantMoves  string
	}{
		{0, 0.2, 8, ReasonNotTriggered, ""},
		// Pending, the value must stay above 0.5: clear applies once
		// fired, not before.
		{1 * time.Second, 0.7, 8, ReasonPending, ""},
		{2 * time.Second, 0.45, 8, ReasonNotTriggered, ""},
		{3 * time.Second, 0.45, 8, ReasonNotTriggered, ""},
		{4 * time.Second, 0.7, 8, ReasonPending, ""},
		{6 * time.Second, 0.7, 8, ReasonTriggered, "s2:4"},
		{7 * time.Second, 0.7, 4, ReasonCooldown, ""},
		{10 * time.Second, 0.45, 4, ReasonCooldown, ""}, // below 0.5 but above clear: still fired
		{11 * time.Second, 0.45, 4, ReasonTriggered, "s2:2"},
		{12 * time.Second, 0.25, 2, ReasonNotTriggered, ""}, // below clear
		{17 * time.Second, 0.45, 2, ReasonNotTriggered, ""}, // must cross 0.5 again
	} {
		ds := e.Decide(snap(t0.Add(step.at), Load{CPU: step.cpu}, idle, Load{CPU: 0.08}, cs[:step.n]))
		d := ruleDecision(t, ds, "hot")
		if d.Reason != step.wantReason || moves(d) != step.wantMoves {
			t.Fatalf("step %d (t+%v, cpu %.2f): %s %q (%s), want %s %q", i, step.at, step.cpu, d.Reason, moves(d), d.Detail, step.wantReason, step.wantMoves)
		}
		if d.Reason == ReasonTriggered && !strings.Contains(d.Detail, "least_loaded by cpu: s2") {
			t.Errorf("step %d: detail %q does not say why s2", i, d.Detail)
		}
	}
}

// TestFractionRoundsUp: a fraction too small for one connection of those
// matching still moves one, as the README says ("rounded up"), rather
// than none with the rule's cooldown started.
func TestFractionRoundsUp(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: tiny
    when: {conns: {above: 0}}
    migrate: {to: weighted, fraction: 1e-12}
`)
	d := ruleDecision(t, NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, conns(10, 1000))), "tiny")
	if d.Reason != ReasonTriggered || d.Count() != 1 {
		t.Fatalf("%s, %d moved (%s), want 1", d.Reason, d.Count(), d.Detail)
	}
}

// TestServiceAddress: a rule for ADDR:PORT counts and moves only the
// connections whose clients dialled ADDR, not those of the same port on
// another address.
func TestServiceAddress(t *testing.T) {
	cs := conns(6, 1000)
	for i := range cs[:4] {
		cs[i].Service = netip.MustParseAddrPort("[fd77:2::11]:7000")
	}
	for svc, want := range map[string]int{"\"[fd77:2::11]:7000\"": 4, "\"10.77.2.11:7000\"": 2, "\":7000\"": 6} {
		pol := mustParse(t, fmt.Sprintf(`
rules:
  - name: r
    service: %s
    when: {conns: {above: 0}}
    migrate: {to: weighted, fraction: 1}
`, svc))
		d := ruleDecision(t, NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, cs)), "r")
		if d.Count() != want {
			t.Errorf("service %s: %d moved (%s), want %d", svc, d.Count(), d.Detail, want)
		}
	}
}

func TestLeastLoadedChoice(t *testing.T) {
	rule := `
rules:
  - name: hot
    when: {cpu: {above: 0.5}}
    migrate: {count: 3, by: cpu, margin: 0.1}
`
	for _, tc := range []struct {
		name     string
		self     float64
		peers    []Peer
		maint    string
		want     string // moves
		wantNo   string // in the detail when nothing moves
		wantDesc string
	}{
		{name: "lowest wins", self: 0.9, peers: []Peer{peer("s2", Load{CPU: 0.3}, t0), peer("s3", Load{CPU: 0.1}, t0)}, want: "s3:3"},
		{name: "within margin, fewer conns wins", self: 0.9,
			peers: []Peer{peer("s2", Load{CPU: 0.10, Conns: 9}, t0), peer("s3", Load{CPU: 0.15, Conns: 2}, t0)}, want: "s3:3"},
		{name: "peer down", self: 0.9, peers: []Peer{peer("s2", Load{CPU: 0.1}, t0.Add(-time.Minute)), peer("s3", Load{CPU: 0.3}, t0)}, want: "s3:3"},
		{name: "maintenance", self: 0.9, maint: "s3", peers: []Peer{peer("s2", Load{CPU: 0.3}, t0), peer("s3", Load{CPU: 0.1}, t0)}, want: "s2:3"},
		{name: "no application", self: 0.9, peers: []Peer{{Server: Server{Name: "s2", Load: Load{CPU: 0.1}}, LastSeen: t0}}, wantNo: "s2 has no live application on port 7000"},
		{name: "target would trigger", self: 0.95, peers: []Peer{peer("s2", Load{CPU: 0.6}, t0)}, wantNo: "would trigger the rule there"},
		{name: "not less loaded by the margin", self: 0.55, peers: []Peer{peer("s2", Load{CPU: 0.48}, t0)}, wantNo: "s2's cpu 0.48 is not below this server's 0.55 by more than 0.10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pol := mustParse(t, rule)
			if tc.maint != "" {
				pol.Maintenance = []string{tc.maint}
			}
			e := NewEngine(pol)
			s := snap(t0, Load{CPU: tc.self}, Load{}, Load{}, conns(5, 1000))
			s.Peers = tc.peers
			// The engine learns who is up from the first snapshot.
			e.start = t0.Add(-10 * time.Second)
			d := ruleDecision(t, e.Decide(s), "hot")
			if got := moves(d); got != tc.want {
				t.Fatalf("moves %q, want %q (%s: %s)", got, tc.want, d.Reason, d.Detail)
			}
			if tc.wantNo != "" && (d.Reason != ReasonNoTarget || !strings.Contains(d.Detail, tc.wantNo)) {
				t.Fatalf("%s: %q, want no_target saying %q", d.Reason, d.Detail, tc.wantNo)
			}
		})
	}
}

// TestBalanceConverges runs two engines that each balance connection
// counts against the other, carrying out their moves: the counts even
// out and then nothing moves (no ping-pong).
func TestBalanceConverges(t *testing.T) {
	src := `
rules:
  - name: balance
    when: {conns: {above: 2}}
    migrate: {fraction: 1, by: conns}
    cooldown: 1s
limits: {conn_cooldown: 0s}
`
	engines := map[string]*Engine{"s1": NewEngine(mustParse(t, src)), "s2": NewEngine(mustParse(t, src))}
	have := map[string][]Conn{"s1": conns(15, 1000), "s2": conns(1, 2000)}
	other := map[string]string{"s1": "s2", "s2": "s1"}
	movesSeen := 0
	var lastMove time.Duration
	for i := range 40 {
		now := t0.Add(time.Duration(i) * 500 * time.Millisecond)
		for _, name := range []string{"s1", "s2"} {
			o := other[name]
			s := Snapshot{Now: now, Heartbeat: time.Second,
				Self:  Server{Name: name, Load: Load{Conns: len(have[name])}, Services: []string{":7000"}},
				Peers: []Peer{peer(o, Load{Conns: len(have[o])}, now)}, Conns: have[name]}
			for _, d := range engines[name].Decide(s) {
				for _, m := range d.Moves {
					movesSeen++
					lastMove = now.Sub(t0)
					for _, c := range m.Conns {
						have[name] = slices.DeleteFunc(have[name], func(x Conn) bool { return x == c })
						have[m.To] = append(have[m.To], c)
					}
				}
			}
		}
	}
	if a, b := len(have["s1"]), len(have["s2"]); a-b > 1 || b-a > 1 {
		t.Fatalf("not balanced: s1 %d, s2 %d", a, b)
	}
	if movesSeen > 3 || lastMove > 5*time.Second {
		t.Fatalf("%d moves, the last at t+%v: the engines kept moving", movesSeen, lastMove)
	}
}

func TestPathCost(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: slow
    when: {rtt: {above: 40ms, for: 1s}}
    migrate: {to: path_cost, margin: 0.3}
    cooldown: 1s
`)
	e := NewEngine(pol)
	v4 := netip.MustParsePrefix("10.77.1.0/24")
	v6 := netip.MustParsePrefix("fd77:1::/64")
	cs := conns(3, 1000)
	cs[0].RTT = 80 * time.Millisecond
	cs[1].RTT = 60 * time.Millisecond
	cs[2].RTT = 2 * time.Millisecond // healthy: stays
	c6 := Conn{Client: netip.MustParseAddrPort("[fd77:1::2]:5000"), Service: netip.MustParseAddrPort("[fd77:2::11]:7000"), App: ":7000", RTT: 90 * time.Millisecond}
	cs = append(cs, c6)
	mk := func(now time.Time) Snapshot {
		s := snap(now, Load{}, Load{}, Load{}, cs)
		s.Peers[0].Paths = map[netip.Prefix]time.Duration{v4: 5 * time.Millisecond, v6: 80 * time.Millisecond}
		s.Peers[1].Paths = map[netip.Prefix]time.Duration{v4: 1 * time.Millisecond}
		return s
	}
	if d := ruleDecision(t, e.Decide(mk(t0)), "slow"); d.Reason != ReasonPending {
		t.Fatalf("first look: %s (%s), want pending", d.Reason, d.Detail)
	}
	d := ruleDecision(t, e.Decide(mk(t0.Add(time.Second))), "slow")
	// The two slow IPv4 connections go to s3 (1ms); the IPv6 one stays:
	// s2's 80ms is not 30% below its 90ms.
	if d.Reason != ReasonTriggered || moves(d) != "s3:2" || d.Trigger != "rtt" {
		t.Fatalf("%s %q trigger %q (%s)", d.Reason, moves(d), d.Trigger, d.Detail)
	}
	if d.Moves[0].Conns[0].RTT != 80*time.Millisecond {
		t.Fatalf("the worst connection should go first: %+v", d.Moves[0].Conns)
	}
	if !strings.Contains(d.Detail, "[fd77:1::2]:5000: s2's 80ms") {
		t.Fatalf("detail %q does not say why the IPv6 connection stays", d.Detail)
	}
}

func TestRetransmitRate(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: lossy
    when: {retransmits: {above: 5}}
    migrate: {to: weighted}
`)
	e := NewEngine(pol)
	cs := conns(2, 1000)
	for i, step := range []struct {
		at      time.Duration
		retrans [2]uint32
		want    string
	}{
		{0, [2]uint32{100, 0}, ""},                // the first sample only sets the base
		{time.Second, [2]uint32{103, 1}, ""},      // 3/s and 1/s
		{2 * time.Second, [2]uint32{120, 2}, "1"}, // 17/s: the first one
	} {
		cs[0].TotalRetrans, cs[1].TotalRetrans = step.retrans[0], step.retrans[1]
		d := ruleDecision(t, e.Decide(snap(t0.Add(step.at), Load{}, Load{}, Load{}, cs)), "lossy")
		if got := fmt.Sprint(d.Count()); (step.want == "" && d.Count() != 0) || (step.want != "" && got != step.want) {
			t.Fatalf("step %d: moves %q (%s: %s), want %s", i, moves(d), d.Reason, d.Detail, step.want)
		}
	}
}

func TestWeighted(t *testing.T) {
	for _, tc := range []struct {
		weights string
		n       int
		want    string
	}{
		{"", 10, "s2:5,s3:5"},
		{"weights: {s2: 3, s3: 1}", 8, "s2:6,s3:2"},
		{"weights: {s2: 1, s3: 1}", 3, "s2:2,s3:1"},
		{"weights: {s2: 0, s3: 1}", 4, "s3:4"},
		{"weights: {s2: 1e307, s3: 1e307}", 4, "s2:2,s3:2"},
	} {
		t.Run(tc.weights, func(t *testing.T) {
			pol := mustParse(t, fmt.Sprintf(`
rules:
  - name: w
    when: {conns: {above: 0}}
    migrate: {to: weighted, count: %d, %s}
`, tc.n, tc.weights))
			d := ruleDecision(t, NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, conns(20, 1000))), "w")
			if moves(d) != tc.want {
				t.Fatalf("moves %q, want %q (%s)", moves(d), tc.want, d.Detail)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	t.Run("rate limit", func(t *testing.T) {
		pol := mustParse(t, `
limits: {rate: 5, per: 10s}
rules:
  - name: drain
    when: {maintenance: true}
    migrate: {count: 3, to: weighted}
    cooldown: 1s
maintenance: [s1]
`)
		e := NewEngine(pol)
		cs := conns(20, 1000)
		var got []string
		for i := range 6 {
			d := ruleDecision(t, e.Decide(snap(t0.Add(time.Duration(i)*2*time.Second), Load{}, Load{}, Load{}, cs)), "drain")
			got = append(got, fmt.Sprintf("%s:%d", d.Reason, d.Count()))
			for _, m := range d.Moves {
				for _, c := range m.Conns {
					cs = slices.DeleteFunc(cs, func(x Conn) bool { return x == c })
				}
			}
		}
		// 3 at t0, 2 at t+2s (5 in 10s), then nothing until the first
		// batch leaves the window at t+10s.
		want := "triggered:3 triggered:2 rate_limit:0 rate_limit:0 rate_limit:0 triggered:3"
		if strings.Join(got, " ") != want {
			t.Fatalf("got %s, want %s", strings.Join(got, " "), want)
		}
	})
	t.Run("connection cooldown", func(t *testing.T) {
		pol := mustParse(t, `
limits: {conn_cooldown: 30s}
rules:
  - name: drain
    when: {maintenance: true}
maintenance: [s1]
`)
		cs := conns(4, 1000)
		cs[0].Arrived = t0.Add(-10 * time.Second)
		cs[1].Arrived = t0.Add(-40 * time.Second)
		d := ruleDecision(t, NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, cs)), "drain")
		if d.Count() != 3 {
			t.Fatalf("moves %q, want the 3 that did not arrive in the last 30s (%s)", moves(d), d.Detail)
		}
		cs = cs[:1]
		d = ruleDecision(t, NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, cs)), "drain")
		if d.Reason != ReasonNothingToMove || !strings.Contains(d.Detail, "1 arrived less than 30s ago") {
			t.Fatalf("%s: %s", d.Reason, d.Detail)
		}
	})
	t.Run("dry run", func(t *testing.T) {
		pol := mustParse(t, `
dry_run: true
limits: {rate: 2}
rules:
  - name: drain
    when: {maintenance: true}
    cooldown: 0s
maintenance: [s1]
`)
		e := NewEngine(pol)
		for i := range 3 {
			d := ruleDecision(t, e.Decide(snap(t0.Add(time.Duration(i)*time.Second), Load{}, Load{}, Load{}, conns(4, 1000))), "drain")
			// A dry run moves nothing, so it never uses up the rate.
			if !d.DryRun || d.Reason != ReasonTriggered || d.Count() != 2 {
				t.Fatalf("decision %d: dry %v %s %d (%s)", i, d.DryRun, d.Reason, d.Count(), d.Detail)
			}
		}
	})
}

func TestPeerHealth(t *testing.T) {
	for _, busy := range []bool{false, true} {
		t.Run(map[bool]string{false: "decide", true: "busy"}[busy], func(t *testing.T) { peerHealth(t, busy) })
	}
}

// peerHealth runs TestPeerHealth's scenario; busy has every other tick
// take only the peer events (Engine.PeerHealth), as while moves run: the
// events are the same, each once.
func peerHealth(t *testing.T, busy bool) {
	pol := mustParse(t, "peers: {missed: 3}\n")
	e := NewEngine(pol)
	seen := t0
	var events []string
	for i := range 12 {
		now := t0.Add(time.Duration(i) * time.Second)
		if i <= 4 {
			seen = now // s2 answers until t+4s, then dies
		}
		s := Snapshot{Now: now, Heartbeat: time.Second, Self: Server{Name: "s1"},
			Peers: []Peer{{Server: Server{Name: "s2"}, LastSeen: seen}, {Server: Server{Name: "s3"}}}}
		if i >= 10 {
			s.Peers[0].LastSeen = now // s2 is back
		}
		decide := e.Decide
		if busy && i%2 == 1 {
			decide = e.PeerHealth // a tick while moves are under way
		}
		for _, d := range decide(s) {
			events = append(events, fmt.Sprintf("t+%d %s %s", i, d.Peer, d.Reason))
		}
	}
	// s2: up at once; down once more than 3s passed without an answer
	// (t+8); up again at t+10. s3 never answered: down after its grace.
	want := []string{"t+0 s2 peer_up", "t+4 s3 peer_down", "t+8 s2 peer_down", "t+10 s2 peer_up"}
	if !slices.Equal(events, want) {
		t.Fatalf("events %q, want %q", events, want)
	}
}

func TestReloadKeepsCooldown(t *testing.T) {
	src := `
rules:
  - name: drain
    when: {maintenance: true}
    migrate: {count: 1, to: weighted}
    cooldown: 10s
maintenance: [s1]
`
	e := NewEngine(mustParse(t, src))
	if d := ruleDecision(t, e.Decide(snap(t0, Load{}, Load{}, Load{}, conns(4, 1000))), "drain"); d.Reason != ReasonTriggered {
		t.Fatalf("%s: %s", d.Reason, d.Detail)
	}
	e.SetPolicy(mustParse(t, src))
	if d := ruleDecision(t, e.Decide(snap(t0.Add(time.Second), Load{}, Load{}, Load{}, conns(3, 1001))), "drain"); d.Reason != ReasonCooldown {
		t.Fatalf("after a reload: %s (%s), want cooldown", d.Reason, d.Detail)
	}
}

// TestReloadNewLevels: a reload that changes a rule's levels keeps its
// cooldown but starts its conditions afresh, so that the new "for" is
// waited in full; one that changes nothing keeps their timing.
func TestReloadNewLevels(t *testing.T) {
	policy := func(above string) string {
		return `
rules:
  - name: hot
    when: {cpu: {above: ` + above + `, for: 10s}}
    cooldown: 1s
`
	}
	e := NewEngine(mustParse(t, policy("0.9")))
	hot := Load{CPU: 0.96}
	for i := range 12 {
		e.Decide(snap(t0.Add(time.Duration(i)*time.Second), hot, Load{}, Load{}, conns(4, 1000)))
	}
	// Pending for 11 s at the same levels: fires at once after a reload
	// that changes nothing.
	e.SetPolicy(mustParse(t, policy("0.9")))
	if d := ruleDecision(t, e.Decide(snap(t0.Add(20*time.Second), hot, Load{}, Load{}, conns(4, 1000))), "hot"); d.Reason != ReasonTriggered {
		t.Fatalf("after a reload with the same levels: %s (%s), want triggered", d.Reason, d.Detail)
	}
	e.SetPolicy(mustParse(t, policy("0.95")))
	if d := ruleDecision(t, e.Decide(snap(t0.Add(30*time.Second), hot, Load{}, Load{}, conns(4, 1000))), "hot"); d.Reason != ReasonPending {
		t.Fatalf("after a reload with a new level: %s (%s), want pending", d.Reason, d.Detail)
	}
}

// TestDryRunRuleLeavesOthers: a dry-run rule takes nothing from the rules
// that act after it.
func TestDryRunRuleLeavesOthers(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: preview
    dry_run: true
    when: {maintenance: true}
  - name: drain
    when: {maintenance: true}
maintenance: [s1]
`)
	ds := NewEngine(pol).Decide(snap(t0, Load{}, Load{}, Load{}, conns(4, 1000)))
	p, d := ruleDecision(t, ds, "preview"), ruleDecision(t, ds, "drain")
	if !p.DryRun || p.Reason != ReasonTriggered || p.Count() == 0 {
		t.Fatalf("preview: dry %v %s %d (%s)", p.DryRun, p.Reason, p.Count(), p.Detail)
	}
	if d.DryRun || d.Reason != ReasonTriggered || d.Count() != p.Count() {
		t.Fatalf("drain after a dry-run rule: dry %v %s %d (%s), want %d moved", d.DryRun, d.Reason, d.Count(), d.Detail, p.Count())
	}
}

// TestConnsCountThisSnapshot: with by: conns, a second rule counts the
// connections the first one moved away from this server, not only those
// it moved to the target, and leaves no peer with more than this server.
func TestConnsCountThisSnapshot(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: first
    when: {cpu: {above: 0.5}}
    migrate: {count: 6, to: least_loaded, by: conns}
  - name: second
    when: {cpu: {above: 0.5}}
    migrate: {to: least_loaded, by: conns}
`)
	s := snap(t0, Load{CPU: 0.9}, Load{CPU: 0.1}, Load{CPU: 0.1, Conns: 30}, conns(20, 1000))
	ds := NewEngine(pol).Decide(s)
	if got := moves(ruleDecision(t, ds, "first")); got != "s2:6" {
		t.Fatalf("first: %s", got)
	}
	// 14 here and 6 at s2: 4 more leave 10 and 10.
	if d := ruleDecision(t, ds, "second"); moves(d) != "s2:4" {
		t.Fatalf("second: %q (%s), want s2:4", moves(d), d.Detail)
	}
}

// TestNeverToAPeerThatWouldFire: a rule fired by CPU and comparing
// connection counts does not pick a peer whose CPU would fire it there.
func TestNeverToAPeerThatWouldFire(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: hot
    when: {cpu: {above: 0.8}}
    migrate: {count: 1, to: least_loaded}
`)
	s := snap(t0, Load{CPU: 0.9}, Load{CPU: 0.99, Conns: 2}, Load{CPU: 0.1, Conns: 5}, conns(10, 1000))
	d := ruleDecision(t, NewEngine(pol).Decide(s), "hot")
	if moves(d) != "s3:1" || !strings.Contains(d.Detail, "s2's cpu") {
		t.Fatalf("%q (%s), want s3:1, not s2 for its CPU", moves(d), d.Detail)
	}
}

// TestOtherAppsStillMove: a rule for every service moves the connections
// of an application that has somewhere to go, even when those of another
// come first and have nowhere to go.
func TestOtherAppsStillMove(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: drain
    when: {maintenance: true}
maintenance: [s1]
`)
	cs := conns(3, 1000) // :7000, served by no peer here
	for _, c := range conns(2, 2000) {
		c.App, c.Service = ":8000", netip.AddrPortFrom(c.Service.Addr(), 8000)
		cs = append(cs, c)
	}
	s := snap(t0, Load{}, Load{}, Load{}, cs)
	for i := range s.Peers {
		s.Peers[i].Services = []string{":8000"}
	}
	d := ruleDecision(t, NewEngine(pol).Decide(s), "drain")
	if d.Reason != ReasonTriggered || d.Count() != 2 {
		t.Fatalf("%s %q (%s), want the 2 connections of :8000 moved", d.Reason, moves(d), d.Detail)
	}
	for _, m := range d.Moves {
		for _, c := range m.Conns {
			if c.App != ":8000" {
				t.Errorf("moved %v of %s", c.Client, c.App)
			}
		}
	}
}

// TestNoInfo: a connection whose TCP figures could not be read (zeros,
// NoInfo) is no reading: its retransmission rate keeps its base, and a
// path condition that zeros would meet leaves it alone.
func TestNoInfo(t *testing.T) {
	pol := mustParse(t, `
rules:
  - name: lossy
    when: {retransmits: {above: 10}}
    migrate: {to: weighted}
  - name: slow
    when: {delivery_rate: {below: 1000}}
    migrate: {to: weighted}
`)
	e := NewEngine(pol)
	cs := conns(1, 1000)
	cs[0].DeliveryRate = 1e6
	for i, step := range []struct {
		retrans uint32
		noInfo  bool
	}{{500, false}, {0, true}, {502, false}, {0, true}, {504, false}} {
		c := cs[0]
		c.TotalRetrans = step.retrans
		if step.noInfo {
			c.TotalRetrans, c.DeliveryRate, c.RTT, c.NoInfo = 0, 0, 0, true
		}
		ds := e.Decide(snap(t0.Add(time.Duration(i)*time.Second), Load{}, Load{}, Load{}, []Conn{c}))
		for _, rule := range []string{"lossy", "slow"} {
			if d := ruleDecision(t, ds, rule); d.Count() != 0 {
				t.Fatalf("step %d, rule %s: moves %q (%s)", i, rule, moves(d), d.Detail)
			}
		}
	}
}

// TestDone: connections that failed to move are given back to the rate
// limit, and a target that took none of a move is avoided for a while.
func TestDone(t *testing.T) {
	pol := mustParse(t, `
limits: {rate: 4, per: 1m}
rules:
  - name: drain
    when: {maintenance: true}
    migrate: {count: 2, to: least_loaded}
    cooldown: 0s
maintenance: [s1]
`)
	e := NewEngine(pol)
	cs := conns(10, 1000)
	d := ruleDecision(t, e.Decide(snap(t0, Load{}, Load{}, Load{}, cs)), "drain")
	if moves(d) != "s2:2" {
		t.Fatalf("first: %q (%s)", moves(d), d.Detail)
	}
	// Both failed here (their application would not give them up, say):
	// given back to the rate, s2 still a target.
	e.Done(d, t0, map[string]int{"s2": 2}, nil)
	d = ruleDecision(t, e.Decide(snap(t0.Add(time.Second), Load{}, Load{}, Load{}, cs)), "drain")
	if moves(d) != "s2:2" {
		t.Fatalf("after failures here: %q (%s), want s2:2", moves(d), d.Detail)
	}
	e.Done(d, t0.Add(40*time.Second), map[string]int{"s2": 2}, map[string]bool{"s2": true}) // s2 refused both, after a long wait
	d = ruleDecision(t, e.Decide(snap(t0.Add(41*time.Second), Load{}, Load{}, Load{}, cs)), "drain")
	if moves(d) != "s3:2" || !strings.Contains(d.Detail, "s2 took none") {
		t.Fatalf("after s2 refused: %q (%s), want s3:2", moves(d), d.Detail)
	}
	// 2 of the rate of 4 used (the 4 failed were given back): 2 more.
	d = ruleDecision(t, e.Decide(snap(t0.Add(42*time.Second), Load{}, Load{}, Load{}, cs[2:])), "drain")
	if d.Reason != ReasonTriggered || d.Count() != 2 {
		t.Fatalf("fourth: %s %q (%s), want 2 moved", d.Reason, moves(d), d.Detail)
	}
	d = ruleDecision(t, e.Decide(snap(t0.Add(43*time.Second), Load{}, Load{}, Load{}, cs[4:])), "drain")
	if d.Reason != ReasonRateLimit {
		t.Fatalf("fifth: %s %q (%s), want rate_limit", d.Reason, moves(d), d.Detail)
	}
	// The backoff ends.
	d = ruleDecision(t, e.Decide(snap(t0.Add(40*time.Second+RefusedBackoff+time.Minute), Load{}, Load{}, Load{}, cs[4:])), "drain")
	if !strings.Contains(moves(d), "s2") {
		t.Fatalf("after the backoff: %q (%s), want s2 again", moves(d), d.Detail)
	}
}

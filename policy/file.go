package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/mtcp-dev/mtcp/internal/yamlerr"
)

// Policy is a parsed and validated policy file. Parse and LoadFile fill in
// the defaults documented on each field; a Policy built by hand should go
// through Validate.
type Policy struct {
	// Interval is how often the engine decides; default 1s, at least
	// 100ms.
	Interval Duration `yaml:"interval"`
	// DryRun makes every rule log and count its decisions without moving
	// anything.
	DryRun bool `yaml:"dry_run"`
	// Timezone is the IANA zone of the rules' time windows; default UTC.
	Timezone string `yaml:"timezone"`
	// Maintenance names the servers under maintenance: rules with the
	// maintenance condition drain them, and no rule ever moves a
	// connection to one.
	Maintenance []string `yaml:"maintenance"`
	// Peers sets the failure detection of peers.
	Peers PeerHealth `yaml:"peers"`
	// Limits bound how much the engine moves.
	Limits Limits `yaml:"limits"`
	// Rules are evaluated in order at every interval.
	Rules []Rule `yaml:"rules"`

	loc *time.Location
}

// PeerHealth configures failure detection on the heartbeats the daemons
// exchange over the control channel.
type PeerHealth struct {
	// Missed is how many heartbeat intervals may pass without an answer
	// before a peer is declared down; default 3.
	Missed int `yaml:"missed"`
}

// Limits are the engine-wide brakes against moving too much or too often.
type Limits struct {
	// Rate is the most connections the engine moves in any window of
	// length Per; 0 (the default) sets no limit.
	Rate int `yaml:"rate"`
	// Per is the window of Rate; default 1m.
	Per Duration `yaml:"per"`
	// ConnCooldown is how long a connection that migrated in stays where
	// it is before any rule may move it again; default 30s.
	ConnCooldown *Duration `yaml:"conn_cooldown"`
}

// Rule is a trigger and the action it takes.
type Rule struct {
	// Name identifies the rule in logs and metrics; required, unique.
	Name string `yaml:"name"`
	// Service restricts the rule to the connections of one application
	// service, ":PORT", or "ADDR:PORT" for those of its connections whose
	// clients dialled ADDR; empty means every service.
	Service string `yaml:"service"`
	// When is the trigger: every condition given must hold.
	When Conditions `yaml:"when"`
	// Migrate is the action.
	Migrate Action `yaml:"migrate"`
	// Cooldown is how long the rule waits after acting before it acts
	// again; default 10s.
	Cooldown *Duration `yaml:"cooldown"`
	// DryRun makes this rule log and count its decisions without acting.
	DryRun bool `yaml:"dry_run"`

	port uint16
	addr netip.Addr // of Service, if it has one
}

// Conditions are a rule's trigger. Server conditions (CPU to Conns,
// Maintenance, During) gate the rule; path conditions (RTT,
// Retransmits, DeliveryRate) hold per connection and select the
// connections the rule moves. A rule without path conditions moves
// connections of its service chosen in address order.
type Conditions struct {
	// CPU is the server's CPU use, a fraction of all CPUs (0 to 1).
	CPU *Threshold `yaml:"cpu"`
	// RunQueue is the number of runnable tasks.
	RunQueue *Threshold `yaml:"run_queue"`
	// Memory is the fraction of memory in use (0 to 1).
	Memory *Threshold `yaml:"memory"`
	// MemoryPressure is the share of time tasks stalled on memory over
	// the last 10 seconds (the kernel's PSI "some avg10", 0 to 1).
	MemoryPressure *Threshold `yaml:"memory_pressure"`
	// Conns is the number of connections of the rule's service here (of
	// every service, for a rule without one).
	Conns *Threshold `yaml:"conns"`
	// RTT is a connection's smoothed round-trip time (TCP_INFO), in
	// seconds or as a duration ("50ms").
	RTT *Threshold `yaml:"rtt"`
	// Retransmits is a connection's retransmitted segments per second,
	// measured between two decisions.
	Retransmits *Threshold `yaml:"retransmits"`
	// DeliveryRate is a connection's latest delivery rate in bytes per
	// second (TCP_INFO).
	DeliveryRate *Threshold `yaml:"delivery_rate"`
	// Maintenance holds while this server is listed in the policy's
	// maintenance list.
	Maintenance bool `yaml:"maintenance"`
	// During holds while the time is inside one of the windows.
	During []Window `yaml:"during"`
}

// Threshold compares a measured value with a level. Exactly one of Above
// and Below is given.
type Threshold struct {
	// Above fires when the value exceeds it.
	Above *Value `yaml:"above"`
	// Below fires when the value falls under it.
	Below *Value `yaml:"below"`
	// Clear is the hysteresis: once fired, the condition holds until the
	// value crosses Clear (default: the level itself). It must lie on the
	// quiet side of the level.
	Clear *Value `yaml:"clear"`
	// For is how long the condition must hold before it counts.
	For Duration `yaml:"for"`
}

// Window is a daily time window.
type Window struct {
	// Days are the days it applies (mon, tue, ... sun); empty means every
	// day. A window that wraps past midnight belongs to the day it starts.
	Days []string `yaml:"days"`
	// From and To are "HH:MM" in the policy's timezone. To before From
	// wraps past midnight; From equal to To is the whole day.
	From string `yaml:"from"`
	To   string `yaml:"to"`

	days       [7]bool
	from, to   time.Duration
	everyDay   bool
	wholeOfDay bool
}

// Strategies of Action.To.
const (
	LeastLoaded = "least_loaded" // the peer with the lowest load (Action.By)
	PathCost    = "path_cost"    // per connection, the peer with the lowest measured RTT to its client's network
	Weighted    = "weighted"     // split over the peers in proportion to Action.Weights
)

// Load metrics a least_loaded action can compare (Action.By).
const (
	MetricCPU            = "cpu"
	MetricRunQueue       = "run_queue"
	MetricMemory         = "memory"
	MetricMemoryPressure = "memory_pressure"
	MetricConns          = "conns"
)

// loadMetrics are the load metrics, which are also the names of the
// server conditions on them.
var loadMetrics = []string{MetricCPU, MetricRunQueue, MetricMemory, MetricMemoryPressure, MetricConns}

// Action moves connections of the rule's service.
type Action struct {
	// Count is how many connections to move at most per decision.
	Count int `yaml:"count"`
	// Fraction is the share of the matching connections to move per
	// decision (0 to 1, rounded up). Give Count or Fraction; default: all.
	Fraction *float64 `yaml:"fraction"`
	// To is the strategy that picks the target: least_loaded (default),
	// path_cost or weighted.
	To string `yaml:"to"`
	// By is the load least_loaded compares: cpu, run_queue, memory,
	// memory_pressure or conns (default).
	By string `yaml:"by"`
	// Margin is the hysteresis of the target choice. least_loaded: when
	// the rule has a load condition, a target must be less loaded than
	// this server by more than Margin (default 0.05 for fractions, 1 for
	// run_queue and conns), and peers within Margin of the least loaded
	// one count as equal (the one with fewer connections wins). path_cost:
	// a connection moves only if the target's cost is lower than its
	// current RTT by this fraction (default 0.2).
	Margin *float64 `yaml:"margin"`
	// Weights are the relative shares of the peers for weighted (default:
	// equal). A peer with weight 0 gets nothing.
	Weights map[string]float64 `yaml:"weights"`
	// Targets restricts the candidates to these peers (default: every
	// peer).
	Targets []string `yaml:"targets"`
}

// Duration is a time.Duration written as "500ms", "10s", "2m".
type Duration time.Duration

// UnmarshalYAML reads a duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if n.Kind != yaml.ScalarNode || err != nil {
		return typeErr(n, "want a duration such as 500ms, 10s or 2m, not %q", n.Value)
	}
	if v < 0 {
		return typeErr(n, "duration %s is negative", n.Value)
	}
	*d = Duration(v)
	return nil
}

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Value is a threshold level: a number, a percentage ("80%" is 0.8) or a
// duration ("50ms" is 0.05, in seconds).
type Value float64

// UnmarshalYAML reads a number, a percentage or a duration.
func (v *Value) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return typeErr(n, "want a number, a percentage or a duration")
	}
	s := strings.TrimSpace(n.Value)
	if f, err := strconv.ParseFloat(s, 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
		*v = Value(f)
		return nil
	}
	if p, ok := strings.CutSuffix(s, "%"); ok {
		if f, err := strconv.ParseFloat(p, 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
			*v = Value(f / 100)
			return nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil {
		*v = Value(d.Seconds())
		return nil
	}
	return typeErr(n, "%q is not a number, a percentage (80%%) or a duration (50ms)", n.Value)
}

func typeErr(n *yaml.Node, format string, a ...any) error {
	return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %s", n.Line, fmt.Sprintf(format, a...))}}
}

// Defaults.
const (
	DefaultInterval     = time.Second
	MinInterval         = 100 * time.Millisecond
	DefaultMissed       = 3
	DefaultPer          = time.Minute
	DefaultConnCooldown = 30 * time.Second
	DefaultCooldown     = 10 * time.Second
)

// Error is a problem in a policy file, at a line when one is known.
type Error struct {
	Line int    // 1-based; 0 when unknown
	Path string // where, e.g. "rules[1].migrate.fraction"
	Msg  string
}

// Error says where the problem is (line and path, when known) and what it is.
func (e *Error) Error() string {
	switch {
	case e.Line > 0 && e.Path != "":
		return fmt.Sprintf("line %d: %s: %s", e.Line, e.Path, e.Msg)
	case e.Line > 0:
		return fmt.Sprintf("line %d: %s", e.Line, e.Msg)
	case e.Path != "":
		return e.Path + ": " + e.Msg
	}
	return e.Msg
}

// LoadFile reads and parses a policy file. Errors name the file and the line.
func LoadFile(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	p, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, nil
}

// Parse parses a policy file strictly: unknown keys, values of the wrong
// type and invalid settings are errors, each with its line number. All
// problems found are reported together (errors.Join).
func Parse(b []byte) (*Policy, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return nil, syntaxError(b, err)
	}
	if root.Kind == 0 || (root.Kind == yaml.DocumentNode && len(root.Content) == 0) {
		return nil, errors.New("the policy file is empty")
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var pol Policy
	if err := dec.Decode(&pol); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the policy file is empty")
		}
		return nil, yamlerr.Explain(err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil && !yamlerr.Empty(&extra) {
		return nil, &Error{Line: extra.Line, Msg: "a second YAML document: a policy file holds one"}
	}
	if err := pol.validate(&root); err != nil {
		return nil, err
	}
	return &pol, nil
}

// syntaxError locates a YAML syntax error. The YAML parser reports the
// line where the enclosing construct began, which can be far above the
// mistake: the first line at which the file's beginning stops parsing is
// where the mistake shows.
func syntaxError(b []byte, err error) error {
	msg := err.Error()
	if i := strings.Index(msg, ": line "); strings.HasPrefix(msg, "yaml") && i >= 0 {
		if j := strings.Index(msg[i+7:], ": "); j >= 0 {
			msg = msg[i+7+j+2:]
		}
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	var n yaml.Node
	for k := 1; k <= len(lines); k++ {
		if yaml.Unmarshal(bytes.Join(lines[:k], nil), &n) != nil {
			return &Error{Line: k, Msg: "YAML syntax: " + msg}
		}
	}
	return err
}

// Validate fills in defaults and checks a Policy built by hand.
func (p *Policy) Validate() error { return p.validate(nil) }

// problems collects validation errors, locating each in the YAML tree.
type problems struct {
	root *yaml.Node
	errs []error
}

// add records a problem at path (keys and sequence indices).
func (ps *problems) add(path []any, format string, a ...any) {
	ps.errs = append(ps.errs, &Error{Line: lineOf(ps.root, path), Path: pathString(path), Msg: fmt.Sprintf(format, a...)})
}

func pathString(path []any) string {
	var b strings.Builder
	for _, k := range path {
		switch k := k.(type) {
		case int:
			fmt.Fprintf(&b, "[%d]", k)
		case string:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(k)
		}
	}
	return b.String()
}

// lineOf finds the line of the node at path, or of its deepest ancestor
// present in the file (a missing key is reported where it should be).
func lineOf(n *yaml.Node, path []any) int {
	_, line := walk(n, path)
	return line
}

// nodeAt returns the node at path, or nil.
func nodeAt(n *yaml.Node, path []any) *yaml.Node {
	found, _ := walk(n, path)
	return found
}

// walk follows path from n: the node there (nil if it is missing) and the
// line of the deepest node found on the way.
func walk(n *yaml.Node, path []any) (*yaml.Node, int) {
	if n == nil {
		return nil, 0
	}
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, k := range path {
		var next *yaml.Node
		switch k := k.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == k {
						next = n.Content[i+1]
						break
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && k < len(n.Content) {
				next = n.Content[k]
			}
		}
		if next == nil {
			return nil, line
		}
		n, line = next, next.Line
	}
	return n, line
}

func key(path ...any) []any { return path }

var dayNames = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

func (pol *Policy) validate(root *yaml.Node) error {
	ps := &problems{root: root}
	if pol.Interval == 0 {
		pol.Interval = Duration(DefaultInterval)
	} else if pol.Interval.D() < MinInterval {
		ps.add(key("interval"), "%v is too short (at least %v)", pol.Interval.D(), MinInterval)
	}
	if pol.Timezone == "" {
		pol.Timezone = "UTC"
	}
	loc, err := time.LoadLocation(pol.Timezone)
	if err != nil {
		ps.add(key("timezone"), "unknown time zone %q (an IANA name such as Europe/Paris)", pol.Timezone)
		loc = time.UTC
	}
	pol.loc = loc
	for i, s := range pol.Maintenance {
		if s == "" {
			ps.add(key("maintenance", i), "empty server name")
		}
	}
	switch {
	case pol.Peers.Missed == 0:
		pol.Peers.Missed = DefaultMissed
	case pol.Peers.Missed < 1:
		ps.add(key("peers", "missed"), "%d: want at least 1 missed heartbeat", pol.Peers.Missed)
	}
	if pol.Limits.Rate < 0 {
		ps.add(key("limits", "rate"), "%d is negative (0 means no limit)", pol.Limits.Rate)
	}
	if pol.Limits.Per == 0 {
		pol.Limits.Per = Duration(DefaultPer)
	}
	if pol.Limits.ConnCooldown == nil {
		d := Duration(DefaultConnCooldown)
		pol.Limits.ConnCooldown = &d
	}
	names := map[string]bool{}
	for i := range pol.Rules {
		pol.Rules[i].validate(ps, i, names)
	}
	return errors.Join(ps.errs...)
}

func (r *Rule) validate(ps *problems, i int, names map[string]bool) {
	at := func(rest ...any) []any { return append([]any{"rules", i}, rest...) }
	switch {
	case r.Name == "":
		ps.add(at("name"), "missing: every rule needs a name (it labels its logs and metrics)")
	case names[r.Name]:
		ps.add(at("name"), "%q is used by an earlier rule", r.Name)
	case strings.ContainsAny(r.Name, " \t\n\"="):
		ps.add(at("name"), "%q: use letters, digits, '-', '_' or '.'", r.Name)
	}
	names[r.Name] = true
	if r.Service != "" {
		i := strings.LastIndexByte(r.Service, ':')
		port, err := strconv.ParseUint(r.Service[i+1:], 10, 16)
		if i < 0 || err != nil || port == 0 {
			ps.add(at("service"), "%q: want :PORT or ADDR:PORT, e.g. \":7000\"", r.Service)
		} else if i > 0 {
			ap, err := netip.ParseAddrPort(r.Service)
			if err != nil {
				ps.add(at("service"), "%q: %s is not an IP address (want :PORT or ADDR:PORT, e.g. \"10.0.0.1:7000\")", r.Service, r.Service[:i])
			}
			r.addr = ap.Addr().Unmap()
		}
		r.port = uint16(port)
	}
	if r.Cooldown == nil {
		d := Duration(DefaultCooldown)
		r.Cooldown = &d
	}
	c := &r.When
	n := 0
	for _, th := range []struct {
		name string
		t    *Threshold
		kind levelKind
	}{
		{"cpu", c.CPU, fraction}, {"run_queue", c.RunQueue, measure}, {"memory", c.Memory, fraction},
		{"memory_pressure", c.MemoryPressure, fraction}, {"conns", c.Conns, measure},
		{"rtt", c.RTT, duration}, {"retransmits", c.Retransmits, measure}, {"delivery_rate", c.DeliveryRate, measure},
	} {
		if th.t == nil {
			continue
		}
		n++
		th.t.validate(ps, at("when", th.name), th.kind)
	}
	if c.Maintenance {
		n++
	}
	for j := range c.During {
		c.During[j].validate(ps, at("when", "during", j))
	}
	if len(c.During) > 0 {
		n++
	}
	if n == 0 {
		ps.add(at("when"), "no condition: give at least one trigger (cpu, run_queue, memory, memory_pressure, conns, rtt, retransmits, delivery_rate, maintenance, during)")
	}
	a := &r.Migrate
	if a.Count < 0 {
		ps.add(at("migrate", "count"), "%d is negative", a.Count)
	}
	if a.Fraction != nil && !(*a.Fraction > 0 && *a.Fraction <= 1) { // NaN too
		ps.add(at("migrate", "fraction"), "%v: want more than 0 and at most 1", *a.Fraction)
	}
	if a.Count > 0 && a.Fraction != nil {
		ps.add(at("migrate"), "give count or fraction, not both")
	}
	if a.To == "" {
		a.To = LeastLoaded
	}
	switch a.To {
	case LeastLoaded:
		if a.By == "" {
			a.By = MetricConns
		}
		switch a.By {
		case MetricCPU, MetricMemory, MetricMemoryPressure:
			if a.Margin == nil {
				m := 0.05
				a.Margin = &m
			} else if *a.Margin >= 1 {
				ps.add(at("migrate", "margin"), "%v: %s is a fraction from 0 to 1, and a margin of 1 or more would never move anything", *a.Margin, a.By)
			}
		case MetricRunQueue, MetricConns:
			if a.Margin == nil {
				m := 1.0
				a.Margin = &m
			}
		default:
			ps.add(at("migrate", "by"), "%q: want cpu, run_queue, memory, memory_pressure or conns", a.By)
		}
	case PathCost:
		if a.Margin == nil {
			m := 0.2
			a.Margin = &m
		} else if *a.Margin < 0 || *a.Margin >= 1 {
			ps.add(at("migrate", "margin"), "%v: a path_cost margin is a fraction, at least 0 and below 1", *a.Margin)
		}
	case Weighted:
		sum := 0.0
		for _, name := range sortedKeys(a.Weights) {
			if w := a.Weights[name]; w < 0 || math.IsNaN(w) || math.IsInf(w, 0) {
				ps.add(at("migrate", "weights", name), "%v: a weight is a number, at least 0", w)
			} else {
				sum += w
			}
		}
		switch {
		case len(a.Weights) > 0 && sum == 0:
			ps.add(at("migrate", "weights"), "every weight is 0: nothing would move")
		case math.IsInf(sum, 0):
			ps.add(at("migrate", "weights"), "the weights add up to more than a float64 holds: use smaller ones (only their ratios count)")
		}
	default:
		ps.add(at("migrate", "to"), "%q: want least_loaded, path_cost or weighted", a.To)
	}
	if a.By != "" && a.To != LeastLoaded {
		ps.add(at("migrate", "by"), "only least_loaded compares a load (to is %s)", a.To)
	}
	if len(a.Weights) > 0 && a.To != Weighted {
		ps.add(at("migrate", "weights"), "only weighted uses weights (to is %s)", a.To)
	}
	switch {
	case a.Margin != nil && (math.IsNaN(*a.Margin) || math.IsInf(*a.Margin, 0)):
		ps.add(at("migrate", "margin"), "%v: want a number", *a.Margin)
	case a.Margin != nil && *a.Margin < 0:
		ps.add(at("migrate", "margin"), "%v is negative", *a.Margin)
	case a.Margin != nil && a.To == Weighted:
		ps.add(at("migrate", "margin"), "weighted compares no load, so it takes no margin")
	}
	for j, t := range a.Targets {
		if t == "" || slices.Contains(a.Targets[:j], t) {
			ps.add(at("migrate", "targets", j), "%q: empty or repeated", t)
		}
	}
}

// levelKind is what a metric's levels are, which decides how they may be
// written.
type levelKind int

const (
	fraction levelKind = iota // 0 to 1, or a percentage
	measure                   // a count or a rate: a plain number
	duration                  // a time: a duration with its unit
)

func (t *Threshold) validate(ps *problems, at []any, kind levelKind) {
	frac := kind == fraction
	sub := func(k string) []any { return append(slices.Clone(at), k) }
	switch {
	case t.Above == nil && t.Below == nil:
		ps.add(at, "give above or below")
		return
	case t.Above != nil && t.Below != nil:
		ps.add(at, "give above or below, not both")
		return
	}
	level, key := t.Above, "above"
	if level == nil {
		level, key = t.Below, "below"
	}
	if *level < 0 {
		ps.add(sub(key), "%v is negative", float64(*level))
	}
	if frac && *level > 1 {
		ps.add(sub(key), "%v: this is a fraction from 0 to 1 (or a percentage: 80%%)", float64(*level))
	}
	for _, k := range []string{"above", "below", "clear"} {
		n := nodeAt(ps.root, sub(k))
		if n == nil {
			continue
		}
		v := strings.TrimSpace(n.Value)
		_, numErr := strconv.ParseFloat(v, 64)
		_, durErr := time.ParseDuration(v)
		switch {
		case kind != fraction && strings.HasSuffix(v, "%"):
			// A percentage reads as a fraction: 80% of a count is 0.8.
			ps.add(sub(k), "%s: this metric is a count or a measure, not a fraction: give a number", n.Value)
		case kind == duration && numErr == nil && v != "0":
			// A bare number would be seconds: 80 meant as 80 ms would
			// never fire.
			ps.add(sub(k), "%s: this metric is a time: give its unit, e.g. 80ms", n.Value)
		case kind != duration && numErr != nil && durErr == nil:
			ps.add(sub(k), "%s: this metric is not a time: give a number", n.Value)
		}
	}
	if t.Clear != nil {
		switch c := float64(*t.Clear); {
		case (t.Above != nil && *t.Clear > *t.Above) || (t.Below != nil && *t.Clear < *t.Below):
			ps.add(sub("clear"), "%v is on the wrong side of %s %v: the condition could never clear", c, key, float64(*level))
		case c < 0 || frac && c > 1:
			// Never crossed: once fired, the condition would hold for good.
			ps.add(sub("clear"), "%v is out of the metric's range (a fraction from 0 to 1, or a count from 0): the condition could never clear", c)
		}
	}
}

func (w *Window) validate(ps *problems, at []any) {
	sub := func(k ...any) []any { return append(slices.Clone(at), k...) }
	w.everyDay = len(w.Days) == 0
	for i, d := range w.Days {
		wd, ok := dayNames[strings.ToLower(d)]
		if !ok {
			ps.add(sub("days", i), "%q is not a day (mon, tue, wed, thu, fri, sat, sun)", d)
			continue
		}
		w.days[wd] = true
	}
	var ok1, ok2 bool
	w.from, ok1 = clock(w.From)
	w.to, ok2 = clock(w.To)
	if !ok1 {
		ps.add(sub("from"), "%q: want HH:MM", w.From)
	}
	if !ok2 {
		ps.add(sub("to"), "%q: want HH:MM", w.To)
	}
	w.wholeOfDay = w.from == w.to
}

func clock(s string) (time.Duration, bool) {
	h, m, ok := strings.Cut(s, ":")
	if !ok || len(h) != 2 || len(m) != 2 {
		return 0, false
	}
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if err1 != nil || err2 != nil || hh < 0 || hh > 23 || mm < 0 || mm > 59 {
		return 0, false
	}
	return time.Duration(hh)*time.Hour + time.Duration(mm)*time.Minute, true
}

// contains reports whether t falls inside the window, in loc.
func (w *Window) contains(t time.Time, loc *time.Location) bool {
	t = t.In(loc)
	// The time of day as the clock shows it: on the days the clocks
	// change, the time elapsed since midnight is an hour off.
	tod := time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute +
		time.Duration(t.Second())*time.Second + time.Duration(t.Nanosecond())
	day := func(wd time.Weekday) bool { return w.everyDay || w.days[wd] }
	switch {
	case w.wholeOfDay:
		return day(t.Weekday())
	case w.from < w.to:
		return day(t.Weekday()) && tod >= w.from && tod < w.to
	}
	// Wraps past midnight: the evening part is today's, the morning part
	// belongs to the window that started yesterday.
	if tod >= w.from {
		return day(t.Weekday())
	}
	return tod < w.to && day((t.Weekday()+6)%7)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Servers returns the server names the policy mentions (maintenance,
// weights, targets), sorted and each once, for checking them against the
// pool it runs in.
func (pol *Policy) Servers() []string {
	var out []string
	out = append(out, pol.Maintenance...)
	for _, r := range pol.Rules {
		out = append(out, sortedKeys(r.Migrate.Weights)...)
		out = append(out, r.Migrate.Targets...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// CheckPool checks that the servers the policy names (Servers) are all in
// pool, the names of the servers it runs among: a misspelt name would
// silently drain nothing, or weigh a server that does not exist.
func (pol *Policy) CheckPool(pool []string) error {
	var unknown []string
	for _, s := range pol.Servers() {
		if !slices.Contains(pool, s) {
			unknown = append(unknown, s)
		}
	}
	if len(unknown) > 0 {
		return fmt.Errorf("names servers that are not in the pool (%s): %s", strings.Join(pool, ", "), strings.Join(unknown, ", "))
	}
	return nil
}

// inMaintenance reports whether server is listed under maintenance.
func (pol *Policy) inMaintenance(server string) bool {
	return slices.Contains(pol.Maintenance, server)
}

// ClientPrefix is the network a client address belongs to for path
// costs: its /24 (IPv4) or /64 (IPv6).
func ClientPrefix(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := 64
	if a.Is4() {
		bits = 24
	}
	pfx, _ := a.Prefix(bits)
	return pfx
}

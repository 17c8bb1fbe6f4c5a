package policy

import (
	"strings"
	"testing"
	"time"
)

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		want       []string // substrings of the error, each with its line
	}{
		{"empty", "", []string{"empty"}},
		{"comment only", "# nothing\n", []string{"empty"}},
		{"unknown top-level key", "interval: 1s\nrulez: []\n", []string{"line 2: field rulez not found (unknown key)"}},
		{"unknown rule key", "rules:\n  - name: a\n    when: {cpu: {above: 0.5}}\n    colour: red\n", []string{"line 4: field colour not found"}},
		{"unknown condition", "rules:\n  - name: a\n    when:\n      cpu: {above: 0.5}\n      gpu: {above: 0.5}\n", []string{"line 5: field gpu not found"}},
		{"bad duration", "interval: soon\n", []string{"line 1: want a duration"}},
		{"negative duration", "rules:\n  - name: a\n    cooldown: -1s\n    when: {cpu: {above: 0.5}}\n", []string{"line 3: duration -1s is negative"}},
		{"bad value", "rules:\n  - name: a\n    when: {cpu: {above: lots}}\n", []string{`line 3: "lots" is not a number`}},
		{"wrong type", "peers:\n  missed: three\n", []string{"line 2: want a whole number, not a string (three)"}},
		{"a server, not a list", "maintenance: s3\n", []string{"line 1: want a list, e.g. [a, b], not a string (s3)"}},
		{"interval too short", "interval: 10ms\n", []string{"line 1: interval: 10ms is too short"}},
		{"no name", "rules:\n  - when: {cpu: {above: 0.5}}\n", []string{"line 2: rules[0].name: missing"}},
		{"duplicate name", "rules:\n  - name: a\n    when: {cpu: {above: 0.5}}\n  - name: a\n    when: {cpu: {above: 0.5}}\n", []string{"line 4: rules[1].name: \"a\" is used"}},
		{"no condition", "rules:\n  - name: a\n    when: {}\n", []string{"line 3: rules[0].when: no condition"}},
		{"no when at all", "rules:\n  - name: a\n", []string{"line 2: rules[0].when: no condition"}},
		{"above and below", "rules:\n  - name: a\n    when:\n      cpu: {above: 0.5, below: 0.1}\n", []string{"line 4: rules[0].when.cpu: give above or below, not both"}},
		{"cpu over one", "rules:\n  - name: a\n    when:\n      cpu:\n        above: 80\n", []string{"line 5: rules[0].when.cpu.above: 80: this is a fraction"}},
		{"clear on wrong side", "rules:\n  - name: a\n    when:\n      cpu: {above: 0.5, clear: 0.7}\n", []string{"line 4: rules[0].when.cpu.clear: 0.7 is on the wrong side"}},
		{"negative clear", "rules:\n  - name: a\n    when:\n      cpu: {above: 0.8, clear: -0.5}\n", []string{"line 4: rules[0].when.cpu.clear: -0.5 is out of the metric's range"}},
		{"clear over one", "rules:\n  - name: a\n    when:\n      memory: {below: 0.2, clear: 1.5}\n", []string{"line 4: rules[0].when.memory.clear: 1.5 is out of the metric's range"}},
		{"margin of a fraction over one", "rules:\n  - name: a\n    when: {cpu: {above: 0.5}}\n    migrate: {by: cpu, margin: 7}\n", []string{"rules[0].migrate.margin: 7: cpu is a fraction"}},
		{"percentage of a count", "rules:\n  - name: a\n    when: {run_queue: {above: 80%}}\n", []string{"line 3: rules[0].when.run_queue.above: 80%: this metric is a count"}},
		{"all weights zero", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      to: weighted\n      weights: {s2: 0, s3: 0}\n", []string{"rules[0].migrate.weights: every weight is 0"}},
		{"fraction out of range", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      fraction: 1.5\n", []string{"line 5: rules[0].migrate.fraction: 1.5"}},
		{"count and fraction", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      count: 2\n      fraction: 0.5\n", []string{"line 5: rules[0].migrate: give count or fraction"}},
		{"bad strategy", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {to: random}\n", []string{`line 4: rules[0].migrate.to: "random"`}},
		{"bad by", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {by: disk}\n", []string{`line 4: rules[0].migrate.by: "disk"`}},
		{"weights without weighted", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {weights: {s2: 1}}\n", []string{"rules[0].migrate.weights: only weighted"}},
		{"negative weight", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      to: weighted\n      weights:\n        s2: -1\n", []string{"line 7: rules[0].migrate.weights.s2: -1"}},
		{"fraction NaN", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {fraction: .nan}\n", []string{"line 4: rules[0].migrate.fraction: NaN"}},
		{"margin NaN", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {margin: .nan}\n", []string{"line 4: rules[0].migrate.margin: NaN: want a number"}},
		{"infinite weight", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      to: weighted\n      weights: {s2: .inf, s3: 1}\n", []string{"rules[0].migrate.weights.s2: +Inf"}},
		{"weights overflow", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      to: weighted\n      weights: {s2: 1e308, s3: 1e308}\n", []string{"rules[0].migrate.weights: the weights add up"}},
		{"margin with weighted", "rules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate: {to: weighted, margin: 0.3}\n", []string{"rules[0].migrate.margin: weighted compares no load"}},
		{"rtt without a unit", "rules:\n  - name: a\n    when: {rtt: {above: 80}}\n", []string{"line 3: rules[0].when.rtt.above: 80: this metric is a time: give its unit"}},
		{"rtt clear without a unit", "rules:\n  - name: a\n    when: {rtt: {above: 80ms, clear: 0.05}}\n", []string{"line 3: rules[0].when.rtt.clear: 0.05: this metric is a time"}},
		{"duration for cpu", "rules:\n  - name: a\n    when: {cpu: {above: 50ms}}\n", []string{"line 3: rules[0].when.cpu.above: 50ms: this metric is not a time"}},
		{"duration for a count", "rules:\n  - name: a\n    when: {conns: {above: 1s}}\n", []string{"line 3: rules[0].when.conns.above: 1s: this metric is not a time"}},
		{"service address not an address", "rules:\n  - name: a\n    service: \"foo:7000\"\n    when: {conns: {above: 5}}\n", []string{`line 3: rules[0].service: "foo:7000": foo is not an IP address`}},
		{"bad service", "rules:\n  - name: a\n    service: web\n    when: {conns: {above: 5}}\n", []string{`line 3: rules[0].service: "web"`}},
		{"bad day", "rules:\n  - name: a\n    when:\n      during:\n        - {days: [mon, funday], from: \"02:00\", to: \"03:00\"}\n", []string{`line 5: rules[0].when.during[0].days[1]: "funday"`}},
		{"bad clock", "rules:\n  - name: a\n    when:\n      during:\n        - from: \"2am\"\n          to: \"03:00\"\n", []string{`line 5: rules[0].when.during[0].from: "2am"`}},
		{"bad timezone", "timezone: Mars/Olympus\n", []string{"line 1: timezone: unknown time zone"}},
		{"two documents", "interval: 1s\n---\ninterval: 2s\n", []string{"line 2: a second YAML document"}},
		{"syntax", "rules: [\n", []string{"line 1: YAML syntax"}},
		{"bad indentation", "\ninterval: 250ms\nrules:\n  - name: a\n    when: {maintenance: true}\nmaintenance: [s1]\n    colour: red\n", []string{"line 7: YAML syntax"}},
		{"unclosed brace", "interval: 1s\nrules:\n  - name: a\n    when: {cpu: {above: 0.5}\n  - name: b\n", []string{"line 4: YAML syntax"}},
		{"tab", "interval: 1s\nrules:\n  - name: a\n\tbad: tab\n", []string{"line 4: YAML syntax", "tab"}},
		{"several problems at once", "rules:\n  - name: a\n    when: {}\n  - name: b\n    when: {cpu: {above: 2}}\n", []string{"line 3: rules[0].when", "line 5: rules[1].when.cpu.above"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.file))
			if err == nil {
				t.Fatalf("no error for:\n%s", tc.file)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestParseDefaults(t *testing.T) {
	pol, err := Parse([]byte(`
rules:
  - name: hot
    service: ":7000"
    when:
      cpu: {above: 80%, clear: 60%, for: 2s}
      rtt: {above: 50ms}
    migrate: {fraction: 0.5}
`))
	if err != nil {
		t.Fatal(err)
	}
	r := pol.Rules[0]
	for _, c := range []struct {
		what      string
		got, want any
	}{
		{"interval", pol.Interval.D(), DefaultInterval},
		{"missed", pol.Peers.Missed, DefaultMissed},
		{"per", pol.Limits.Per.D(), DefaultPer},
		{"conn cooldown", pol.Limits.ConnCooldown.D(), DefaultConnCooldown},
		{"cooldown", r.Cooldown.D(), DefaultCooldown},
		{"strategy", r.Migrate.To, LeastLoaded},
		{"by", r.Migrate.By, MetricConns},
		{"margin", *r.Migrate.Margin, 1.0},
		{"cpu above (percent)", float64(*r.When.CPU.Above), 0.8},
		{"cpu clear", float64(*r.When.CPU.Clear), 0.6},
		{"cpu for", r.When.CPU.For.D(), 2 * time.Second},
		{"rtt above (duration, seconds)", float64(*r.When.RTT.Above), 0.05},
		{"port", r.port, uint16(7000)},
		{"timezone", pol.Timezone, "UTC"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
}

func TestWindows(t *testing.T) {
	pol, err := Parse([]byte(`
timezone: Europe/Paris
rules:
  - name: night
    when:
      during:
        - {days: [sat], from: "22:00", to: "02:00"}
        - {days: [mon], from: "09:00", to: "09:30"}
`))
	if err != nil {
		t.Fatal(err)
	}
	paris, _ := time.LoadLocation("Europe/Paris")
	ws := pol.Rules[0].When.During
	at := func(s string) time.Time {
		tm, err := time.ParseInLocation("2006-01-02 15:04", s, paris)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	for _, tc := range []struct {
		when string
		want bool
	}{
		{"2025-03-01 21:59", false}, // Saturday
		{"2025-03-01 22:00", true},
		{"2025-03-01 23:59", true},
		{"2025-03-02 01:59", true}, // Sunday morning: Saturday's window
		{"2025-03-02 02:00", false},
		{"2025-03-02 23:00", false}, // Sunday evening: no window
		{"2025-03-03 09:15", true},  // Monday
		{"2025-03-03 09:30", false},
		{"2025-03-04 09:15", false}, // Tuesday
	} {
		tm := at(tc.when)
		got := ws[0].contains(tm.UTC(), pol.loc) || ws[1].contains(tm.UTC(), pol.loc)
		if got != tc.want {
			t.Errorf("%s (%s): in window = %v, want %v", tc.when, tm.Weekday(), got, tc.want)
		}
	}
}

// TestWindowsClockChange: on the days the clocks change, windows follow
// the clock, not the time elapsed since midnight.
func TestWindowsClockChange(t *testing.T) {
	pol, err := Parse([]byte(`
timezone: Europe/Paris
rules:
  - name: office
    when: {during: [{from: "09:00", to: "17:00"}]}
  - name: sunday-night
    when: {during: [{days: [sun], from: "02:00", to: "04:00"}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	paris, _ := time.LoadLocation("Europe/Paris")
	for _, tc := range []struct {
		rule int
		when string
		want bool
	}{
		// 2026-03-29: 02:00 becomes 03:00.
		{0, "2026-03-29 08:59", false},
		{0, "2026-03-29 09:30", true},
		{0, "2026-03-29 16:59", true},
		{0, "2026-03-29 17:30", false},
		{1, "2026-03-29 01:59", false},
		{1, "2026-03-29 03:30", true},
		{1, "2026-03-29 04:30", false},
		// 2026-10-25: 03:00 becomes 02:00.
		{0, "2026-10-25 08:30", false},
		{0, "2026-10-25 09:00", true},
		{0, "2026-10-25 16:59", true},
		{0, "2026-10-25 17:00", false},
		{1, "2026-10-25 03:30", true},
		{1, "2026-10-25 04:00", false},
	} {
		tm, err := time.ParseInLocation("2006-01-02 15:04", tc.when, paris)
		if err != nil {
			t.Fatal(err)
		}
		if got := pol.Rules[tc.rule].When.During[0].contains(tm.UTC(), pol.loc); got != tc.want {
			t.Errorf("%s, rule %s: in window = %v, want %v", tc.when, pol.Rules[tc.rule].Name, got, tc.want)
		}
	}
}

// TestServers: the server names a policy mentions, each once, for the
// daemon to check against its pool.
func TestServers(t *testing.T) {
	pol, err := Parse([]byte("maintenance: [s3, s1]\nrules:\n  - name: a\n    when: {conns: {above: 5}}\n    migrate:\n      to: weighted\n      weights: {s2: 1, s4: 2}\n      targets: [s2]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(pol.Servers(), ","); got != "s1,s2,s3,s4" {
		t.Fatalf("Servers() = %s, want s1,s2,s3,s4", got)
	}
}

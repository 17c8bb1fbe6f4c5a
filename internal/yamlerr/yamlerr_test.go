package yamlerr

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

type inner struct{ A int }

type config struct {
	Peers  []string      `yaml:"peers"`
	Missed int           `yaml:"missed"`
	Rate   float64       `yaml:"rate"`
	On     bool          `yaml:"on"`
	Inner  inner         `yaml:"inner"`
	Idle   time.Duration `yaml:"idle"`
	Queue  uint16        `yaml:"queue"`
}

func TestExplain(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"colour: blue\n", "line 1: field colour not found (unknown key)"},
		{"peers: s3\n", "line 1: want a list, e.g. [a, b], not a string (s3)"},
		{"missed: three\n", "line 1: want a whole number, not a string (three)"},
		{"rate: fast\n", "line 1: want a number, not a string (fast)"},
		{"on: maybe\n", "line 1: want true or false, not a string (maybe)"},
		{"inner: [1]\n", "line 1: want a mapping of keys to values, not a list"},
		{"idle: soon\n", "line 1: want a duration such as 500ms, 10s or 24h, not a string (soon)"},
		{"queue: 70000\n", "line 1: 70000 is out of range (uint16)"},
		{"queue: -1\n", "line 1: -1 is out of range (uint16)"},
		{"peers: {a: 1}\nmissed: x\n", "line 1: want a list, e.g. [a, b], not a mapping\nline 2: want a whole number, not a string (x)"},
	} {
		dec := yaml.NewDecoder(strings.NewReader(tc.yaml))
		dec.KnownFields(true)
		var c config
		err := Explain(dec.Decode(&c))
		if err == nil || err.Error() != tc.want {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

func TestEmpty(t *testing.T) {
	for doc, want := range map[string]bool{"a: 1\n---\n": true, "a: 1\n--- # nothing\n": true, "a: 1\n---\nb: 2\n": false} {
		dec := yaml.NewDecoder(strings.NewReader(doc))
		var first, second yaml.Node
		if err := dec.Decode(&first); err != nil {
			t.Fatal(err)
		}
		dec.Decode(&second)
		if got := Empty(&second); got != want {
			t.Errorf("%q: Empty = %v, want %v", doc, got, want)
		}
	}
}

func TestPlace(t *testing.T) {
	doc := "peers:\n  - name: s2\n    addrs: [10.0.0.1, \"10.0.0.300\"]\n"
	err := Place([]byte(doc), errors.New(`ParseAddr("10.0.0.300"): IPv4 field has value >255`))
	if want := `line 3: peers[0].addrs[1]: ParseAddr("10.0.0.300")`; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Place: %v, want it to start %q", err, want)
	}
	plain := errors.New("line 1: something else")
	if got := Place([]byte(doc), plain); got != plain {
		t.Errorf("an error with a line: %v, want it as it was", got)
	}
}

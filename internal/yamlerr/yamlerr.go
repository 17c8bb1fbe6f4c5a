package yamlerr

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"go.yaml.in/yaml/v3"
)

var (
	// inTypeRE is the Go type named in unknown-key errors.
	inTypeRE = regexp.MustCompile(` in type [A-Za-z0-9_.]+`)
	// unmarshalRE matches the errors of a value of the wrong kind: its
	// YAML kind, the value, the Go type wanted.
	unmarshalRE = regexp.MustCompile("cannot unmarshal !!(\\w+)(?: `([^`]*)`)? into (\\S+)")
	// kinds names the YAML kinds.
	kinds = map[string]string{"map": "a mapping", "seq": "a list", "str": "a string", "int": "a number", "float": "a number", "bool": "true or false", "null": "nothing"}
)

// Explain rewrites a decoding error's text: "field x not found (unknown
// key)", "want a list, e.g. [a, b], not a string (s3)". The decoder's
// "yaml: unmarshal errors:" heading goes; each problem keeps its line.
func Explain(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	msg = strings.Replace(msg, "yaml: unmarshal errors:\n  ", "", 1)
	msg = strings.ReplaceAll(msg, "\n  line ", "\nline ")
	msg = inTypeRE.ReplaceAllString(msg, " (unknown key)")
	msg = unmarshalRE.ReplaceAllStringFunc(msg, func(s string) string {
		g := unmarshalRE.FindStringSubmatch(s)
		if g[1] == "int" && (strings.HasPrefix(g[3], "int") || strings.HasPrefix(g[3], "uint")) {
			return fmt.Sprintf("%s is out of range (%s)", g[2], g[3])
		}
		got := kinds[g[1]]
		if got == "" {
			got = "!!" + g[1]
		}
		if g[2] != "" {
			got += fmt.Sprintf(" (%s)", g[2])
		}
		return "want " + wanted(g[3]) + ", not " + got
	})
	return errors.New(msg)
}

// wanted names what a Go type holds.
func wanted(t string) string {
	switch {
	case t == "time.Duration":
		return "a duration such as 500ms, 10s or 24h"
	case strings.HasPrefix(t, "[]"):
		return "a list, e.g. [a, b]"
	case strings.HasPrefix(t, "map["), strings.Contains(t, "."):
		return "a mapping of keys to values"
	case strings.HasPrefix(t, "int"), strings.HasPrefix(t, "uint"):
		return "a whole number"
	case strings.HasPrefix(t, "float"):
		return "a number"
	case t == "bool":
		return "true or false"
	}
	return "a " + t
}

// parsedRE finds the text a value's parser refused in its error
// (netip's `ParseAddr("10.1.2.300"): ...`).
var parsedRE = regexp.MustCompile(`\("([^"]*)"\)`)

// Place gives a decoding error that has no line (a value's own
// parser refused it, as netip does an address) the line and key of the
// value it names, so that an operator can tell which of many addresses is
// wrong.
func Place(b []byte, err error) error {
	m := parsedRE.FindStringSubmatch(err.Error())
	if m == nil || strings.Contains(err.Error(), "line ") {
		return err
	}
	var root yaml.Node
	if yaml.Unmarshal(b, &root) != nil {
		return err
	}
	var find func(n *yaml.Node, path string) (*yaml.Node, string)
	find = func(n *yaml.Node, path string) (*yaml.Node, string) {
		switch n.Kind {
		case yaml.ScalarNode:
			if n.Value == m[1] {
				return n, path
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				p := n.Content[i].Value
				if path != "" {
					p = path + "." + p
				}
				if f, fp := find(n.Content[i+1], p); f != nil {
					return f, fp
				}
			}
		default:
			for i, c := range n.Content {
				p := path
				if n.Kind == yaml.SequenceNode {
					p = fmt.Sprintf("%s[%d]", path, i)
				}
				if f, fp := find(c, p); f != nil {
					return f, fp
				}
			}
		}
		return nil, ""
	}
	n, path := find(&root, "")
	if n == nil {
		return err
	}
	return fmt.Errorf("line %d: %s: %w", n.Line, path, err)
}

// Empty reports whether n, a document the decoder read after the first,
// holds nothing: a trailing "---", perhaps with comments.
func Empty(n *yaml.Node) bool {
	if n.Kind == yaml.DocumentNode && len(n.Content) == 1 {
		n = n.Content[0]
	}
	return n.Kind == 0 || n.Kind == yaml.DocumentNode && len(n.Content) == 0 ||
		n.Kind == yaml.ScalarNode && n.Tag == "!!null" && n.Value == ""
}

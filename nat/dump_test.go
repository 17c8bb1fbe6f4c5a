package nat

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// elems makes the elements keyed by the letters of keys; a letter's data
// is the letter after it in the alphabet when it is upper case (a newer
// version of that element).
func elems(keys string) []rawElem {
	var out []rawElem
	for _, k := range keys {
		lower := strings.ToLower(string(k))
		e := rawElem{key: []byte(lower), data: []byte(lower)}
		if lower != string(k) {
			e.data = []byte{byte(lower[0]) + 1}
		}
		out = append(out, e)
	}
	return out
}

func keysOf(els []rawElem) string {
	var b strings.Builder
	for _, e := range els {
		b.Write(e.key)
		if string(e.data) != string(e.key) {
			b.WriteString("'")
		}
	}
	return b.String()
}

type fakeDump struct {
	keys  []string // what each dump lists
	parts []int    // in how many datagrams
	err   error    // returned by the dump after the last of keys
	calls int
}

func (f *fakeDump) dump() ([]rawElem, int, error) {
	i := f.calls
	f.calls++
	if i >= len(f.keys) {
		if f.err != nil {
			return nil, 0, f.err
		}
		i = len(f.keys) - 1
	}
	return elems(f.keys[i]), f.parts[min(i, len(f.parts)-1)], nil
}

func TestSettle(t *testing.T) {
	broken := errors.New("netlink went away")
	for _, tc := range []struct {
		name  string
		dump  fakeDump
		want  string // keys, "'" after one with newer data; sorted
		calls int
		err   error
	}{
		{name: "one datagram is taken as it is", dump: fakeDump{keys: []string{"ac"}, parts: []int{1}}, want: "ac", calls: 1},
		{name: "several datagrams are read twice", dump: fakeDump{keys: []string{"abc", "abc"}, parts: []int{3}}, want: "abc", calls: 2},
		{name: "an element missed the first time is read again",
			dump: fakeDump{keys: []string{"ac", "abc", "abc"}, parts: []int{2}}, want: "abc", calls: 3},
		{name: "a set that keeps changing gives all it listed, as last seen",
			dump: fakeDump{keys: []string{"ac", "ab", "Bc"}, parts: []int{2}}, want: "ab'c", calls: 3},
		{name: "an element gone meanwhile is kept from the earlier dumps",
			dump: fakeDump{keys: []string{"abc", "ab", "bc"}, parts: []int{2}}, want: "abc", calls: 3},
		{name: "dumps with repeated keys are read again",
			dump: fakeDump{keys: []string{"abca", "abc", "abcb", "abc"}, parts: []int{3}}, want: "abc", calls: 4},
		{name: "a dump's error is returned", dump: fakeDump{keys: []string{"abc"}, parts: []int{2}, err: broken}, err: broken, calls: 2},
		{name: "repeated keys every time", dump: fakeDump{keys: []string{"aa"}, parts: []int{2}}, err: errDumpRepeats, calls: dumpAttempts},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := settle(tc.dump.dump)
			if !errors.Is(err, tc.err) || tc.err == nil && err != nil {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if s := sortedKeys(got); tc.err == nil && s != tc.want {
				t.Errorf("settled on %q, want %q", s, tc.want)
			}
			if tc.dump.calls != tc.calls {
				t.Errorf("%d dumps, want %d", tc.dump.calls, tc.calls)
			}
		})
	}
}

// sortedKeys is keysOf with the elements in key order.
func sortedKeys(els []rawElem) string {
	s := slices.Clone(els)
	slices.SortFunc(s, func(a, b rawElem) int { return strings.Compare(string(a.key), string(b.key)) })
	return keysOf(s)
}

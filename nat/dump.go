package nat

import (
	"errors"
	"slices"
	"time"
)

// rawElem is one set element as a dump reads it back.
type rawElem struct {
	key, data []byte
	expires   time.Duration
}

// dumpAttempts bounds the re-reads of a set whose dump repeated elements.
const dumpAttempts = 20

// settleDumps bounds the dumps of a set that settle compares: after that
// many without two in a row alike, it takes everything they saw.
const settleDumps = 3

// errDumpRepeats is settle's error when every dump repeated elements.
var errDumpRepeats = errors.New("dumps kept repeating elements (the set keeps being resized or changed); try again")

// settle reads a set with dump, which returns its elements and how many
// datagrams the kernel sent them in, until it can trust what it read.
//
// The kernel walks the set once per datagram, resuming each walk by
// skipping as many elements as it has sent, in hash-table order. A dump
// that fits one datagram is one walk, whole. A longer one can go wrong
// in two ways:
//   - If the table is resized between two datagrams (it grows after a
//     big batch, in deferred work), the order changes and the dump
//     repeats some elements and misses as many others: seen here right
//     after adding 10,000 elements, ~10% duplicates. A dump with a
//     duplicate key is read again, up to dumpAttempts times.
//   - If an element the walk has passed goes between two datagrams (the
//     kernel expires it, or a daemon removes it), the next walk skips one
//     element it never sent: missed with no duplicate to show for it. So
//     a dump of several datagrams is read again until two in a row list
//     the same keys; after settleDumps of them without that (a set that
//     keeps changing), settle returns every element they listed, each
//     as last seen. Of those, elements gone meanwhile are harmless to
//     callers (removals skip absent elements, refreshes look elements
//     up), while an element missed would be left behind by a Reconcile.
func settle(dump func() ([]rawElem, int, error)) ([]rawElem, error) {
	var (
		prev  []rawElem
		seen  = map[string]rawElem{} // every key the good dumps listed, as last seen
		order []string               // seen's keys in the order first listed
		good  int
	)
	for range dumpAttempts {
		els, parts, err := dump()
		if err != nil {
			return nil, err
		}
		if hasDuplicateKey(els) {
			time.Sleep(time.Millisecond) // let the resize finish
			continue
		}
		if parts <= 1 || prev != nil && sameKeys(prev, els) {
			return els, nil
		}
		for _, e := range els {
			if _, ok := seen[string(e.key)]; !ok {
				order = append(order, string(e.key))
			}
			seen[string(e.key)] = e
		}
		if good++; good == settleDumps {
			out := make([]rawElem, len(order))
			for i, k := range order {
				out[i] = seen[k]
			}
			return out, nil
		}
		prev = els
	}
	return nil, errDumpRepeats
}

// hasDuplicateKey reports whether two of els have the same key.
func hasDuplicateKey(els []rawElem) bool {
	seen := make(map[string]struct{}, len(els))
	for _, e := range els {
		if _, ok := seen[string(e.key)]; ok {
			return true
		}
		seen[string(e.key)] = struct{}{}
	}
	return false
}

// sameKeys reports whether a and b, each without duplicate keys, list the
// same keys (in any order).
func sameKeys(a, b []rawElem) bool {
	if len(a) != len(b) {
		return false
	}
	in := make(map[string]struct{}, len(a))
	for _, e := range a {
		in[string(e.key)] = struct{}{}
	}
	return !slices.ContainsFunc(b, func(e rawElem) bool {
		_, ok := in[string(e.key)]
		return !ok
	})
}

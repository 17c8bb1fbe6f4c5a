// Package stream generates and verifies test byte streams in which every
// byte depends on its offset, so that a receiver detects at once, and at
// the exact offset, any byte lost, duplicated or reordered.
//
// It is pure Go and used by the tests of repair/ and tests/.
package stream

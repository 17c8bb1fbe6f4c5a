package app

import (
	"maps"
	"time"
)

// SetAllowUID replaces the peer uid check of r, which Serve otherwise
// derives from the socket's owner. Call it before Serve.
func SetAllowUID(r *Registry, allow func(uid uint32) bool) { r.allowUID = allow }

// SetOfferedVersion makes Serve offer protocol versions up to v (instead
// of the latest) until restore is called.
func SetOfferedVersion(v int) (restore func()) {
	old := offeredVersion.Swap(int32(v))
	return func() { offeredVersion.Store(old) }
}

// Frames returns how many frames r's application connections carried so
// far, by direction and type: "->export-many" (sent), "<-exported-many"
// (received).
func Frames(r *Registry) map[string]int {
	r.frames.mu.Lock()
	defer r.frames.mu.Unlock()
	return maps.Clone(r.frames.n)
}

// SetFrozenWait replaces how long an exported connection left without a
// verdict may stay frozen, until restore is called.
func SetFrozenWait(d time.Duration) (restore func()) {
	old := frozenWait
	frozenWait = d
	return func() { frozenWait = old }
}

// MaxBatch is the most items in one frame.
const MaxBatch = maxBatch

// OpenFDs counts this process's open descriptors.
var OpenFDs = openFDs

// ProtocolVersion is the highest protocol version this package speaks.
const ProtocolVersion = protocolVersion

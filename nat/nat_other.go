//go:build !linux

package nat

// Table is mtcp's nftables table. nftables exists only on Linux: elsewhere
// Open returns an error wrapping ErrUnsupported and no Table exists.
type Table struct{}

// Open returns an error wrapping ErrUnsupported: nftables exists only on
// Linux.
func Open(o Options) (*Table, error) {
	return nil, &OpError{Op: "open", Table: "inet " + o.Table, Err: ErrUnsupported}
}

// Options returns the zero Options.
func (t *Table) Options() Options { return Options{} }

// Apply returns an error wrapping ErrUnsupported.
func (t *Table) Apply(b *Batch) error { return &OpError{Op: "apply", Err: ErrUnsupported} }

// ApplyThen returns an error wrapping ErrUnsupported.
func (t *Table) ApplyThen(b *Batch, then func() error) error {
	return &OpError{Op: "apply", Err: ErrUnsupported}
}

// Flows returns an error wrapping ErrUnsupported.
func (t *Table) Flows() ([]Entry, error) { return nil, &OpError{Op: "flows", Err: ErrUnsupported} }

// Prune returns an error wrapping ErrUnsupported.
func (t *Table) Prune() (int, error) { return 0, &OpError{Op: "prune", Err: ErrUnsupported} }

// Refresh returns an error wrapping ErrUnsupported.
func (t *Table) Refresh(flows []Flow) (int, error) {
	return 0, &OpError{Op: "refresh", Err: ErrUnsupported}
}

// Reconcile returns an error wrapping ErrUnsupported.
func (t *Table) Reconcile(keep func(Entry) bool) error {
	return &OpError{Op: "reconcile", Err: ErrUnsupported}
}

// Close does nothing.
func (t *Table) Close() error { return nil }

// Destroy returns an error wrapping ErrUnsupported.
func (t *Table) Destroy() error { return &OpError{Op: "destroy", Err: ErrUnsupported} }

// Queue reads NFQUEUE. NFQUEUE exists only on Linux: elsewhere OpenQueue
// returns an error wrapping ErrUnsupported.
type Queue struct{}

// OpenQueue returns an error wrapping ErrUnsupported: NFQUEUE exists only
// on Linux.
func OpenQueue(o Options) (*Queue, error) {
	return nil, &OpError{Op: "open", Table: "queue", Err: ErrUnsupported}
}

// Held returns 0.
func (q *Queue) Held() int { return 0 }

// HeldOf returns 0.
func (q *Queue) HeldOf(Flow) int { return 0 }

// Release returns an error wrapping ErrUnsupported.
func (q *Queue) Release(flows ...Flow) (int, error) {
	return 0, &OpError{Op: "release", Err: ErrUnsupported}
}

// Pass returns an error wrapping ErrUnsupported.
func (q *Queue) Pass(flows ...Flow) (int, error) {
	return 0, &OpError{Op: "pass", Err: ErrUnsupported}
}

// EndPass returns an error wrapping ErrUnsupported.
func (q *Queue) EndPass(flows ...Flow) error { return &OpError{Op: "end pass", Err: ErrUnsupported} }

// ReleaseAll returns an error wrapping ErrUnsupported.
func (q *Queue) ReleaseAll() (int, error) { return 0, &OpError{Op: "release", Err: ErrUnsupported} }

// Close does nothing.
func (q *Queue) Close() error { return nil }

// Done returns a closed channel: there is no reader.
func (q *Queue) Done() <-chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// Err returns nil.
func (q *Queue) Err() error { return nil }

package app_test

import (
	"context"
	"net"
	"testing"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// BenchmarkMigrate1000 moves 1,000 live loopback connections from one
// application to another and back, as a drain does: export, import,
// commit, once per connection ("single": Export, Import, Finish) and in
// batches ("batch": ExportMany, ImportMany, FinishMany). µs/conn is the
// cost of moving one connection.
func BenchmarkMigrate1000(b *testing.B) {
	const n = 1000 // 4 descriptors each at the peak, well under RLIMIT_NOFILE
	// The handler waits for the client, which says nothing, and carries
	// a small snapshot: the library's own cost is what is measured.
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		var buf [1]byte
		_, err := conn.Read(buf[:])
		if snap == nil {
			snap = []byte("session state")
		}
		return snap, err
	})
	srv := [2]*apptest.Server{apptest.Start(b, "A", h), apptest.Start(b, "B", h)}
	ts := make([]app.Tuple, n)
	for i := range ts {
		ts[i] = apptest.TupleOf(srv[0].Dial(b))
	}
	apptest.Eventually(b, apptest.Timeout, "the connections", func() (bool, string) {
		return len(srv[0].Registry.Conns(srv[0].Service)) == n, ""
	})
	at := 0 // where the connections are
	ctx := context.Background()
	moves := map[string]func(from, to *apptest.Server){
		"single": func(from, to *apptest.Server) {
			for _, t := range ts {
				e, err := from.Registry.Export(ctx, from.Service, t)
				if err != nil {
					b.Fatal(err)
				}
				if err := to.Registry.Import(ctx, to.Service, e.Socket, e.Snapshot); err != nil {
					b.Fatal(err)
				}
				if err := e.Finish(ctx, true); err != nil {
					b.Fatal(err)
				}
				e.Socket.Close()
			}
		},
		"batch": func(from, to *apptest.Server) {
			exps, errs := from.Registry.ExportMany(ctx, from.Service, ts)
			for _, err := range errs {
				if err != nil {
					b.Fatal(err)
				}
			}
			socks, snaps := socketsOf(exps)
			for _, err := range to.Registry.ImportMany(ctx, to.Service, socks, snaps) {
				if err != nil {
					b.Fatal(err)
				}
			}
			for _, err := range app.FinishMany(ctx, exps, true) {
				if err != nil {
					b.Fatal(err)
				}
			}
			for _, e := range exps {
				e.Socket.Close()
			}
		},
	}
	for _, mode := range []string{"single", "batch"} {
		b.Run(mode, func(b *testing.B) {
			for b.Loop() {
				moves[mode](srv[at], srv[1-at])
				at = 1 - at
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/1e3/float64(b.N*n), "µs/conn")
		})
	}
	if got := len(srv[at].Registry.Conns(srv[at].Service)); got != n {
		b.Fatalf("%s reports %d connections, want %d", srv[at].Name, got, n)
	}
}

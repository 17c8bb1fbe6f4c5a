package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/app"
	"github.com/mtcp-dev/mtcp/app/apptest"
)

// dialN connects n clients to s, has each send a first line and waits
// until s's application reports them all.
func dialN(t *testing.T, s *apptest.Server, n int) ([]*client, []app.Tuple) {
	t.Helper()
	cs := make([]*client, n)
	ts := make([]app.Tuple, n)
	for i := range cs {
		cs[i] = dial(t, s)
		ts[i] = apptest.TupleOf(cs[i].c)
		cs[i].do(t, "x", "1 "+s.Name+" x")
	}
	apptest.Eventually(t, apptest.Timeout, fmt.Sprintf("%s to report %d connections", s.Name, n), func() (bool, string) {
		got := len(s.Registry.Conns(s.Service))
		return got == n, fmt.Sprint(got)
	})
	return cs, ts
}

// closeSockets closes the daemon's copies of the exported sockets, as
// mtcpd does once they are finished.
func closeSockets(exps []*app.Exported) {
	for _, e := range exps {
		if e != nil {
			e.Socket.Close()
		}
	}
}

// socketsOf returns the sockets and snapshots of exports, to import them.
func socketsOf(exps []*app.Exported) ([]syscall.Conn, [][]byte) {
	socks := make([]syscall.Conn, len(exps))
	snaps := make([][]byte, len(exps))
	for i, e := range exps {
		if e != nil {
			socks[i], snaps[i] = e.Socket, e.Snapshot
		}
	}
	return socks, snaps
}

func noErrors(t *testing.T, what string, errs []error) {
	t.Helper()
	n := 0
	for i, err := range errs {
		if err != nil {
			if n < 5 {
				t.Errorf("%s %d: %v", what, i, err)
			}
			n++
		}
	}
	if n > 0 {
		t.Fatalf("%s: %d of %d failed", what, n, len(errs))
	}
}

// frameDelta returns how many frames of each type r carried since before.
func frameDelta(r *app.Registry, before map[string]int) map[string]int {
	d := app.Frames(r)
	for k, v := range before {
		d[k] -= v
		if d[k] == 0 {
			delete(d, k)
		}
	}
	return d
}

func TestBatchMigrate1000(t *testing.T) {
	const n = 1000
	// At the peak each connection has 4 descriptors here: the client's,
	// A's, the daemon's copy and B's. (Go raises the soft limit to the
	// hard one.)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < 4*n+500 {
		t.Skipf("RLIMIT_NOFILE is %d, %d connections need %d descriptors", lim.Cur, n, 4*n+500)
	}
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	cs, ts := dialN(t, a, n)
	aFrames, bFrames := app.Frames(a.Registry), app.Frames(b.Registry)

	exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, ts)
	t.Cleanup(func() { closeSockets(exps) })
	noErrors(t, "export", errs)
	for i, e := range exps {
		var st counterState
		if err := json.Unmarshal(e.Snapshot, &st); err != nil || st.N != 1 || e.Tuple != ts[i] {
			t.Fatalf("export %d: %v with snapshot %q (%v), want %v with n=1", i, e.Tuple, e.Snapshot, err, ts[i])
		}
	}
	socks, snaps := socketsOf(exps)
	noErrors(t, "import", b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps))
	noErrors(t, "commit", app.FinishMany(ctxT(t), exps, true))
	closeSockets(exps)
	for _, c := range cs {
		c.do(t, "y", "2 B y")
	}
	if got := a.Registry.Conns(a.Service); len(got) != 0 {
		t.Errorf("A still reports %d connections", len(got))
	}
	if got := b.Registry.Conns(b.Service); len(got) != n {
		t.Errorf("B reports %d connections, want %d", len(got), n)
	}
	// A handful of frames, none of the one-by-one protocol.
	chunks := (n + app.MaxBatch - 1) / app.MaxBatch
	da, db := frameDelta(a.Registry, aFrames), frameDelta(b.Registry, bFrames)
	t.Logf("frames: A %v, B %v", da, db)
	if da["->export-many"] != chunks || da["->verdict-many"] != chunks || da["<-finished-many"] != chunks ||
		da["<-exported-many"] < chunks || da["<-exported-many"] > n/10 || da["->export"]+da["->verdict"] != 0 {
		t.Errorf("A's registry exchanged %v for %d connections", da, n)
	}
	if db["->import-many"] != chunks || db["<-imported-many"] != chunks || db["<-opened"] != chunks || db["->import"] != 0 {
		t.Errorf("B's registry exchanged %v for %d connections", db, n)
	}

	// Export again, and abort: every connection resumes on B, and what
	// the clients sent meanwhile is served.
	exps, errs = b.Registry.ExportMany(ctxT(t), b.Service, ts)
	t.Cleanup(func() { closeSockets(exps) })
	noErrors(t, "export", errs)
	for _, c := range cs {
		c.send(t, "z\n")
	}
	noErrors(t, "resume", app.FinishMany(ctxT(t), exps, false))
	closeSockets(exps)
	for _, c := range cs {
		if got := c.line(t); got != "3 B z" {
			t.Fatalf("got %q, want 3 B z", got)
		}
	}
	// Finished is finished: a later Finish returns the first result and
	// does nothing (the connections stay on B).
	for _, e := range exps[:10] {
		if err := e.Finish(ctxT(t), true); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range cs {
		c.do(t, "w", "4 B w")
	}
	if got := b.Registry.Conns(b.Service); len(got) != n {
		t.Errorf("B reports %d connections, want %d", len(got), n)
	}
}

// modal is the counter, but a session that said "end" ends when asked to
// migrate, and one that said "big" returns a snapshot over the limit.
func modal(name string) app.Handler {
	type state struct {
		counterState
		Mode string `json:"mode"`
		Pad  []byte `json:"pad,omitempty"`
	}
	return app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		var st state
		if snap != nil {
			if err := json.Unmarshal(snap, &st); err != nil {
				return nil, err
			}
		}
		st.Pad = nil
		buf := make([]byte, 4096)
		for {
			for {
				i := strings.IndexByte(string(st.In), '\n')
				if i < 0 {
					break
				}
				line := string(st.In[:i])
				st.In = st.In[i+1:]
				st.N++
				if line == "end" || line == "big" {
					st.Mode = line
				}
				if _, err := fmt.Fprintf(conn, "%d %s %s\n", st.N, name, line); err != nil {
					return nil, err
				}
			}
			n, err := conn.Read(buf)
			st.In = append(st.In, buf[:n]...)
			switch {
			case errors.Is(err, app.ErrMigrating) && st.Mode == "end":
				return nil, nil
			case errors.Is(err, app.ErrMigrating) && st.Mode == "big":
				st.Pad = make([]byte, app.MaxSnapshot)
				return json.Marshal(&st)
			case errors.Is(err, app.ErrMigrating):
				return json.Marshal(&st)
			case errors.Is(err, io.EOF):
				return nil, nil
			case err != nil:
				return nil, err
			}
		}
	})
}

func TestBatchMixedErrors(t *testing.T) {
	a := apptest.Start(t, "A", modal("A"))
	b := apptest.Start(t, "B", modal("B"))
	cs, ts := dialN(t, a, 5)
	cs[2].do(t, "end", "2 A end")
	cs[3].do(t, "big", "2 A big")
	pre := apptest.Export(t, a, ts[1]) // already being exported
	unknown := app.Tuple{Local: netip.MustParseAddrPort(a.Service), Remote: netip.MustParseAddrPort("127.0.0.1:1")}

	batch := []app.Tuple{ts[0], unknown, ts[1], ts[2], ts[3], ts[4], ts[0], {}}
	want := []string{"", "no such connection", "already being exported", "ended the connection", "snapshot", "", "already being exported", "valid tuple"}
	exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, batch)
	t.Cleanup(func() { closeSockets(exps) })
	for i := range batch {
		switch {
		case want[i] == "" && (errs[i] != nil || exps[i] == nil):
			t.Errorf("item %d: %v, want exported", i, errs[i])
		case want[i] != "" && (exps[i] != nil || errs[i] == nil || !strings.Contains(errs[i].Error(), want[i])):
			t.Errorf("item %d: exported %v, error %v; want an error about %q", i, exps[i] != nil, errs[i], want[i])
		}
	}
	if !errors.Is(errs[1], app.ErrNoConn) {
		t.Errorf("unknown tuple: %v, want ErrNoConn", errs[1])
	}
	// Resume them all, nil entries skipped.
	noErrors(t, "resume", app.FinishMany(ctxT(t), []*app.Exported{exps[0], nil, pre, exps[5]}, false))
	cs[0].do(t, "y", "2 A y")
	cs[1].do(t, "y", "2 A y")
	cs[3].do(t, "y", "3 A y") // resumed with its oversized snapshot
	cs[4].do(t, "y", "2 A y")
	cs[2].c.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if n, err := cs[2].rd.ReadByte(); err != io.EOF {
		t.Errorf("the connection that ended: read %q, %v; want EOF", n, err)
	}
	// Unknown services, verdicts twice.
	_, errs = a.Registry.ExportMany(ctxT(t), "no-such-service", ts[:2])
	for _, err := range errs {
		if !errors.Is(err, app.ErrNoService) {
			t.Errorf("export from an unknown service: %v", err)
		}
	}
	if errs := a.Registry.ImportMany(ctxT(t), "no-such-service", []syscall.Conn{os.Stdin}, [][]byte{nil}); !errors.Is(errs[0], app.ErrNoService) {
		t.Errorf("import into an unknown service: %v", errs[0])
	}

	// An import batch with a bit of everything.
	e := apptest.Export(t, a, ts[0])
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	socks := []syscall.Conn{e.Socket, nil, e.Socket, devnull, e.Socket}
	snaps := [][]byte{e.Snapshot, nil, make([]byte, app.MaxSnapshot+1), nil, e.Snapshot}
	want = []string{"", "no socket", "snapshot", "adopt imported socket", "already serving"}
	ierrs := b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps)
	for i, err := range ierrs {
		if (err == nil) != (want[i] == "") || err != nil && !strings.Contains(err.Error(), want[i]) {
			t.Errorf("import %d: %v, want an error about %q", i, err, want[i])
		}
	}
	if err := e.Finish(ctxT(t), true); err != nil {
		t.Fatal(err)
	}
	e.Socket.Close()
	cs[0].do(t, "z", "3 B z")
	if errs := b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps[:1]); errs[0] == nil || errs[4] == nil {
		t.Errorf("import with fewer snapshots than sockets: %v", errs)
	}
}

// A batch answers with the connections that are ready without waiting
// for a slow handler; the slow one, answered after the caller gave up,
// resumes where it is.
func TestBatchDoesNotWaitForSlowest(t *testing.T) {
	release := make(chan struct{})
	calls := make(chan string, 16)
	h := app.HandlerFunc(func(ctx context.Context, conn net.Conn, snap []byte) ([]byte, error) {
		line := make([]byte, 5)
		if snap == nil {
			if _, err := io.ReadFull(conn, line); err != nil {
				return nil, err
			}
			snap = line
		}
		calls <- string(snap)
		if _, err := conn.Write(snap); err != nil {
			return nil, err
		}
		_, err := conn.Read(make([]byte, 1))
		if string(snap) == "slow\n" {
			<-release // a handler slow to reach its safe point
		}
		return snap, err
	})
	a := apptest.Start(t, "A", h)
	var cs []*client
	var ts []app.Tuple
	for _, s := range []string{"aaaa\n", "slow\n", "bbbb\n"} {
		c := dial(t, a)
		c.send(t, s)
		if got := c.line(t); got+"\n" != s {
			t.Fatalf("got %q, want %q", got, s)
		}
		<-calls
		cs, ts = append(cs, c), append(ts, a.WaitConn(t, c.c))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	exps, errs := a.Registry.ExportMany(ctx, a.Service, ts)
	t.Cleanup(func() { closeSockets(exps) })
	if exps[0] == nil || exps[2] == nil || exps[1] != nil || !errors.Is(errs[1], context.DeadlineExceeded) {
		t.Fatalf("exported %v, errors %v; want the fast ones and a deadline error for the slow one", exps, errs)
	}
	noErrors(t, "resume", app.FinishMany(ctxT(t), exps, false))
	close(release)
	for range 3 {
		<-calls // each resumes, the slow one too
	}
	for _, c := range cs {
		c.c.SetReadDeadline(time.Now().Add(apptest.Timeout))
		if _, err := io.ReadFull(c.rd, make([]byte, 5)); err != nil {
			t.Fatal(err)
		}
	}
}

// Version 1 applications keep working: a daemon asks them one connection
// at a time through the same methods.
func TestBatchWithVersion1App(t *testing.T) {
	restore := app.SetOfferedVersion(1)
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	restore()
	const n = 50
	cs, ts := dialN(t, a, n)
	before := app.Frames(a.Registry)
	exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, append(ts, ts[0]))
	t.Cleanup(func() { closeSockets(exps) })
	noErrors(t, "export", errs[:n])
	if errs[n] == nil || !strings.Contains(errs[n].Error(), "already being exported") {
		t.Errorf("second export of a connection: %v", errs[n])
	}
	exps = exps[:n]
	socks, snaps := socketsOf(exps)
	noErrors(t, "import", b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps))
	noErrors(t, "commit", app.FinishMany(ctxT(t), exps, true))
	closeSockets(exps)
	for _, c := range cs {
		c.do(t, "y", "2 B y")
	}
	d := frameDelta(a.Registry, before)
	if d["->export"] != n+1 || d["->verdict"] != n || d["->export-many"]+d["->verdict-many"] != 0 {
		t.Errorf("A's registry exchanged %v", d)
	}
}

func TestRegisterNegotiatesVersion(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	for i, tc := range []struct {
		reg  string
		want string // the answer's version, or "error"
	}{
		{`"version":1`, "1"},
		{`"version":1,"max_version":2`, "2"},
		{`"version":1,"max_version":3`, "3"},
		{`"version":1,"max_version":4`, "4"},
		{`"version":1,"max_version":7`, "4"},
		{`"version":2`, "2"},
		{`"version":3`, "3"},
		{`"version":4`, "4"},
		{`"version":5,"max_version":6`, "error"},
		{`"max_version":2`, "2"},
		{`"version":0`, "error"},
	} {
		r := dialRaw(t, a.Socket)
		r.frame(t, fmt.Sprintf(`{"type":"register",%s,"service":"neg-%d"}`, tc.reg, i), -1)
		m := r.reply(t)
		got := fmt.Sprint(m["version"])
		if m["type"] == "error" {
			got = "error"
		}
		if got != tc.want {
			t.Errorf("register{%s}: answer %v, want version %s", tc.reg, m, tc.want)
		}
		r.Close()
	}
}

// sameFDs waits until the process has as many descriptors open as n.
func sameFDs(t *testing.T, n int, what string) {
	t.Helper()
	apptest.Eventually(t, apptest.Timeout, what+": descriptors back to "+fmt.Sprint(n), func() (bool, string) {
		got := app.OpenFDs(t)
		return got == n, fmt.Sprint(got)
	})
}

func TestBatchDescriptorAccounting(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	cs, ts := dialN(t, a, 300) // more than one frame's worth
	base := app.OpenFDs(t)

	exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, ts)
	noErrors(t, "export", errs)
	if got := app.OpenFDs(t); got != base+len(ts) {
		t.Errorf("%d descriptors after exporting %d connections, want %d", got, len(ts), base+len(ts))
	}
	noErrors(t, "resume", app.FinishMany(ctxT(t), exps, false))
	closeSockets(exps)
	sameFDs(t, base, "resumed")

	exps, errs = a.Registry.ExportMany(ctxT(t), a.Service, ts)
	noErrors(t, "export", errs)
	socks, snaps := socketsOf(exps)
	noErrors(t, "import", b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps))
	noErrors(t, "commit", app.FinishMany(ctxT(t), exps, true))
	closeSockets(exps)
	// A's descriptor of each connection went, B's came.
	sameFDs(t, base, "migrated")
	cs[0].do(t, "y", "2 B y")
}

// framer sends raw frames with any number of descriptors.
func (r raw) frameFDs(t *testing.T, body string, fds ...int) {
	t.Helper()
	b := append(binaryLen(body), body...)
	var oob []byte
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	if _, _, err := r.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func binaryLen(body string) []byte {
	n := len(body)
	return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
}

// The registry drops an application whose answer to a batch does not
// add up, and keeps no descriptor of it.
func TestBatchAnswerProtocolErrors(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	dn := int(devnull.Fd())
	t1 := app.Tuple{Local: netip.MustParseAddrPort("10.0.0.1:80"), Remote: netip.MustParseAddrPort("10.0.0.2:1000")}
	t2 := app.Tuple{Local: netip.MustParseAddrPort("10.0.0.1:80"), Remote: netip.MustParseAddrPort("10.0.0.2:1001")}
	many := func(n int) string {
		var items []string
		for i := range n {
			items = append(items, fmt.Sprintf(`{"id":%d,"error":"x"}`, 1000000+i))
		}
		return strings.Join(items, ",")
	}
	for _, tc := range []struct {
		name string
		// answer answers the export-many request with item ids i1, i2.
		answer func(r raw, id, i1, i2 float64)
		ok     int // items exported before the violation was noticed
	}{
		{"fewer descriptors than items", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":2,"items":[{"id":%v,"fd":true},{"id":%v,"fd":true}]}`, id, i1, i2), dn)
		}, 0},
		{"more descriptors than items", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":3,"items":[{"id":%v,"fd":true},{"id":%v,"fd":true}]}`, id, i1, i2), dn, dn, dn)
		}, 0},
		{"descriptors sent, not claimed", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":1,"items":[{"id":%v,"fd":true}]}`, id, i1), dn, dn, dn)
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"items":[{"id":%v,"error":"no"}]}`, id, i2))
		}, 1},
		{"descriptor with an error", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":1,"items":[{"id":%v,"fd":true,"error":"x"}]}`, id, i1), dn)
		}, 0},
		{"unknown item", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":1,"items":[{"id":%v,"fd":true}]}`, id, i2+100), dn)
		}, 0},
		{"item twice", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"fds":2,"items":[{"id":%v,"fd":true},{"id":%v,"fd":true}]}`, id, i1, i1), dn, dn)
		}, 0},
		{"no items", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"items":[]}`, id))
		}, 0},
		{"too many items", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"exported-many","id":%v,"items":[%s]}`, id, many(app.MaxBatch+1)))
		}, 0},
		{"wrong answer type", func(r raw, id, i1, i2 float64) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"imported-many","id":%v,"items":[{"id":%v}]}`, id, i1))
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := "raw-" + strings.ReplaceAll(tc.name, " ", "-")
			base := app.OpenFDs(t)
			r := dialRaw(t, a.Socket)
			r.frame(t, fmt.Sprintf(`{"type":"register","version":1,"max_version":2,"service":%q}`, svc), -1)
			if m := r.reply(t); m["type"] != "registered" || m["version"] != 2.0 {
				t.Fatalf("answer %v", m)
			}
			type result struct {
				exps []*app.Exported
				errs []error
			}
			done := make(chan result, 1)
			go func() {
				exps, errs := a.Registry.ExportMany(ctxT(t), svc, []app.Tuple{t1, t2})
				done <- result{exps, errs}
			}()
			m := r.reply(t)
			items, _ := m["items"].([]any)
			if m["type"] != "export-many" || m["service"] != svc || len(items) != 2 {
				t.Fatalf("request %v", m)
			}
			id := func(i int) float64 { return items[i].(map[string]any)["id"].(float64) }
			tc.answer(r, m["id"].(float64), id(0), id(1))
			closedOrReset(t, r)
			r.Close()
			res := <-done
			ok := 0
			for i, err := range res.errs {
				if res.exps[i] != nil {
					ok++
					res.exps[i].Socket.Close()
				} else if !errors.Is(err, app.ErrAppGone) {
					t.Errorf("item %d: %v, want ErrAppGone", i, err)
				}
			}
			if ok != tc.ok {
				t.Errorf("%d exported, want %d", ok, tc.ok)
			}
			sameFDs(t, base, "after the violation")
			apptest.Eventually(t, apptest.Timeout, "the service to go", func() (bool, string) {
				_, err := a.Registry.Export(ctxT(t), svc, t1)
				return errors.Is(err, app.ErrNoService), fmt.Sprint(err)
			})
		})
	}
}

// fakeDaemon is a bare protocol server the application under test
// registers with.
type fakeDaemon struct {
	ln    *net.UnixListener
	conns chan raw
}

func startFakeDaemon(t *testing.T) (*fakeDaemon, string) {
	dir, err := os.MkdirTemp("", "mtcp-apptest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := dir + "/app.sock"
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDaemon{ln: ln, conns: make(chan raw, 8)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			d.conns <- raw{c}
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		close(d.conns)
		for c := range d.conns {
			c.Close()
		}
	})
	return d, sock
}

// accept waits for the application to connect and answers its
// registration with answer.
func (d *fakeDaemon) accept(t *testing.T, answer string) raw {
	t.Helper()
	select {
	case r := <-d.conns:
		t.Cleanup(func() { r.Close() })
		if m := r.reply(t); m["type"] != "register" || m["version"] != 1.0 || m["max_version"] != float64(app.ProtocolVersion) {
			t.Fatalf("registration %v", m)
		}
		r.frame(t, answer, -1)
		return r
	case <-time.After(apptest.Timeout):
		t.Fatal("the application did not connect")
	}
	return raw{}
}

// closedOrReset waits for the peer to close the connection: a unix
// socket closed with data unread resets.
func closedOrReset(t *testing.T, r raw) {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := io.Copy(io.Discard, r); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the peer did not close the connection: %v", err)
	}
}

// The application drops a daemon whose batch requests carry the wrong
// descriptors, closes them, and reconnects.
func TestAppRejectsBadBatches(t *testing.T) {
	d, sock := startFakeDaemon(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- app.Serve(ctx, app.Config{Service: svc, Daemon: sock, Handler: counter("A", nil), Logger: apptest.Logger(t, "A")})
	}()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	// A daemon that does not say its version speaks version 1.
	r := d.accept(t, `{"type":"registered"}`)
	r.frame(t, fmt.Sprintf(`{"type":"export","id":5,"service":%q,"tuple":{"local":"1.2.3.4:5","remote":"6.7.8.9:10"}}`, svc), -1)
	if m := r.reply(t); m["type"] != "exported" || m["id"] != 5.0 || m["code"] != "no-conn" {
		t.Fatalf("answer to a version-1 export: %v", m)
	}
	r.Close()

	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	dn := int(devnull.Fd())
	for _, tc := range []struct {
		name string
		send func(r raw)
	}{
		{"import with fewer descriptors", func(r raw) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"import-many","id":1,"service":%q,"fds":1,"items":[{"id":2,"fd":true},{"id":3,"fd":true}]}`, svc), dn)
		}},
		{"import with more descriptors", func(r raw) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"import-many","id":1,"service":%q,"fds":3,"items":[{"id":2,"fd":true},{"id":3,"fd":true}]}`, svc), dn, dn, dn)
		}},
		{"import item without descriptor", func(r raw) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"import-many","id":1,"service":%q,"fds":1,"items":[{"id":2,"fd":true},{"id":3}]}`, svc), dn)
		}},
		{"export with a descriptor", func(r raw) {
			r.frameFDs(t, fmt.Sprintf(`{"type":"export-many","id":1,"service":%q,"fds":1,"items":[{"id":2,"tuple":{"local":"1.2.3.4:5","remote":"6.7.8.9:10"}}]}`, svc), dn)
		}},
		{"descriptors nobody claims", func(r raw) {
			r.frameFDs(t, `{"type":"verdict-many","id":1,"verdict":"gone","items":[{"id":2}]}`, dn, dn)
		}},
		{"bad verdict", func(r raw) {
			r.frameFDs(t, `{"type":"verdict-many","id":1,"verdict":"maybe","items":[{"id":2}]}`)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := d.accept(t, `{"type":"registered","version":2}`)
			base := app.OpenFDs(t)
			tc.send(r)
			if tc.name == "descriptors nobody claims" {
				// Noticed at the next frame; the verdict itself is
				// answered (there is no such export).
				if m := r.reply(t); m["type"] != "finished-many" {
					t.Fatalf("answer %v", m)
				}
				r.frameFDs(t, `{"type":"verdict-many","id":3,"verdict":"gone","items":[{"id":4}]}`)
			}
			closedOrReset(t, r)
			// The application reconnects: its new link and our end of
			// it replace the two ends of the old one.
			r.Close()
			sameFDs(t, base, "after the violation")
		})
	}
	// The application still serves.
	r = d.accept(t, `{"type":"registered","version":2}`)
	c, err := net.Dial("tcp", svc)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m := r.reply(t); m["type"] != "opened" || len(m["tuples"].([]any)) != 1 {
		t.Fatalf("report of a new connection: %v", m)
	}
}

// A connection the client reset between its commit and its import has no
// peer address any more. The application refuses that one import and
// takes the others of the batch; its link to mtcpd stays up (it used to
// report the dead connection with an empty tuple, a protocol violation
// for which mtcpd dropped the link and every import of the batch with it).
func TestImportOfResetConnection(t *testing.T) {
	a := apptest.Start(t, "A", counter("A", nil))
	b := apptest.Start(t, "B", counter("B", nil))
	cs, ts := dialN(t, a, 2)
	exps, errs := a.Registry.ExportMany(ctxT(t), a.Service, ts)
	t.Cleanup(func() { closeSockets(exps) })
	noErrors(t, "export", errs)

	// A TCP connection reset by its peer.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dead, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	peer.(*net.TCPConn).SetLinger(0)
	peer.Close() // RST
	dead.SetReadDeadline(time.Now().Add(apptest.Timeout))
	if _, err := dead.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("reading the reset connection: %v, want ECONNRESET", err)
	}

	socks, snaps := socketsOf(exps)
	socks = []syscall.Conn{socks[0], dead.(*net.TCPConn), socks[1]}
	snaps = [][]byte{snaps[0], nil, snaps[1]}
	ierrs := b.Registry.ImportMany(ctxT(t), b.Service, socks, snaps)
	if ierrs[0] != nil || ierrs[2] != nil {
		t.Fatalf("imports of live connections: %v", ierrs)
	}
	if ierrs[1] == nil || !strings.Contains(ierrs[1].Error(), "ended") {
		t.Fatalf("import of a reset connection: %v, want an error saying it ended", ierrs[1])
	}
	noErrors(t, "commit", app.FinishMany(ctxT(t), exps, true))
	closeSockets(exps)
	for _, c := range cs {
		c.do(t, "y", "2 B y")
	}
	// The link is up: B still reports its connections, and takes more.
	if got := b.Registry.Conns(b.Service); len(got) != 2 {
		t.Errorf("B reports %d connections, want 2", len(got))
	}
	c := dial(t, b)
	c.do(t, "z", "1 B z")
	apptest.Eventually(t, apptest.Timeout, "B to report 3 connections", func() (bool, string) {
		got := len(b.Registry.Conns(b.Service))
		return got == 3, fmt.Sprint(got)
	})
}

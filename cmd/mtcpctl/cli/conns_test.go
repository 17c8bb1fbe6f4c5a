package cli

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/admin"
)

// TestConnsTable: `mtcpctl conns` shows who serves each connection, an
// application service or a process (with the --pid that moves it), from
// what mtcpd answers (a stand-in admin server here: the listing itself is
// tested end to end in tests/, TestConnsListsProcesses).
func TestConnsTable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	conns := []admin.Conn{
		{Client: "10.77.1.2:40000", Service: "10.77.2.11:7000", Local: "10.77.2.11:7000", App: ":7000", State: "ESTABLISHED", RTT: 50 * time.Microsecond},
		{Client: "10.77.1.2:40001", Service: "10.77.2.11:6379", Local: "10.77.2.12:6379", PID: 4242, Command: "redis-server", State: "ESTABLISHED"},
		{Client: "10.77.1.2:40002", Service: "10.77.2.11:6379", Local: "10.77.2.12:6379", PID: 4242, Command: "redis-server", State: "ESTABLISHED", Migratable: "MPTCP subflow"},
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/conns" {
			http.NotFound(w, r)
			return
		}
		admin.WriteJSON(w, http.StatusOK, conns)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	var out, errs bytes.Buffer
	if code := run(context.Background(), []string{"conns", "--admin", sock}, &out, &errs); code != ExitOK {
		t.Fatalf("exit %d: %s", code, errs.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows:\n%s", out.String())
	}
	for i, want := range []struct{ by, note string }{
		{":7000", ""},
		{"pid 4242 (redis-server)", "moves with its process: migrate --pid 4242"},
		{"pid 4242 (redis-server)", "MPTCP subflow"},
	} {
		row := lines[i+1]
		if !strings.Contains(row, conns[i].Client) || !strings.Contains(row, "  "+want.by+"  ") || !strings.HasSuffix(row, want.note) {
			t.Errorf("row %d: %q, want %s served by %q, note %q", i, row, conns[i].Client, want.by, want.note)
		}
	}
}

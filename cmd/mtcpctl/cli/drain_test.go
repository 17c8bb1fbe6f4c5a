package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mtcp-dev/mtcp/admin"
)

// fakeAdmin serves lines as the answer to every request on a unix socket
// in a temporary directory, and returns its path.
func fakeAdmin(t *testing.T, lines ...string) string {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, l := range lines {
			fmt.Fprintln(w, l)
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// TestDrainPartial: a drain that ran to its end with a batch refused by
// its target prints every batch's report (or the JSON) and exits 3, not
// as a drain that stopped half-way.
func TestDrainPartial(t *testing.T) {
	sock := fakeAdmin(t,
		`{"total":3,"done":0,"failed":0}`,
		`{"total":3,"done":2,"failed":1,"final":true,"reports":[{"to":"s2","moved":["10.77.1.2:1","10.77.1.2:2"]},{"to":"s3","moved":[],"failed":{"10.77.1.2:3":"prepare: s3 refused"},"aborted":true,"error":"prepare: s3 refused"}],"error":"prepare: s3 refused"}`)
	mtcpctl := func(args ...string) (int, string, string) {
		var out, errs bytes.Buffer
		code := run(context.Background(), append(args, "--admin", sock), &out, &errs)
		return code, out.String(), errs.String()
	}
	code, out, errs := mtcpctl("drain", "--spread")
	if code != ExitPartial || !strings.Contains(out, "10.77.1.2:3") || !strings.Contains(out, "s3 refused") || !strings.Contains(errs, "1 of 3 connections could not move") {
		t.Errorf("text: exit %d, stdout %q, stderr %q; want 3, the failed connection and why", code, out, errs)
	}
	code, out, errs = mtcpctl("drain", "--spread", "-o", "json")
	var p admin.Progress
	if err := json.Unmarshal([]byte(out), &p); err != nil || code != ExitPartial || p.Done != 2 || len(p.Reports) != 2 {
		t.Errorf("json: exit %d, %v, stdout %q, stderr %q; want 3 and the final progress", code, err, out, errs)
	}
}

// TestDrainNothing: a drain with nothing to move says so.
func TestDrainNothing(t *testing.T) {
	sock := fakeAdmin(t, `{"total":0,"done":0,"failed":0,"final":true}`)
	var out, errs bytes.Buffer
	if code := run(context.Background(), []string{"drain", "--to", "s2", "--admin", sock}, &out, &errs); code != ExitOK || !strings.Contains(errs.String(), "nothing to drain") {
		t.Errorf("exit %d, stdout %q, stderr %q; want 0 and 'nothing to drain'", code, out.String(), errs.String())
	}
}

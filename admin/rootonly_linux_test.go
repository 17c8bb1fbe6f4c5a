package admin

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// dialEnv makes the test binary a client of the admin socket it names
// (see TestRootOnly).
const dialEnv = "MTCP_ADMIN_TEST_DIAL"

// TestRootOnly: the admin socket serves root only. Another user is kept
// out by the socket's directory (mode 0700) and, where the files let it
// connect (a shared directory, a permissive umask), by the server's check
// of its credentials; both times mtcpctl's client says ErrDenied.
func TestRootOnly(t *testing.T) {
	if path := os.Getenv(dialEnv); path != "" {
		_, err := NewClient(path).Status(context.Background())
		fmt.Printf("result: %v\n", err)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs a client as another user")
	}
	dir, err := os.MkdirTemp("", "mtcp-admin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The test binary, where the other user can run it.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "admin.test")
	if err := copyFile(self, bin); err != nil {
		t.Fatal(err)
	}

	path := filepath.Join(dir, "run", "admin.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		path string
		want os.FileMode
	}{{filepath.Dir(path), os.ModeDir | 0o700}, {path, os.ModeSocket | 0o600}} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != f.want {
			t.Fatalf("%s: mode %v, want %v", f.path, fi.Mode(), f.want)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusOK, Status{Name: "s1"})
	})
	srv := NewServer(context.Background(), mux)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	if st, err := NewClient(path).Status(context.Background()); err != nil || st.Name != "s1" {
		t.Fatalf("root's status: %+v, %v", st, err)
	}
	asNobody := func() string {
		t.Helper()
		cmd := exec.Command(bin, "-test.run=^TestRootOnly$")
		cmd.Dir = dir
		cmd.Env = []string{dialEnv + "=" + path, "PATH=/usr/bin:/bin"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("client as uid 65534: %v\n%s", err, out)
		}
		_, res, ok := strings.Cut(string(out), "result: ")
		if !ok {
			t.Fatalf("client as uid 65534 said:\n%s", out)
		}
		return strings.TrimSpace(strings.SplitN(res, "\n", 2)[0])
	}
	// The files keep it out.
	if got := asNobody(); !strings.Contains(got, ErrDenied.Error()) {
		t.Fatalf("uid 65534 through a 0700 directory: %q, want ErrDenied", got)
	}
	// Files that let it connect: the server refuses it.
	if err := os.Chmod(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	if got := asNobody(); !strings.Contains(got, ErrDenied.Error()) || !strings.Contains(got, "uid 65534 is not root") {
		t.Fatalf("uid 65534 on a socket it may open: %q, want ErrDenied from the server", got)
	}
	// Root still gets in.
	if _, err := NewClient(path).Status(context.Background()); err != nil {
		t.Fatalf("root after the refusals: %v", err)
	}
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

package daemon

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
)

// stubHandler answers Status and nothing else.
type stubHandler struct{}

func (stubHandler) Prepare(context.Context, string, *peer.PrepareRequest) (*peer.PrepareReply, error) {
	return nil, nil
}
func (stubHandler) Transfer(context.Context, string, *peer.TransferRequest) (*peer.TransferReply, error) {
	return nil, nil
}
func (stubHandler) Commit(context.Context, string, *peer.CommitRequest) (*peer.CommitReply, error) {
	return nil, nil
}
func (stubHandler) Abort(context.Context, string, *peer.AbortRequest) error { return nil }
func (stubHandler) Status(context.Context, string) (*peer.StatusReply, error) {
	return &peer.StatusReply{Name: "s1"}, nil
}

// TestTLSReload: the daemon's TLS files, replaced by those of a new pool
// CA, are taken up on the next look (without SIGHUP) by new connections;
// files that do not load (a key of another certificate) are not, the
// running ones stay and the log says why; unchanged files are not loaded
// again.
func TestTLSReload(t *testing.T) {
	dir := t.TempDir()
	files := peer.TLSFiles{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "cert.pem"), Key: filepath.Join(dir, "key.pem")}
	lo := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	write := func(ca *peer.CA, name string) (cert, key []byte) {
		t.Helper()
		caPEM, _ := ca.PEM()
		cert, key, err := ca.Issue(name, lo, nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		for p, b := range map[string][]byte{files.CA: caPEM, files.Cert: cert, files.Key: key} {
			if err := os.WriteFile(p+".new", b, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(p+".new", p); err != nil {
				t.Fatal(err)
			}
		}
		return cert, key
	}
	member := func(ca *peer.CA, name string) *peer.Config {
		t.Helper()
		d := t.TempDir()
		caPEM, _ := ca.PEM()
		cert, key, err := ca.Issue(name, lo, nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		f := peer.TLSFiles{CA: filepath.Join(d, "ca"), Cert: filepath.Join(d, "cert"), Key: filepath.Join(d, "key")}
		os.WriteFile(f.CA, caPEM, 0o600)
		os.WriteFile(f.Cert, cert, 0o600)
		os.WriteFile(f.Key, key, 0o600)
		cfg, err := f.Config(name)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	oldCA, _ := peer.NewCA("old-pool", time.Hour)
	newCA, _ := peer.NewCA("new-pool", time.Hour)
	write(oldCA, "s1")
	cfg, err := files.Config("s1")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	r := newTLSReload(files, "s1", cfg, slog.New(slog.NewTextHandler(&logs, nil)))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go peer.NewServer(cfg, stubHandler{}).Serve(ctx, ln)
	reaches := func(c *peer.Config) bool {
		cl, err := peer.Dial(context.Background(), ln.Addr().String(), "s1", c)
		if err != nil {
			return false
		}
		cl.Close()
		return true
	}
	oldMember, newMember := member(oldCA, "s2"), member(newCA, "s2")
	if !reaches(oldMember) || reaches(newMember) {
		t.Fatal("before the reload, the old CA's members should get in and the new CA's not")
	}
	if r.reload("change", false) {
		t.Fatal("unchanged files loaded again")
	}
	// Another key beside the certificate: refused, the old files' stay.
	_, key := write(newCA, "s1")
	other, _ := peer.NewCA("other", time.Hour)
	_, otherKey, _ := other.Issue("s1", lo, nil, time.Hour)
	os.WriteFile(files.Key, otherKey, 0o600)
	os.Chtimes(files.Key, time.Now().Add(time.Second), time.Now().Add(time.Second))
	if r.reload("change", false) {
		t.Fatal("a key of another certificate was loaded")
	}
	if !strings.Contains(logs.String(), "not reloaded") {
		t.Errorf("no error logged for files that do not load:\n%s", logs.String())
	}
	if !reaches(oldMember) || reaches(newMember) {
		t.Fatal("after a failed reload, the old CA's members should still get in and the new CA's not")
	}
	// The right key: the new CA's files are taken up.
	os.WriteFile(files.Key, key, 0o600)
	os.Chtimes(files.Key, time.Now().Add(2*time.Second), time.Now().Add(2*time.Second))
	if !r.reload("change", false) {
		t.Fatalf("the new CA's files were not loaded:\n%s", logs.String())
	}
	if reaches(oldMember) || !reaches(newMember) {
		t.Fatal("after the reload, the new CA's members should get in and the old CA's not")
	}
}

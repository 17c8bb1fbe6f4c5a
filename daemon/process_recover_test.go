package daemon

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/migrate"
	"github.com/mtcp-dev/mtcp/repair"
)

func TestJournalRoundTrip(t *testing.T) {
	dir := t.TempDir()
	sock := procSocket{
		conn:  repair.Conn{Local: netip.MustParseAddrPort("10.0.0.2:6379"), Remote: netip.MustParseAddrPort("10.0.1.2:40000")},
		owner: repair.Owner{PID: os.Getpid(), FD: 7},
		flow:  migrate.Flow{Client: netip.MustParseAddrPort("10.0.1.2:40000"), Service: netip.MustParseAddrPort("10.0.0.1:6379")},
	}
	// The test process and a pid that cannot be running.
	j, err := newJournal(dir, "s2", 42, true, time.Now(), []int{os.Getpid()}, []procSocket{sock})
	if err != nil {
		t.Fatal(err)
	}
	j.Procs = append(j.Procs, journalProc{PID: 1 << 30, Start: 1})
	for _, c := range []struct {
		phase   string
		lazy    bool
		forward bool
	}{
		{journalHeld, false, false},
		{journalRestoring, false, false},
		{journalSwitching, false, true},
		{journalSwitching, true, false},
		{journalCommitting, true, true},
		{journalCommitted, true, true},
	} {
		j.Lazy = c.lazy
		if err := j.write(c.phase); err != nil {
			t.Fatal(err)
		}
		got, err := readJournal(dir)
		if err != nil {
			t.Fatal(err)
		}
		if got.Phase != c.phase || got.forward() != c.forward {
			t.Errorf("%s (lazy %v): read back %s, forward %v; want forward %v", c.phase, c.lazy, got.Phase, got.forward(), c.forward)
		}
		if len(got.tree) != 1 || got.tree[0] != os.Getpid() {
			t.Errorf("processes still there: %v, want only this one (%d)", got.tree, os.Getpid())
		}
		if len(got.socks) != 1 || got.socks[0].conn.Local != sock.conn.Local || got.socks[0].conn.Remote != sock.conn.Remote ||
			got.socks[0].owner != sock.owner || got.socks[0].flow != sock.flow || got.flows[0] != sock.flow {
			t.Errorf("sockets read back: %+v, want %+v", got.socks, sock)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, journalName+".new")); !os.IsNotExist(err) {
		t.Errorf("the journal's temporary file is left: %v", err)
	}
	names, err := checkpointFiles(dir)
	if err != nil || len(names) != 0 {
		t.Errorf("checkpoint files %v (%v): the journal is not one", names, err)
	}
}

func TestJournalBad(t *testing.T) {
	for name, text := range map[string]string{
		"not json":      "{",
		"unknown phase": `{"phase":"dancing","to":"s2","procs":[{"pid":1,"start":1}]}`,
		"no process":    `{"phase":"held","to":"s2"}`,
		"no target":     `{"phase":"held","procs":[{"pid":1,"start":1}]}`,
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, journalName), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := readJournal(dir); err == nil || !strings.Contains(err.Error(), "journal") {
			t.Errorf("%s: %v, want an error naming the journal", name, err)
		}
	}
}

// TestOwnDir: a checkpoint directory is taken for this daemon's only if it
// is a real directory of its user, closed to others (the checkpoints'
// place, /dev/shm, is writable by everyone).
func TestOwnDir(t *testing.T) {
	base := t.TempDir()
	mine := filepath.Join(base, "mine")
	if err := os.Mkdir(mine, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := ownDir(mine); err != nil {
		t.Errorf("a 0700 directory of ours: %v", err)
	}
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o777)
	link := filepath.Join(base, "link")
	if err := os.Symlink(mine, link); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(base, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{open, link, file} {
		if err := ownDir(p); err == nil {
			t.Errorf("%s taken for a checkpoint directory of ours", filepath.Base(p))
		}
	}
	if os.Geteuid() == 0 {
		other := filepath.Join(base, "other")
		if err := os.Mkdir(other, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(other, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if err := ownDir(other); err == nil {
			t.Error("another user's directory taken for ours")
		}
	}
}

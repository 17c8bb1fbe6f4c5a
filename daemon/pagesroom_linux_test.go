package daemon

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPagesRoomShared: two eager migrations arriving at once cannot
// together write more page images than the checkpoint file system has
// room for. On a tmpfs of 200 MiB (136 MiB of room, less its reserve),
// the first announces a file of 100 MiB and is writing it when the
// second announces another of 100 MiB: the second is refused at once,
// naming what the other is writing; once the first is done, a file of
// 30 MiB fits.
func TestPagesRoomShared(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a tmpfs")
	}
	shm := t.TempDir()
	if err := unix.Mount("tmpfs", shm, "tmpfs", 0, "size=200m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(shm, unix.MNT_DETACH) })
	d := &Daemon{cfg: &Config{Name: "s2"}, proc: newProcMode()}
	stream := func(tx uint64) (net.Conn, chan error) {
		dir := filepath.Join(shm, "in"+string(rune('0'+tx)))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		d.proc.in[tx] = &procIn{from: "s1", dir: dir, pages: make(chan error, 1)}
		ours, theirs := net.Pipe()
		t.Cleanup(func() { ours.Close() })
		done := make(chan error, 1)
		go func() { done <- d.ProcessPages(context.Background(), "s1", tx, theirs) }()
		return ours, done
	}
	header := func(name string, size uint64) []byte {
		b := binary.BigEndian.AppendUint16(nil, uint16(len(name)))
		return binary.BigEndian.AppendUint64(append(b, name...), size)
	}
	writing := func() uint64 {
		d.proc.mu.Lock()
		defer d.proc.mu.Unlock()
		return d.proc.writing
	}

	c1, done1 := stream(1)
	if _, err := c1.Write(append(header("pages-1.img", 100<<20), make([]byte, 1<<20)...)); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); writing() != 100<<20; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the first migration's file is not being written: %d bytes announced", writing())
		}
	}
	c2, done2 := stream(2)
	go c2.Write(header("pages-1.img", 100<<20))
	select {
	case err := <-done2:
		if err == nil || !strings.Contains(err.Error(), "being written by other migrations") {
			t.Fatalf("the second migration's 100 MiB: %v, want refused for the other's", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the second migration's 100 MiB was taken while the first writes 100 MiB into 136 MiB of room")
	}
	// The first migration ends (its source went away): what it
	// announced is free again.
	c1.Close()
	if err := <-done1; err == nil {
		t.Fatal("a pages stream cut short ended without an error")
	}
	if n := writing(); n != 0 {
		t.Fatalf("%d bytes still counted as being written after the stream ended", n)
	}
	os.RemoveAll(d.proc.in[1].dir)
	c3, done3 := stream(3)
	data := make([]byte, 30<<20)
	go func() {
		c3.Write(append(append(header("pages-1.img", uint64(len(data))), data...), 0, 0))
		c3.Read(make([]byte, 1)) // the acknowledgement
	}()
	if err := <-done3; err != nil {
		t.Fatalf("30 MiB with nothing else being written: %v", err)
	}
}

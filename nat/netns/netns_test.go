package netns_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/nat/netns"
)

func skipUnlessRoot(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("network namespaces exist only on Linux")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and joins it with setns(2)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip to create a namespace: ", err)
	}
}

// newNamespace creates a throwaway named namespace with lo up and removes it
// when the test ends. Its name carries the test's pid so a leftover can be
// traced to the run that made it.
func newNamespace(t *testing.T) string {
	t.Helper()
	var b [2]byte
	rand.Read(b[:])
	name := fmt.Sprintf("mtn%dx%s", os.Getpid(), hex.EncodeToString(b[:]))
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// threadNamespaces returns the network namespace of every thread of this
// process, as readlink shows it ("net:[4026531840]").
func threadNamespaces(t *testing.T) map[string][]string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]string{}
	for _, task := range tasks {
		l, err := os.Readlink(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
		if err != nil {
			continue // the thread exited meanwhile
		}
		m[l] = append(m[l], task.Name())
	}
	return m
}

func TestPath(t *testing.T) {
	if got, want := netns.Path("s1"), "/run/netns/s1"; got != want {
		t.Errorf("Path(s1) = %q, want %q", got, want)
	}
}

func TestDoMissingNamespace(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("network namespaces exist only on Linux")
	}
	called := false
	err := netns.Do("/run/netns/mtcp-does-not-exist", func() error { called = true; return nil })
	if err == nil || !strings.Contains(err.Error(), "netns: enter /run/netns/mtcp-does-not-exist") || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Do(missing) = %v, want a netns: enter ... error wrapping ENOENT", err)
	}
	if called {
		t.Error("fn ran although the namespace could not be entered")
	}
}

func TestDoNotANamespace(t *testing.T) {
	skipUnlessRoot(t)
	err := netns.Do("/proc/self/ns/uts", func() error { return nil })
	if err == nil || !strings.Contains(err.Error(), "netns: enter /proc/self/ns/uts") {
		t.Errorf("Do(uts namespace) = %v, want a netns: enter error", err)
	}
}

func TestDo(t *testing.T) {
	skipUnlessRoot(t)
	name := newNamespace(t)
	path := netns.Path(name)
	rootIno := inode(t, "/proc/self/ns/net")
	targetIno := inode(t, path)
	if rootIno == targetIno {
		t.Fatalf("namespace %s has the root namespace's inode %d", name, rootIno)
	}
	before := threadNamespaces(t)
	if len(before) != 1 {
		t.Fatalf("threads already in several namespaces before Do: %v", before)
	}

	var inside uint64
	var ln net.Listener
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	err := netns.Do(path, func() error {
		inside = inode(t, "/proc/thread-self/ns/net")
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if inside != targetIno {
		t.Errorf("inside Do the thread's namespace inode is %d, want %d (%s)", inside, targetIno, path)
	}

	// Every thread is back in the root namespace.
	if after := threadNamespaces(t); !sameKeys(before, after) {
		t.Errorf("thread namespaces after Do = %v, want all in %v", after, before)
	}

	// The listener lives in the namespace: ss there sees it.
	port := ln.Addr().(*net.TCPAddr).Port
	out := run(t, "ip", "netns", "exec", name, "ss", "-ltnH")
	if !strings.Contains(out, fmt.Sprintf("127.0.0.1:%d", port)) {
		t.Errorf("ss -ltn in %s does not list 127.0.0.1:%d:\n%s", name, port, out)
	}

	// Usable from any goroutine after Do: accept here, dial from inside.
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, err = io.WriteString(c, "hello")
			c.Close()
		}
		accepted <- err
	}()
	var got []byte
	err = netns.Do(path, func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		got, err = io.ReadAll(c)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte("hello")) {
		t.Errorf("read %q through the namespace, want %q", got, "hello")
	}
}

func sameKeys(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			return false
		}
	}
	return true
}

// TestDoManyRestoresEveryThread runs many concurrent Do calls and checks
// that no thread of the process is left in the namespace.
func TestDoManyRestoresEveryThread(t *testing.T) {
	skipUnlessRoot(t)
	path := netns.Path(newNamespace(t))
	targetIno := inode(t, path)
	before := threadNamespaces(t)

	errs := make(chan error, 64)
	for range cap(errs) {
		go func() {
			errs <- netns.Do(path, func() error {
				if ino := inode(t, "/proc/thread-self/ns/net"); ino != targetIno {
					return fmt.Errorf("inside Do: namespace inode %d, want %d", ino, targetIno)
				}
				runtime.Gosched()
				return nil
			})
		}()
	}
	for range cap(errs) {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if after := threadNamespaces(t); !sameKeys(before, after) {
		t.Errorf("thread namespaces after 64 Do calls = %v, want all in %v", after, before)
	}
}

func TestDoReturnsFnError(t *testing.T) {
	skipUnlessRoot(t)
	path := netns.Path(newNamespace(t))
	sentinel := errors.New("boom")
	if err := netns.Do(path, func() error { return sentinel }); !errors.Is(err, sentinel) {
		t.Errorf("Do = %v, want %v", err, sentinel)
	}
}

func TestDoPanic(t *testing.T) {
	skipUnlessRoot(t)
	path := netns.Path(newNamespace(t))
	before := threadNamespaces(t)
	func() {
		defer func() {
			if v := recover(); v != "boom" {
				t.Errorf("recovered %v, want the panic of fn (boom)", v)
			}
		}()
		netns.Do(path, func() error { panic("boom") })
	}()
	if after := threadNamespaces(t); !sameKeys(before, after) {
		t.Errorf("thread namespaces after a panic in fn = %v, want all in %v", after, before)
	}
}

// Open a TCP listener inside the namespace of testbed host s1. The listener
// stays in that namespace after Do returns.
func ExampleDo() {
	var ln net.Listener
	err := netns.Do(netns.Path("mtcp-tb-s1"), func() error {
		var err error
		ln, err = net.Listen("tcp", ":8080")
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ln.Close()
	fmt.Println("listening in mtcp-tb-s1 on", ln.Addr())
}

package daemon

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fakeProc is a /proc tree written by a test.
type fakeProc struct {
	t   *testing.T
	dir string
}

func (p fakeProc) file(name, content string) {
	p.t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

func (p fakeProc) link(name, target string) {
	p.t.Helper()
	path := filepath.Join(p.dir, name)
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.Remove(path)
	if err := os.Symlink(target, path); err != nil {
		p.t.Fatal(err)
	}
}

// task writes /proc/PID/stat (and one thread's) for a task in netns ns
// with CPU ticks and rss pages.
func (p fakeProc) task(pid int, ns, state string, utime, stime, start, rss uint64) {
	p.link(fmt.Sprintf("%d/ns/net", pid), ns)
	// Fields 3 (state) to 24 (rss); the command name holds a ") " to
	// check that the parser skips past the last parenthesis.
	stat := fmt.Sprintf("%d (a) b) %s 1 2 3 4 5 6 7 8 9 10 %d %d 0 0 0 0 0 0 %d 100 %d\n", pid, state, utime, stime, start, rss)
	p.file(fmt.Sprintf("%d/stat", pid), stat)
	p.file(fmt.Sprintf("%d/task/%d/stat", pid, pid), stat)
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-6 }

func TestLoadHost(t *testing.T) {
	p := fakeProc{t, t.TempDir()}
	p.file("meminfo", "MemTotal:       1000 kB\nMemFree:   100 kB\nMemAvailable:    250 kB\n")
	p.file("pressure/memory", "some avg10=12.50 avg60=1.00 avg300=0.00 total=1\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n")
	p.file("stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 1 1 1 1 1 1 1 1 1\nprocs_running 3\n")
	s := newLoadSampler(LoadScopeHost)
	s.proc = p.dir
	now := time.Unix(1000, 0)
	l, err := s.sample(now)
	if err != nil {
		t.Fatal(err)
	}
	if l.CPU != 0 || !near(l.RunQueue, 2) || !near(l.Memory, 0.75) || !near(l.MemoryPressure, 0.125) {
		t.Fatalf("first sample %+v", l)
	}
	// 1000 more ticks, 600 of them busy (user, system, irq).
	p.file("stat", "cpu  400 0 300 1000 200 0 100 0 0 0\nprocs_running 1\n")
	l, err = s.sample(now.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if !near(l.CPU, 0.6) || l.RunQueue != 0 {
		t.Fatalf("second sample %+v, want cpu 0.6 and an empty run queue (the reader itself)", l)
	}
}

func TestLoadNetns(t *testing.T) {
	p := fakeProc{t, t.TempDir()}
	p.file("meminfo", "MemTotal: 4096 kB\nMemAvailable: 1024 kB\n")
	p.file("uptime", "100.00 50.00\n")
	p.link("self", "10")
	p.link("thread-self", "10/task/10")
	const mine, other = "net:[4026531111]", "net:[4026532222]"
	page := uint64(os.Getpagesize())
	p.task(10, mine, "R", 5, 5, 1000, 4096/page) // the reader: never counted as runnable
	p.task(11, mine, "R", 100, 0, 2000, 0)
	p.task(12, mine, "S", 50, 50, 3000, 0)
	p.task(13, other, "R", 900, 900, 4000, 0) // another namespace
	s := newLoadSampler(LoadScopeNetns)
	s.proc, s.ncpu = p.dir, 2
	now := time.Unix(1000, 0)
	l, err := s.sample(now)
	if err != nil {
		t.Fatal(err)
	}
	if l.CPU != 0 || l.RunQueue != 1 || !near(l.Memory, 1.0/1024*float64(4096/page*page)/4096) {
		t.Fatalf("first sample %+v", l)
	}
	// In 2 s: task 11 burns 150 ticks, 12 burns 50, 13 (elsewhere) 200;
	// task 14 is born (start 10100 ticks = 101 s > the last uptime) with
	// 40 ticks; task 12 exits.
	p.file("uptime", "102.00 50.00\n")
	p.task(11, mine, "R", 200, 50, 2000, 0)
	os.RemoveAll(filepath.Join(p.dir, "12"))
	p.task(13, other, "R", 1000, 1000, 4000, 0)
	p.task(14, mine, "R", 40, 0, 10100, 0)
	l, err = s.sample(now.Add(2 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	// (150 + 40) ticks = 1.9 s of CPU in 2 s on 2 CPUs.
	if !near(l.CPU, 1.9/2/2) || l.RunQueue != 2 {
		t.Fatalf("second sample %+v, want cpu %v and 2 runnable", l, 1.9/2/2)
	}
}

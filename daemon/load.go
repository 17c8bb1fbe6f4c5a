package daemon

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/mtcp-dev/mtcp/policy"
)

// Load scopes (LoadOptions.Scope).
const (
	// LoadScopeHost measures the whole machine: /proc/stat,
	// /proc/meminfo, /proc/pressure/memory.
	LoadScopeHost = "host"
	// LoadScopeNetns measures the processes that share mtcpd's network
	// namespace: their CPU time and memory from /proc/PID/stat, their
	// runnable threads. For servers that are network namespaces of one
	// machine (the testbed), where the machine-wide figures would be the
	// same for every server. Memory pressure stays machine-wide: the
	// kernel reports it only per cgroup or for the whole machine.
	LoadScopeNetns = "netns"
)

// LoadOptions says how mtcpd measures its server's load, for the policy
// engine and for its peers' heartbeats.
type LoadOptions struct {
	// Scope is LoadScopeHost (default) or LoadScopeNetns.
	Scope string `yaml:"scope"`
}

func (l *LoadOptions) check() error {
	switch l.Scope {
	case "":
		l.Scope = LoadScopeHost
	case LoadScopeHost, LoadScopeNetns:
	default:
		return fmt.Errorf("load: scope %q is not host or netns", l.Scope)
	}
	return nil
}

// clockTicks is USER_HZ, the unit of the CPU times in /proc/PID/stat:
// 100 on every architecture Linux supports today.
const clockTicks = 100

// loadSampler measures load from /proc, keeping the previous sample to
// turn cumulative CPU times into a share of the interval between two
// samples.
type loadSampler struct {
	scope string
	proc  string // "/proc"
	ncpu  int

	have      bool
	at        time.Time
	hostBusy  uint64
	hostTotal uint64
	uptime    float64
	tasks     map[[2]uint64]uint64 // (pid, start time) -> utime+stime
}

func newLoadSampler(scope string) *loadSampler {
	return &loadSampler{scope: scope, proc: "/proc", ncpu: runtime.NumCPU(), tasks: map[[2]uint64]uint64{}}
}

// sample measures the load now. CPU is 0 on the first sample.
func (s *loadSampler) sample(now time.Time) (policy.Load, error) {
	var l policy.Load
	var errs []error
	memTotal, memAvail, err := s.meminfo()
	errs = append(errs, err)
	l.MemoryPressure, err = s.pressure()
	if errors.Is(err, os.ErrNotExist) {
		err = nil // a kernel without PSI
	}
	errs = append(errs, err)
	if s.scope == LoadScopeNetns {
		var rss uint64
		l.CPU, l.RunQueue, rss, err = s.netns(now)
		errs = append(errs, err)
		if memTotal > 0 {
			l.Memory = float64(rss) / float64(memTotal)
		}
	} else {
		l.CPU, l.RunQueue, err = s.host()
		errs = append(errs, err)
		if memTotal > 0 {
			l.Memory = 1 - float64(memAvail)/float64(memTotal)
		}
	}
	s.at, s.have = now, true
	return l, errors.Join(errs...)
}

// host reads /proc/stat: the busy share of all CPUs since the last
// sample and the runnable tasks (less this reader).
func (s *loadSampler) host() (cpu, runq float64, err error) {
	b, err := os.ReadFile(filepath.Join(s.proc, "stat"))
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	var busy, total uint64
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) > 5 && f[0] == "cpu":
			for i, v := range f[1:] {
				n, _ := strconv.ParseUint(v, 10, 64)
				if i >= 8 { // guest and guest_nice are already in user and nice
					break
				}
				total += n
				if i != 3 && i != 4 { // idle, iowait
					busy += n
				}
			}
		case len(f) == 2 && f[0] == "procs_running":
			n, _ := strconv.ParseFloat(f[1], 64)
			runq = max(n-1, 0)
		}
	}
	if s.have && total > s.hostTotal {
		cpu = float64(busy-s.hostBusy) / float64(total-s.hostTotal)
	}
	s.hostBusy, s.hostTotal = busy, total
	return cpu, runq, nil
}

// netns sums the CPU time, runnable threads and resident memory of the
// processes in this process's network namespace.
func (s *loadSampler) netns(now time.Time) (cpu, runq float64, rss uint64, err error) {
	own, err := os.Readlink(filepath.Join(s.proc, "self/ns/net"))
	if err != nil {
		return 0, 0, 0, fmt.Errorf("load: own network namespace: %w", err)
	}
	self, _ := os.Readlink(filepath.Join(s.proc, "thread-self")) // "PID/task/TID"
	uptime := s.readUptime()
	ents, err := os.ReadDir(s.proc)
	if err != nil {
		return 0, 0, 0, err
	}
	page := uint64(os.Getpagesize())
	tasks := make(map[[2]uint64]uint64, len(s.tasks))
	var ticks uint64
	for _, e := range ents {
		pid, err := strconv.ParseUint(e.Name(), 10, 64)
		if err != nil {
			continue
		}
		dir := filepath.Join(s.proc, e.Name())
		if ns, err := os.Readlink(filepath.Join(dir, "ns/net")); err != nil || ns != own {
			continue
		}
		f, ok := statFields(filepath.Join(dir, "stat"))
		if !ok {
			continue
		}
		t := parseU(f[11]) + parseU(f[12]) // utime, stime
		start := parseU(f[19])
		rss += parseU(f[21]) * page
		k := [2]uint64{pid, start}
		tasks[k] = t
		switch prev, seen := s.tasks[k]; {
		case seen && t >= prev:
			ticks += t - prev
		case !seen && s.have && float64(start)/clockTicks >= s.uptime:
			ticks += t // born since the last sample
		}
		threads, _ := os.ReadDir(filepath.Join(dir, "task"))
		for _, th := range threads {
			if e.Name()+"/task/"+th.Name() == self {
				continue // this reader is always running
			}
			if tf, ok := statFields(filepath.Join(dir, "task", th.Name(), "stat")); ok && tf[0] == "R" {
				runq++
			}
		}
	}
	if s.have && now.After(s.at) {
		cpu = float64(ticks) / clockTicks / now.Sub(s.at).Seconds() / float64(s.ncpu)
		cpu = min(cpu, 1)
	}
	s.tasks, s.uptime = tasks, uptime
	return cpu, runq, rss, nil
}

func (s *loadSampler) readUptime() float64 {
	b, err := os.ReadFile(filepath.Join(s.proc, "uptime"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// statFields returns the fields of a /proc/PID/stat file after the
// command name: fields[0] is the state (field 3 of proc(5)).
func statFields(path string) ([]string, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, false
	}
	f := strings.Fields(string(b[i+1:]))
	return f, len(f) > 21
}

func parseU(s string) uint64 {
	v, _ := strconv.ParseUint(s, 10, 64)
	return v
}

// meminfo returns MemTotal and MemAvailable in bytes.
func (s *loadSampler) meminfo() (total, avail uint64, err error) {
	b, err := os.ReadFile(filepath.Join(s.proc, "meminfo"))
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "MemTotal:":
			total = parseU(f[1]) << 10
		case "MemAvailable:":
			avail = parseU(f[1]) << 10
		}
	}
	return total, avail, nil
}

// pressure returns the machine's memory PSI "some avg10" as a fraction.
func (s *loadSampler) pressure() (float64, error) {
	b, err := os.ReadFile(filepath.Join(s.proc, "pressure/memory"))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "some" {
			continue
		}
		if v, ok := strings.CutPrefix(f[1], "avg10="); ok {
			p, err := strconv.ParseFloat(v, 64)
			return p / 100, err
		}
	}
	return 0, fmt.Errorf("load: no \"some avg10\" in %s/pressure/memory", s.proc)
}

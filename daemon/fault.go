package daemon

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mtcp-dev/mtcp/nat"
	"github.com/mtcp-dev/mtcp/peer"
)

// FaultEnv names the environment variable that injects faults, for the
// end-to-end tests of the abort paths. It holds a comma-separated list of:
//
//	prepare-refuse   the target refuses every Prepare
//	transfer-crash   the target exits (status 3) when a Transfer arrives,
//	                 as if the host died mid-transfer
//	transfer-hang    the target never answers a Transfer (until the
//	                 source's deadline cancels it)
//	import-refuse    the target's application takes none of the
//	                 connections a commit hands it (they end)
//	commit-socket-refuse  the target fails to bring any restored socket
//	                 to life at the commit (they go silently)
//	commit-drop      the source of a connection-mode migration closes its
//	                 connection to the target 50 µs after it has begun to send
//	                 the commit, while the target commits, and asks again
//	commit-answer-refuse  the source of a connection-mode migration takes
//	                 the target's answer to its commit for lost with the
//	                 connection, and asks again
//	switched-refuse  a steering point makes every switch it is asked
//	                 for away from the flows' home (the address their
//	                 clients dialled), then answers with an error, as if
//	                 its answer were lost
//	switch-rules-refuse  a steering point fails the first switch away
//	                 from home of each flow, as if the switch's rules
//	                 could not go in, once the holds have queued a packet
//	                 of every flow it switches (or after 1.5 s); the
//	                 source tries again
//	switch-rules-refuse=N  the same for the first N switches of each flow
//	switch-home-refuse  a steering point fails the first switch back home
//	                 (the end of the flow's steering) of each flow
//	pages-crash      the source of a lazy process migration exits (status
//	                 3) right after the switch, while the target still
//	                 fetches the process's memory from it
//	process-commit-crash  the source of a process migration exits
//	                 (status 3) after the switch, before it kills its
//	                 stopped copy and the target commits
//	target-pages-refuse  the target of a lazy process migration takes
//	                 the page stream for broken as soon as it has restored
//	                 the process (which it then kills)
//	target-pages-end-refuse  the same, once the target has every page
//	                 (so that the source commits meanwhile)
//	pages-in-hang    the target of an eager process migration never reads
//	                 the page images (its connection stays open)
//	pages-stall=D    the source of an eager process migration gives up
//	                 after D without progress in sending its page images,
//	                 instead of 30 s
//	restored-hang    the target of a process migration restores the
//	                 process, then never answers (until the source gives
//	                 up), as if its answer were lost on the way
//	process-finish-unanswered=D  the target of a process migration
//	                 leaves the commits and aborts that come within D of
//	                 the restore's request unanswered and unhandled, as if
//	                 lost on the way
//	process-committed-crash  the source of a process migration exits
//	                 (status 3) once the target has committed, before its
//	                 journal records it
//	process-retire-crash  the source of a process migration exits
//	                 (status 3) once the target has committed, before it
//	                 kills its stopped copy
//	listed-delay=D   the source of a process migration waits D after it
//	                 has listed the process's connections, before it
//	                 prepares the target and dumps the process (a
//	                 connection the process accepts meanwhile makes it
//	                 start again)
//	restore-delay=D  the target of a process migration waits D before it
//	                 restores (the source's process stays stopped meanwhile)
//	restore-deadline=D  the source of a process migration gives the
//	                 target's restore D instead of a minute
//	drain-flush-delay=D  a drain waits D once it has said it is done
//	                 before it closes its frozen copies (a connection
//	                 migrated back meanwhile must not meet them)
//	shutdown-grace=D  a stopping daemon lets the admin requests under
//	                 way finish for D instead of ShutdownGrace (tests)
//	orphan-after=D   transactions of other daemons left without their end
//	                 (see expire.go) expire after D instead of
//	                 OrphanTimeout; for tests
//	unclaimed-reap=D  the ended connections no application reports are
//	                 looked for every D instead of UnclaimedReapInterval
//	                 (reap.go); for tests
//	peer-delay=D     every connection-mode request from a peer (prepare,
//	                 transfer, commit, abort, steer) and every heartbeat
//	                 waits D before it is handled and D more before it is
//	                 answered, as if the peers were D apart (a round trip
//	                 of 2D); for benchmarks of distant pools
//
// Nothing else reads it; unset, it costs one slice lookup per request.
const FaultEnv = "MTCP_FAULT"

var faults = strings.Split(os.Getenv(FaultEnv), ",")

// fault reacts to an injected fault at point, if one is set.
func fault(ctx context.Context, point string) error {
	switch {
	case slices.Contains(faults, point+"-refuse"):
		return fmt.Errorf("fault injected (%s=%s-refuse)", FaultEnv, point)
	case slices.Contains(faults, point+"-crash"):
		fmt.Fprintf(os.Stderr, "mtcpd: fault injected: exiting at %s\n", point)
		os.Exit(3)
	case slices.Contains(faults, point+"-hang"):
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

// switchRulesFailed counts, per fault and flow, the switches a
// switch-rules-refuse or switch-home-refuse fault failed.
var switchRulesFailed = struct {
	sync.Mutex
	m map[string]map[nat.Flow]int
}{m: map[string]map[nat.Flow]int{}}

// switchRulesFault is the switch-rules-refuse fault of a switch of flows
// away from their home, or switch-home-refuse's of one back home (home);
// held counts a flow's held packets.
func switchRulesFault(home bool, flows []nat.Flow, held func(nat.Flow) int) error {
	name := "switch-rules-refuse"
	if home {
		name = "switch-home-refuse"
	}
	n := 0
	for _, f := range faults {
		if f == name {
			n = 1
		} else if v, ok := strings.CutPrefix(f, name+"="); ok {
			n, _ = strconv.Atoi(v)
		}
	}
	if n <= 0 {
		return nil
	}
	switchRulesFailed.Lock()
	failed := switchRulesFailed.m[name]
	if failed == nil {
		failed = map[nat.Flow]int{}
		switchRulesFailed.m[name] = failed
	}
	fail := false
	for _, f := range flows {
		if failed[f] < n {
			failed[f]++
			fail = true
		}
	}
	switchRulesFailed.Unlock()
	if !fail {
		return nil
	}
	for end := time.Now().Add(1500 * time.Millisecond); !home && time.Now().Before(end); time.Sleep(time.Millisecond) {
		if !slices.ContainsFunc(flows, func(f nat.Flow) bool { return held(f) == 0 }) {
			break
		}
	}
	return fmt.Errorf("fault injected (%s=%s)", FaultEnv, name)
}

// peerDelay is the delay of a peer-delay=D fault, or 0.
func peerDelay() (time.Duration, error) { return faultDuration("peer-delay") }

// faultDuration is the D of a name=D fault, or 0.
func faultDuration(name string) (time.Duration, error) {
	for _, f := range faults {
		if v, ok := strings.CutPrefix(f, name+"="); ok {
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				return 0, fmt.Errorf("%s: bad %s %q", FaultEnv, name, v)
			}
			return d, nil
		}
	}
	return 0, nil
}

// distant is the peer handler of a daemon with a peer-delay fault.
type distant struct {
	*Daemon
	delay time.Duration
}

// travel sleeps for one direction of the emulated distance, or until ctx
// ends.
func (d distant) travel(ctx context.Context) error {
	t := time.NewTimer(d.delay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Prepare is Daemon.Prepare, the emulated distance away.
func (d distant) Prepare(ctx context.Context, from string, r *peer.PrepareRequest) (*peer.PrepareReply, error) {
	return far(ctx, d, func() (*peer.PrepareReply, error) { return d.Daemon.Prepare(ctx, from, r) })
}

// Transfer is Daemon.Transfer, the emulated distance away.
func (d distant) Transfer(ctx context.Context, from string, r *peer.TransferRequest) (*peer.TransferReply, error) {
	return far(ctx, d, func() (*peer.TransferReply, error) { return d.Daemon.Transfer(ctx, from, r) })
}

// Commit is Daemon.Commit, the emulated distance away.
func (d distant) Commit(ctx context.Context, from string, r *peer.CommitRequest) (*peer.CommitReply, error) {
	return far(ctx, d, func() (*peer.CommitReply, error) { return d.Daemon.Commit(ctx, from, r) })
}

// Abort is Daemon.Abort, the emulated distance away.
func (d distant) Abort(ctx context.Context, from string, r *peer.AbortRequest) error {
	_, err := far(ctx, d, func() (struct{}, error) { return struct{}{}, d.Daemon.Abort(ctx, from, r) })
	return err
}

// Status is Daemon.Status, the emulated distance away.
func (d distant) Status(ctx context.Context, from string) (*peer.StatusReply, error) {
	return far(ctx, d, func() (*peer.StatusReply, error) { return d.Daemon.Status(ctx, from) })
}

// Steer is Daemon.Steer, the emulated distance away.
func (d distant) Steer(ctx context.Context, from string, r *peer.SteerRequest) error {
	_, err := far(ctx, d, func() (struct{}, error) { return struct{}{}, d.Daemon.Steer(ctx, from, r) })
	return err
}

// far runs fn after one leg of d's distance and answers after another.
func far[T any](ctx context.Context, d distant, fn func() (T, error)) (T, error) {
	var zero T
	if err := d.travel(ctx); err != nil {
		return zero, err
	}
	v, err := fn()
	if terr := d.travel(ctx); terr != nil && err == nil {
		return zero, terr
	}
	return v, err
}

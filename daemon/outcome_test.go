package daemon

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
)

// TestFinishAnswers: how a target answers the finish of a process
// migration that has ended there, by how it ended and who asks.
func TestFinishAnswers(t *testing.T) {
	d := &Daemon{cfg: &Config{Name: "s2"}, proc: newProcMode()}
	now := time.Now()
	d.proc.ended[1] = procOutcome{from: "s1", committed: true, at: now}
	d.proc.ended[2] = procOutcome{from: "s1", committed: false, at: now}
	d.proc.ended[3] = procOutcome{from: "s1", committed: true, at: now.Add(-outcomeKeep - time.Minute)}
	for _, tc := range []struct {
		name   string
		from   string
		tx     uint64
		commit bool
		want   string // "" for nil, else part of the error
	}{
		{"commit again after a commit", "s1", 1, true, ""},
		{"abort after a commit", "s1", 1, false, endedCommitted},
		{"commit by another member", "s3", 1, true, "belongs to s1"},
		{"commit after an abort", "s1", 2, true, endedAborted},
		{"abort again after an abort", "s1", 2, false, ""},
		{"commit of a migration forgotten", "s1", 3, true, "unknown here"},
		{"commit of an unknown migration", "s1", 4, true, "unknown here"},
		{"abort of an unknown migration", "s1", 4, false, ""},
	} {
		err := d.ProcessFinish(context.Background(), tc.from, &peer.ProcessFinishRequest{TxID: tc.tx, Commit: tc.commit})
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, ok := d.proc.ended[3]; ok {
		t.Error("an outcome older than outcomeKeep is still kept")
	}
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

// TestDropAfterHeartbeat: a late heartbeat does not close a connection
// other requests wait on (a transfer's large frame ahead of it on a slow
// link), nor one that was late only a few times; a failed one does.
func TestDropAfterHeartbeat(t *testing.T) {
	late := fmt.Errorf("status: no answer before the deadline: %w", context.DeadlineExceeded)
	for _, tc := range []struct {
		err           error
		late, pending int
		want          bool
	}{
		{nil, 0, 0, false},
		{late, 1, 0, false},
		{late, lateHeartbeats - 1, 0, false},
		{late, lateHeartbeats, 1, false},
		{late, stuckHeartbeats - 1, 3, false},
		{late, stuckHeartbeats, 3, true},
		{late, lateHeartbeats, 0, true},
		{errors.New("connection closed"), 0, 2, true},
	} {
		if got := dropAfterHeartbeat(tc.err, tc.late, tc.pending); got != tc.want {
			t.Errorf("dropAfterHeartbeat(%v, late %d, pending %d) = %v, want %v", tc.err, tc.late, tc.pending, got, tc.want)
		}
	}
}

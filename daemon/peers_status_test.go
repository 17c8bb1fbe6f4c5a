package daemon

import (
	"context"
	"testing"
	"time"
)

// TestPeerStatusMissed: a peer is down for status and drain --spread
// after the policy's number of heartbeats without an answer, not when one
// heartbeat failed.
func TestPeerStatusMissed(t *testing.T) {
	d := &Daemon{cfg: &Config{Name: "s1", Peers: []PeerConfig{{Name: "s2"}, {Name: "s3"}, {Name: "s4"}}}, peers: map[string]*peerConn{}}
	now := time.Now()
	d.peers["s2"] = &peerConn{lastSeen: now.Add(-HeartbeatInterval), err: context.DeadlineExceeded}
	d.peers["s3"] = &peerConn{lastSeen: now.Add(-4 * HeartbeatInterval), err: context.DeadlineExceeded}
	want := map[string]bool{"s2": true, "s3": false, "s4": false}
	for _, ps := range d.peerStatus() {
		if ps.Healthy != want[ps.Name] {
			t.Errorf("%s: healthy %v, want %v (%+v)", ps.Name, ps.Healthy, want[ps.Name], ps)
		}
		if ps.Name == "s2" && ps.Error == "" {
			t.Errorf("s2: the late heartbeat's error is not reported")
		}
	}
}

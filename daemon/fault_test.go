package daemon

import (
	"strings"
	"testing"
	"time"

	"github.com/mtcp-dev/mtcp/peer"
)

// A distant daemon still serves steering and process mode.
var (
	_ peer.Steerer        = distant{}
	_ peer.ProcessHandler = distant{}
)

func TestPeerDelay(t *testing.T) {
	defer func(f []string) { faults = f }(faults)
	for _, tc := range []struct {
		env  string
		want time.Duration
		err  string
	}{
		{env: "", want: 0},
		{env: "transfer-hang", want: 0},
		{env: "prepare-refuse,peer-delay=2ms", want: 2 * time.Millisecond},
		{env: "peer-delay=soon", err: `bad peer-delay "soon"`},
		{env: "peer-delay=-1ms", err: `bad peer-delay "-1ms"`},
	} {
		faults = strings.Split(tc.env, ",")
		d, err := peerDelay()
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one mentioning %s", tc.env, err, tc.err)
		case tc.err == "" && (err != nil || d != tc.want):
			t.Errorf("%q: %v, %v; want %v", tc.env, d, err, tc.want)
		}
	}
}

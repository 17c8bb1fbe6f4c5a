package daemon

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
)

// FaultEnv names the environment variable that injects faults, for the
// end-to-end tests of the abort paths. It holds a comma-separated list of:
//
//	prepare-refuse   the target refuses every Prepare
//	transfer-crash   the target exits (status 3) when a Transfer arrives,
//	                 as if the host died mid-transfer
//	transfer-hang    the target never answers a Transfer (until the
//	                 source's deadline cancels it)
//	pages-crash      the source of a lazy process migration exits (status
//	                 3) right after the switch, while the target still
//	                 fetches the process's memory from it
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

package testbed

import (
	"os"
	"os/exec"
)

// SkipReason returns why beds cannot be built here ("" if they can): not
// root, or ip, nft, sysctl or nsenter missing from PATH.
func SkipReason() string {
	if os.Geteuid() != 0 {
		return "testbed: needs root to create network namespaces"
	}
	for _, tool := range []string{"ip", "nft", "sysctl", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "testbed: needs " + tool + " in PATH: " + err.Error()
		}
	}
	return ""
}

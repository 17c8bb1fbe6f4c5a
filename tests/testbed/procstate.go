package testbed

import (
	"fmt"
	"os"
	"strings"
)

// ProcState is the state letter of process pid on this machine ("R",
// "S", "T" for stopped, "Z", ...), or "" if there is no such process.
func ProcState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return ""
	}
	return s[i+2 : i+3]
}

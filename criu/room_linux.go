package criu

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Room returns how many bytes of checkpoint may still be written in dir:
// what its file system has free for root, less a reserve (the larger of
// RoomReservePercent of its size and RoomReserveMin), so that an
// oversized checkpoint arriving from a peer fails with a clear error
// rather than fill a tmpfs (the machine's memory) to the brim.
func Room(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, &OpError{Op: "room", Err: fmt.Errorf("statfs %s: %w", dir, err)}
	}
	size := int64(st.Blocks) * int64(st.Bsize)
	free := int64(st.Bfree) * int64(st.Bsize)
	reserve := max(size*RoomReservePercent/100, RoomReserveMin)
	return max(free-reserve, 0), nil
}

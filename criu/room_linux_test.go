package criu

import (
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestRoom(t *testing.T) {
	dir := t.TempDir()
	room, err := Room(dir)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	free, size := int64(st.Bfree)*int64(st.Bsize), int64(st.Blocks)*int64(st.Bsize)
	reserve := max(size*RoomReservePercent/100, RoomReserveMin)
	// The file system is shared: allow for others writing meanwhile.
	if want := free - reserve; room < 0 || room > want || room < want-(16<<20) && want > 16<<20 {
		t.Errorf("Room = %d, want about %d (free %d, reserve %d)", room, want, free, reserve)
	}
	if _, err := Room(filepath.Join(dir, "missing")); err == nil {
		t.Error("Room of a missing directory: no error")
	}
}

package cgroups

import (
	"fmt"
	"os"
	"strconv"
)

// ProcessOfSocket finds a process holding the socket with inode number
// inode, by the "socket:[inode]" links under /proc/<pid>/fd. A socket found
// by a kernel lookup comes with no process (a listen event has one); this
// ties it to its allocation on nodes where its cgroup v2 id names none.
// ok is false when no process holds it (any more).
func ProcessOfSocket(inode uint64) (pid int, ok bool, err error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, false, fmt.Errorf("list processes: %w", err)
	}
	want := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		dir := "/proc/" + p.Name() + "/fd/"
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone, or a kernel thread
		}
		for _, fd := range fds {
			if link, err := os.Readlink(dir + fd.Name()); err == nil && link == want {
				return pid, true, nil
			}
		}
	}
	return 0, false, nil
}

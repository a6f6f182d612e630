package driver

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// checkReachable fails when the task's user cannot enter dir: without a
// chroot the task runs in the task directory under the client's data_dir,
// and a data_dir of mode 0700 (a common hardening step) locks it out. The
// executor would only say "permission denied".
func checkReachable(dir, username string) error {
	u, err := user.Lookup(username)
	if err != nil {
		return fmt.Errorf("user %q: %w", username, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	if uid == 0 {
		return nil
	}
	gids := map[int]bool{}
	if groups, err := u.GroupIds(); err == nil {
		for _, g := range groups {
			if n, err := strconv.Atoi(g); err == nil {
				gids[n] = true
			}
		}
	}
	if n, err := strconv.Atoi(u.Gid); err == nil {
		gids[n] = true
	}
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		info, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if ok {
			mode := info.Mode().Perm()
			var can bool
			switch {
			case int(st.Uid) == uid:
				can = mode&0o100 != 0
			case gids[int(st.Gid)]:
				can = mode&0o010 != 0
			default:
				can = mode&0o001 != 0
			}
			if !can {
				return fmt.Errorf("the task runs as %q, which cannot enter %s (mode %04o): set `user` in the task, "+
					"or let others traverse the client's data_dir (chmod o+x %s)", username, p, mode, p)
			}
		}
		if p == "/" {
			return nil
		}
	}
}

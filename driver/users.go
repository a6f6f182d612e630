package driver

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// defaultUser is who a task runs as when it does not set `user`.
const defaultUser = "nobody"

// taskUser is a task's user, resolved on the client.
type taskUser struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32
}

func lookupUser(name string) (*taskUser, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, fmt.Errorf("task user %q: %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("task user %q: uid %q: %w", name, u.Uid, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("task user %q: gid %q: %w", name, u.Gid, err)
	}
	tu := &taskUser{name: name, uid: uint32(uid), gid: uint32(gid)}
	ids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("task user %q: groups: %w", name, err)
	}
	for _, id := range ids {
		if g, err := strconv.ParseUint(id, 10, 32); err == nil {
			tu.groups = append(tu.groups, uint32(g))
		}
	}
	return tu, nil
}

// defaultDeniedUsers is denied_users when the plugin config does not set it:
// root, and the plugin's own user when that is someone else.
func defaultDeniedUsers() []string {
	denied := []string{"root"}
	if uid := os.Getuid(); uid != 0 {
		if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
			denied = append(denied, u.Username)
		}
	}
	return denied
}

// checkAllowed refuses a user named in denied, or one that shares a denied
// user's uid (a second name for root is root).
func checkAllowed(u *taskUser, denied []string) error {
	list := "[" + strings.Join(denied, ", ") + "]"
	for _, name := range denied {
		if name == u.name {
			return fmt.Errorf("task user %q is denied by the plugin option denied_users %s: "+
				"set `user` in the task to another user, or change denied_users in the client's "+
				"plugin \"nomad-driver-zeroscale\" block", u.name, list)
		}
		if d, err := user.Lookup(name); err == nil && d.Uid == strconv.FormatUint(uint64(u.uid), 10) {
			return fmt.Errorf("task user %q has uid %d, the uid of %q, which the plugin option denied_users %s denies: "+
				"set `user` in the task to another user, or change denied_users in the client's "+
				"plugin \"nomad-driver-zeroscale\" block", u.name, u.uid, name, list)
		}
	}
	return nil
}

// canEnter says whether u may search dir by its mode bits (ACLs are not
// read: a directory they open is hidden like one that is closed).
func canEnter(dir string, u *taskUser) bool {
	if u.uid == 0 {
		return true
	}
	info, err := os.Stat(dir)
	if err != nil {
		return false
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	mode := info.Mode().Perm()
	switch {
	case st.Uid == u.uid:
		return mode&0o100 != 0
	case st.Gid == u.gid || containsGID(u.groups, st.Gid):
		return mode&0o010 != 0
	default:
		return mode&0o001 != 0
	}
}

func containsGID(groups []uint32, gid uint32) bool {
	for _, g := range groups {
		if g == gid {
			return true
		}
	}
	return false
}

// ancestors lists the directories above path, from the one below / down to
// its parent.
func ancestors(path string) []string {
	var out []string
	for p := filepath.Dir(path); p != "/" && p != "."; p = filepath.Dir(p) {
		out = append([]string{p}, out...)
	}
	return out
}

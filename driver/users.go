package driver

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
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

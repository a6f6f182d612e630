package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DefaultCapabilities is Nomad's default capability set for exec-style tasks
// (drivers/shared/capabilities.HCLSpecLiteral); the bounding set is cut to it.
var DefaultCapabilities = map[int]string{
	unix.CAP_AUDIT_WRITE:      "audit_write",
	unix.CAP_CHOWN:            "chown",
	unix.CAP_DAC_OVERRIDE:     "dac_override",
	unix.CAP_FOWNER:           "fowner",
	unix.CAP_FSETID:           "fsetid",
	unix.CAP_KILL:             "kill",
	unix.CAP_MKNOD:            "mknod",
	unix.CAP_NET_BIND_SERVICE: "net_bind_service",
	unix.CAP_SETFCAP:          "setfcap",
	unix.CAP_SETGID:           "setgid",
	unix.CAP_SETPCAP:          "setpcap",
	unix.CAP_SETUID:           "setuid",
	unix.CAP_SYS_CHROOT:       "sys_chroot",
}

// isolate turns the calling thread into the task's: every call below acts on
// this thread only (namespaces, Landlock, capabilities, credentials), and the
// exec that follows makes it the whole process. init runs on the main thread,
// locked; the lock is repeated here for any other caller.
func isolate(s *Spec) error {
	runtime.LockOSThread()
	if err := mountView(s); err != nil {
		return err
	}
	if err := landlock(); err != nil {
		return err
	}
	if err := dropCapabilities(); err != nil {
		return err
	}
	if err := becomeUser(s); err != nil {
		return err
	}
	if err := unix.Chdir(s.Dir); err != nil {
		return fmt.Errorf("enter working directory %s: %w", s.Dir, err)
	}
	return nil
}

// landlock puts the task in a Landlock domain of its own. What matters is
// the domain, not the rules: the kernel refuses a process in it ptrace access
// to processes outside it, which covers /proc/<pid>/root, cwd, fd, environ
// and mem of other tasks, even of tasks running as the same user (their mount
// namespace would show their own allocation). The ruleset forbids creating
// block devices; it must handle and grant REFER, which Landlock otherwise
// denies to every ruleset (rename and link across directories would fail
// with EXDEV). ABI 1 cannot grant it, so such kernels get no domain, like
// kernels without Landlock (the driver reports both).
func landlock() error {
	if LandlockABI() < 2 {
		return nil
	}
	attr := unix.LandlockRulesetAttr{Access_fs: unix.LANDLOCK_ACCESS_FS_MAKE_BLOCK | unix.LANDLOCK_ACCESS_FS_REFER}
	// The size of Access_fs alone: accepted by every Landlock ABI.
	fd, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET,
		uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr.Access_fs), 0)
	if errno != 0 {
		return fmt.Errorf("landlock ruleset: %w", errno)
	}
	defer unix.Close(int(fd))
	root, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("landlock: open /: %w", err)
	}
	defer unix.Close(root)
	rule := unix.LandlockPathBeneathAttr{Allowed_access: unix.LANDLOCK_ACCESS_FS_REFER, Parent_fd: int32(root)}
	if _, _, errno := unix.Syscall6(unix.SYS_LANDLOCK_ADD_RULE, fd, unix.LANDLOCK_RULE_PATH_BENEATH,
		uintptr(unsafe.Pointer(&rule)), 0, 0, 0); errno != 0 {
		return fmt.Errorf("landlock rule: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, fd, 0, 0); errno != 0 {
		return fmt.Errorf("landlock: %w", errno)
	}
	return nil
}

// LandlockABI is the kernel's Landlock ABI version, 0 without Landlock.
func LandlockABI() int {
	v, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	if errno != 0 {
		return 0
	}
	return int(v)
}

// dropCapabilities cuts the bounding set to DefaultCapabilities and empties
// the ambient and inheritable sets: a root task (where root is allowed) or a
// set-user-ID program gets at most the default set.
func dropCapabilities() error {
	last := unix.CAP_LAST_CAP
	if b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			last = n
		}
	}
	for c := 0; c <= last; c++ {
		if _, keep := DefaultCapabilities[c]; keep {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	data[0].Inheritable, data[1].Inheritable = 0, 0
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("clear inheritable capabilities: %w", err)
	}
	return nil
}

// becomeUser switches this thread to the task's user. x/sys/unix makes the
// raw, per-thread system calls, which is what is wanted before an exec from
// this thread.
func becomeUser(s *Spec) error {
	groups := make([]int, len(s.Groups))
	for i, g := range s.Groups {
		groups[i] = int(g)
	}
	if err := unix.Setgroups(groups); err != nil {
		return fmt.Errorf("set groups: %w", err)
	}
	if err := unix.Setresgid(int(s.GID), int(s.GID), int(s.GID)); err != nil {
		return fmt.Errorf("set gid %d: %w", s.GID, err)
	}
	if err := unix.Setresuid(int(s.UID), int(s.UID), int(s.UID)); err != nil {
		return fmt.Errorf("set uid %d: %w", s.UID, err)
	}
	return nil
}

// execCommand replaces the launcher with the command; it returns only when
// that fails.
func execCommand(argv, env []string) int {
	path, err := lookPath(argv[0], env)
	if err != nil {
		return fail(ExitNotFound, err)
	}
	err = unix.Exec(path, argv, env)
	code := ExitNotRunnable
	if errors.Is(err, unix.ENOENT) {
		code = ExitNotFound
	}
	return fail(code, fmt.Errorf("exec %s: %w", path, err))
}

// lookPath finds a bare command name in the task's PATH, as seen from inside
// the sandbox and as the task's user.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && unix.Access(p, unix.X_OK) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q not found in PATH %s", name, path)
}

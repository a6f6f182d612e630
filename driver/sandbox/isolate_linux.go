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

// mountView builds the task's view of the filesystem in a new mount
// namespace (and a new IPC namespace, as Nomad's exec driver gives).
func mountView(s *Spec) error {
	if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_NEWIPC); err != nil {
		return fmt.Errorf("new mount namespace: %w", err)
	}
	// Slave, not private: unmounts on the host (an allocation's secrets
	// tmpfs, a volume) still reach this namespace instead of being pinned
	// by it; nothing mounted here reaches the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make mounts slave: %w", err)
	}
	// Open what is mounted back before it is hidden (and after the unshare:
	// a bind's source must be a mount of this namespace). O_NOFOLLOW: the
	// task owns its task dir (mode 0777) and could leave a symlink at tmp
	// pointing into another allocation for its next start.
	binds := make([]int, len(s.Binds))
	for i, b := range s.Binds {
		fd, err := openDir(b)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		binds[i] = fd
	}
	tmp := -1
	if s.Tmp != "" {
		if fd, err := openDir(s.Tmp); err == nil {
			defer unix.Close(fd)
			tmp = fd
		}
	}
	if err := hide(s, binds); err != nil {
		return err
	}
	return privateTmp(s, tmp)
}

// hide covers s.Hide with an empty tmpfs, mounts the binds back and makes the
// rest read-only.
func hide(s *Spec, binds []int) error {
	const hidden = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	if err := unix.Mount("tmpfs", s.Hide, "tmpfs", hidden, "mode=755,size=64k"); err != nil {
		return fmt.Errorf("hide %s: %w", s.Hide, err)
	}
	umask := unix.Umask(0o022) // the mount points must be enterable
	defer unix.Umask(umask)    // and the task gets the executor's
	for i, b := range s.Binds {
		if err := os.MkdirAll(b, 0o755); err != nil {
			return fmt.Errorf("mount point %s: %w", b, err)
		}
		if err := bind(binds[i], b, unix.MS_REC); err != nil {
			return err
		}
	}
	if err := unix.Mount("", s.Hide, "", unix.MS_REMOUNT|unix.MS_RDONLY|hidden, ""); err != nil {
		return fmt.Errorf("make %s read-only: %w", s.Hide, err)
	}
	return nil
}

// privateTmp mounts the task's tmp dir (tmp, an open descriptor, or a fresh
// tmpfs when it is -1) on the tmp targets, and a fresh tmpfs on /dev/shm.
func privateTmp(s *Spec, tmp int) error {
	for _, t := range s.TmpTargets {
		if tmp >= 0 {
			if err := bind(tmp, t, 0); err != nil {
				return err
			}
		} else if err := unix.Mount("tmpfs", t, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil {
			return fmt.Errorf("private %s: %w", t, err)
		}
	}
	if s.Shm {
		if err := unix.Mount("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil {
			return fmt.Errorf("private /dev/shm: %w", err)
		}
	}
	return nil
}

func openDir(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	return fd, nil
}

func bind(fd int, target string, flags uintptr) error {
	src := "/proc/self/fd/" + strconv.Itoa(fd)
	if err := unix.Mount(src, target, "", unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("mount %s: %w", target, err)
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

package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// staging is where the new root is built before pivot_root: the host's /tmp,
// which this namespace hides anyway (bubblewrap does the same). Whatever is
// needed from below it is opened first.
const staging = "/tmp"

// devNodes are the host's device nodes a task gets in its /dev; pts and ptmx
// serve `nomad alloc exec -t`, whose terminal the executor opens on the host.
var devNodes = []string{"null", "zero", "full", "random", "urandom", "tty", "ptmx"}

// devLinks are the symbolic links of a minimal /dev.
var devLinks = map[string]string{
	"fd":     "/proc/self/fd",
	"stdin":  "/proc/self/fd/0",
	"stdout": "/proc/self/fd/1",
	"stderr": "/proc/self/fd/2",
}

// mountView builds the task's root in a new mount namespace (and a new IPC
// namespace, as Nomad's exec driver gives) and pivots into it: nothing of the
// host's filesystem is left but what is mounted into it.
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
	// Open the task's directories before the staging tmpfs covers them (and
	// after the unshare: a bind's source must be a mount of this namespace).
	// O_NOFOLLOW: the task owns its task dir (mode 0777) and could leave a
	// symlink at tmp pointing into another allocation for its next start.
	binds := make([]int, len(s.Binds))
	for i, b := range s.Binds {
		fd, err := openDir(b.Source)
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
	if err := unix.Mount("tmpfs", staging, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755,size=1m"); err != nil {
		return fmt.Errorf("new root: %w", err)
	}
	umask := unix.Umask(0o022) // the mount points must be enterable
	defer unix.Umask(umask)    // and the task gets the executor's
	if err := buildRoot(s, binds, tmp); err != nil {
		return err
	}
	return pivot()
}

// buildRoot fills the staging tmpfs, then makes it read-only. Every mount
// point is made in it before anything task-owned is mounted above, and no
// bind nests in another (Validate), so no path made here runs through a
// directory the task could have prepared.
func buildRoot(s *Spec, binds []int, tmp int) error {
	for _, t := range s.Tmpfs {
		if err := mountTmpfs(t); err != nil {
			return err
		}
	}
	for _, r := range s.Root {
		if err := mountHost(r); err != nil {
			return err
		}
	}
	for i, b := range s.Binds {
		if err := mkdir(b.Target); err != nil {
			return err
		}
		if err := bind(binds[i], b.Target, unix.MS_REC); err != nil {
			return err
		}
	}
	for _, t := range s.TmpTargets {
		if tmp < 0 {
			if err := mountTmpfs(t); err != nil {
				return err
			}
			continue
		}
		if err := mkdir(t); err != nil {
			return err
		}
		if err := bind(tmp, t, 0); err != nil {
			return err
		}
	}
	if err := mountDev(); err != nil {
		return err
	}
	// The host's /proc: there is no PID namespace, and Landlock keeps the
	// /proc/<pid> entries of processes outside the task's domain out of reach.
	if err := mkdir("/proc"); err != nil {
		return err
	}
	if err := unix.Mount("/proc", staging+"/proc", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	if err := unix.Mount("", staging, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("make the new root read-only: %w", err)
	}
	return nil
}

// mountHost mounts the host's path at its own path in the new root,
// read-only, nosuid and nodev with all that is mounted below it; a symlink
// is copied, a missing path skipped.
func mountHost(path string) error {
	info, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("chroot_env %s: %w", path, err)
	}
	target := staging + path
	if err := mkdir(filepath.Dir(path)); err != nil {
		return err
	}
	switch {
	case info.Mode()&os.ModeSymlink != 0:
		link, err := os.Readlink(path)
		if err != nil {
			return fmt.Errorf("chroot_env %s: %w", path, err)
		}
		if err := os.Symlink(link, target); err != nil {
			return fmt.Errorf("chroot_env %s: %w", path, err)
		}
		return nil
	case info.IsDir():
		err = os.Mkdir(target, 0o755)
	default:
		err = touch(target)
	}
	if err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mount point %s: %w", path, err)
	}
	if err := unix.Mount(path, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("mount %s: %w", path, err)
	}
	return readOnly(target)
}

// readOnly makes a bind mount and every mount below it read-only, nosuid
// and nodev. Kernels before 5.12 (no mount_setattr) get the top one only.
func readOnly(target string) error {
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	err := unix.MountSetattr(unix.AT_FDCWD, target, unix.AT_RECURSIVE|unix.AT_SYMLINK_NOFOLLOW, &attr)
	if errors.Is(err, unix.ENOSYS) {
		err = unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, "")
	}
	if err != nil {
		return fmt.Errorf("make %s read-only: %w", target, err)
	}
	return nil
}

// mountDev makes a minimal, read-only /dev: the host's harmless device
// nodes and its ptys, the usual links into /proc and a fresh /dev/shm.
func mountDev() error {
	dev := staging + "/dev"
	if err := mkdir("/dev"); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=755,size=64k"); err != nil {
		return fmt.Errorf("mount /dev: %w", err)
	}
	for _, name := range devNodes {
		host := "/dev/" + name
		if _, err := os.Stat(host); err != nil {
			continue
		}
		if err := touch(dev + "/" + name); err != nil {
			return fmt.Errorf("mount point %s: %w", host, err)
		}
		if err := unix.Mount(host, dev+"/"+name, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("mount %s: %w", host, err)
		}
	}
	if info, err := os.Stat("/dev/pts"); err == nil && info.IsDir() {
		if err := os.Mkdir(dev+"/pts", 0o755); err != nil {
			return fmt.Errorf("mount point /dev/pts: %w", err)
		}
		if err := unix.Mount("/dev/pts", dev+"/pts", "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("mount /dev/pts: %w", err)
		}
	}
	for name, link := range devLinks {
		if err := os.Symlink(link, dev+"/"+name); err != nil {
			return fmt.Errorf("/dev/%s: %w", name, err)
		}
	}
	if err := mountTmpfs("/dev/shm"); err != nil {
		return err
	}
	if err := unix.Mount("", dev, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("make /dev read-only: %w", err)
	}
	return nil
}

// pivot makes the staging tmpfs the root and detaches the host's.
func pivot() error {
	if err := unix.Chdir(staging); err != nil {
		return fmt.Errorf("enter the new root: %w", err)
	}
	// The old root is stacked on the new one and detached from above it.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the host's root: %w", err)
	}
	return unix.Chdir("/")
}

// mountTmpfs mounts a fresh tmpfs of mode 1777 at path in the new root.
func mountTmpfs(path string) error {
	if err := mkdir(path); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", staging+path, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil {
		return fmt.Errorf("private %s: %w", path, err)
	}
	return nil
}

// mkdir makes path and its parents in the new root.
func mkdir(path string) error {
	if err := os.MkdirAll(staging+path, 0o755); err != nil {
		return fmt.Errorf("mount point %s: %w", path, err)
	}
	return nil
}

func touch(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

func openDir(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	return fd, nil
}

// bind mounts the directory open as fd at path in the new root.
func bind(fd int, path string, flags uintptr) error {
	src := "/proc/self/fd/" + strconv.Itoa(fd)
	if err := unix.Mount(src, staging+path, "", unix.MS_BIND|flags, ""); err != nil {
		return fmt.Errorf("mount %s: %w", path, err)
	}
	return nil
}

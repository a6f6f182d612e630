package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

// chrootEnv is Nomad's default chroot_env (client/config.DefaultChrootEnv):
// the host paths a task sees, read-only, at their own path. The exec driver
// copies them into each task dir; the sandbox mounts them, which costs
// nothing. Paths missing on the host are skipped.
var chrootEnv = []string{
	"/bin", "/etc", "/lib", "/lib32", "/lib64", "/run/resolvconf", "/run/systemd/resolve", "/sbin", "/usr",
}

// tmpDirs are given the task's tmp dir.
var tmpDirs = []string{"/tmp", "/var/tmp"}

// sandboxSpec decides a task's isolation (driver/sandbox carries it out): a
// new root with chrootEnv read-only; this allocation's shared dir and this
// task's dir read-write at the paths Nomad gives the task; the task's tmp dir
// on /tmp and /var/tmp, except a tmp dir that holds the allocation (as in
// tests), which gets a fresh tmpfs below which the allocation is mounted.
func sandboxSpec(allocDir, taskName string, u *taskUser) (*sandbox.Spec, error) {
	resolved, err := filepath.EvalSymlinks(allocDir)
	if err != nil {
		return nil, fmt.Errorf("resolve alloc dir: %w", err)
	}
	taskDir := filepath.Join(allocDir, taskName)
	spec := &sandbox.Spec{
		Version: sandbox.SpecVersion,
		UID:     u.uid,
		GID:     u.gid,
		Groups:  u.groups,
		Root:    chrootEnv,
		Binds: []sandbox.Bind{
			{Source: filepath.Join(resolved, "alloc"), Target: filepath.Join(allocDir, "alloc")},
			{Source: filepath.Join(resolved, taskName), Target: taskDir},
		},
		Tmp: filepath.Join(resolved, taskName, "tmp"),
		Dir: taskDir,
	}
	for _, dir := range tmpDirs {
		if sandbox.Below(allocDir, dir) {
			spec.Tmpfs = append(spec.Tmpfs, dir)
		} else {
			spec.TmpTargets = append(spec.TmpTargets, dir)
		}
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("%w (the alloc dir cannot lie in a chroot_env directory)", err)
	}
	return spec, nil
}

// checkInView fails for a command the task could not see: one neither in
// what is mounted read-write nor in the host paths it sees read-only.
func checkInView(command string, spec *sandbox.Spec) error {
	resolved, err := filepath.EvalSymlinks(command)
	if err != nil {
		resolved = command
	}
	for _, b := range spec.Binds {
		if sandbox.Below(command, b.Target) || sandbox.Below(resolved, b.Source) {
			return nil
		}
	}
	for _, r := range spec.Root {
		if dir, err := filepath.EvalSymlinks(r); err == nil && sandbox.Below(resolved, dir) {
			return nil
		}
	}
	return fmt.Errorf("config.command: %q is outside what the task sees: its task dir, the "+
		"allocation's shared dir and, read-only, %s", resolved, strings.Join(spec.Root, ", "))
}

// makeExecutable does for a command in the task dir what the executor did
// before it started our launcher instead: artifacts often lose their mode.
func makeExecutable(command, taskDir string) error {
	if !sandbox.Below(command, taskDir) {
		return nil
	}
	info, err := os.Stat(command)
	if err != nil {
		return err
	}
	if perm := info.Mode().Perm(); perm&0o555 != 0o555 {
		if err := os.Chmod(command, perm|0o555); err != nil {
			return fmt.Errorf("make %s executable: %w", command, err)
		}
	}
	return nil
}

// launcherPath is how the executor is told to run our binary. The executor
// looks a command up in the task's local/ dir and task dir before taking a
// host path (lookupBin), so a job that left a file at local/<our path> would
// have it run as root. Enough "/.." in front make each of those joined paths
// clean back to our binary, and the kernel reads "/.." at the root as "/".
func launcherPath(self, taskDir string) string {
	depth := strings.Count(filepath.Clean(taskDir), "/") + 1 // + "local"
	return strings.Repeat("/..", depth) + self
}

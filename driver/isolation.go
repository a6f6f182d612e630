package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

// sandboxSpec decides a task's isolation (driver/sandbox carries it out):
//
//   - hidden: the client's data dir when the alloc dir is Nomad's default
//     <data_dir>/alloc (it holds client state, other allocations, plugins),
//     else the alloc dir; or a directory above them that the task's user
//     cannot enter anyway, so that a data dir of mode 0700 needs no opening;
//   - mounted back: this allocation's shared dir and this task's dir only,
//     not other tasks of the group;
//   - the task's tmp dir on /tmp and /var/tmp, a fresh /dev/shm (each left
//     to the host when the allocation itself lies below it, as in tests).
func sandboxSpec(allocDir, taskName string, u *taskUser) (*sandbox.Spec, error) {
	resolved, err := filepath.EvalSymlinks(allocDir)
	if err != nil {
		return nil, fmt.Errorf("resolve alloc dir: %w", err)
	}
	taskDir := filepath.Join(resolved, taskName)
	spec := &sandbox.Spec{
		Version: sandbox.SpecVersion,
		UID:     u.uid,
		GID:     u.gid,
		Groups:  u.groups,
		Hide:    hideRoot(resolved, u),
		Binds:   []string{filepath.Join(resolved, "alloc"), taskDir},
		Tmp:     filepath.Join(taskDir, "tmp"),
		Dir:     filepath.Join(allocDir, taskName),
	}
	seen := map[string]bool{}
	for _, dir := range []string{"/tmp", "/var/tmp"} {
		target, err := filepath.EvalSymlinks(dir)
		if err != nil || seen[target] || !isDir(target) || !outside(spec.Hide, target) {
			continue
		}
		seen[target] = true
		spec.TmpTargets = append(spec.TmpTargets, target)
	}
	spec.Shm = isDir("/dev/shm") && outside(spec.Hide, "/dev/shm")
	return spec, spec.Validate()
}

// hideRoot is the directory the sandbox covers with an empty tmpfs.
func hideRoot(allocDir string, u *taskUser) string {
	root := filepath.Dir(allocDir)
	if filepath.Base(root) == "alloc" && isDir(filepath.Join(filepath.Dir(root), "client")) {
		root = filepath.Dir(root)
	}
	for _, dir := range ancestors(root) {
		if !canEnter(dir, u) {
			return dir
		}
	}
	return root
}

// outside says whether target can take a mount of its own: it neither holds
// hide (and so the task's own directories) nor is hidden in it.
func outside(hide, target string) bool {
	return hide != target && !sandbox.Below(hide, target) && !sandbox.Below(target, hide)
}

func isDir(path string) bool {
	info, err := os.Stat(path)
	return err == nil && info.IsDir()
}

// checkInView fails for a command the task could not see: one in the hidden
// directory but not in what is mounted back.
func checkInView(command string, spec *sandbox.Spec) error {
	resolved, err := filepath.EvalSymlinks(command)
	if err != nil {
		resolved = command
	}
	if !sandbox.Below(resolved, spec.Hide) {
		return nil
	}
	for _, b := range spec.Binds {
		if sandbox.Below(resolved, b) {
			return nil
		}
	}
	return fmt.Errorf("config.command: %q is outside what the task sees: only its task dir and the "+
		"allocation's shared dir are visible below %s", command, spec.Hide)
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

// Package sandbox is the launcher that puts a `zeroscale` task into its
// isolation. The executor starts this binary as root with argv[1] = Command;
// the launcher builds a private mount and IPC namespace with a new root: a
// fresh tmpfs holding, read-only, the host directories of Nomad's default
// chroot_env (/usr, /etc, /bin, …), read-write this allocation's shared dir and
// this task's dir at their own paths, a minimal /dev, the host's /proc, and
// the task's own /tmp and /dev/shm. It pivots into it, puts the task in its
// own Landlock domain, drops the capability bounding set to Nomad's default
// set, switches to the task's user and execs the command in place: the
// process the executor watches and signals is the task itself, and nothing
// stays resident. Bind mounts copy nothing, so a start costs milliseconds
// where the exec driver's chroot copy costs seconds.
//
// It runs from init, before the plugin's other packages are initialised: the
// launcher is on the path of every wake, and main would start ~13 ms later.
package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Command is argv[1] of the launcher.
const Command = "zeroscale-sandbox"

// EnvPrefix marks the task's environment in the launcher's. The launcher runs
// as root and is dynamically linked, so it must not see the task's variables
// as they are: LD_PRELOAD, GLIBC_TUNABLES or GODEBUG from a job would act on a
// root process. It strips the prefix when it execs the command.
const EnvPrefix = "ZEROSCALE_ENV_"

// SpecVersion is the version of Spec this launcher understands. Version 1
// (unreleased) hid the data dir in the host's root instead of building one.
const SpecVersion = 2

// Exit codes of a launcher that could not start the command (as a shell's).
const (
	ExitSetup       = 125 // the isolation could not be built
	ExitNotRunnable = 126 // the command exists but cannot be executed
	ExitNotFound    = 127 // the command does not exist in the task's view
)

// Spec says how to isolate one task. The driver decides; the launcher only
// carries it out and checks that it is well formed.
type Spec struct {
	Version int `json:"version" codec:"version"`

	// The task's user.
	UID    uint32   `json:"uid" codec:"uid"`
	GID    uint32   `json:"gid" codec:"gid"`
	Groups []uint32 `json:"groups,omitempty" codec:"groups"`

	// Root lists the host paths the task sees read-only (and nosuid, nodev)
	// at their own path in its new root, Nomad's chroot_env: a symlink is
	// copied as a symlink, a path missing on the host is skipped.
	Root []string `json:"root" codec:"root"`
	// Binds are mounted read-write, with what is mounted below them: the
	// allocation's shared dir and the task's dir, from their resolved paths
	// to the paths Nomad gives the task.
	Binds []Bind `json:"binds" codec:"binds"`
	// Tmpfs are fresh tmpfs mounts (mode 1777) made before the binds: a tmp
	// dir that holds the allocation itself, as in tests.
	Tmpfs []string `json:"tmpfs,omitempty" codec:"tmpfs"`
	// Tmp is the task's tmp dir, mounted on each of TmpTargets (/tmp,
	// /var/tmp); a fresh tmpfs takes its place if it is not a directory.
	Tmp        string   `json:"tmp,omitempty" codec:"tmp"`
	TmpTargets []string `json:"tmp_targets,omitempty" codec:"tmp_targets"`
	// Dir is the working directory of the command.
	Dir string `json:"dir" codec:"dir"`
}

// Bind mounts the host directory Source at Target in the new root.
type Bind struct {
	Source string `json:"source" codec:"source"`
	Target string `json:"target" codec:"target"`
}

// Built are the paths the launcher makes itself in the new root; Root must
// leave them alone.
var Built = []string{"/dev", "/proc"}

// Validate checks what the launcher relies on: absolute, clean paths; binds
// that neither nest in each other nor meet what is mounted read-only, so that
// a mount point is never made inside a directory the task owns or the host's.
func (s *Spec) Validate() error {
	if s.Version != SpecVersion {
		return fmt.Errorf("spec version %d, this launcher knows %d", s.Version, SpecVersion)
	}
	paths := append([]string{s.Dir}, s.Root...)
	paths = append(paths, s.Tmpfs...)
	paths = append(paths, s.TmpTargets...)
	for _, b := range s.Binds {
		paths = append(paths, b.Source, b.Target)
	}
	if s.Tmp != "" {
		paths = append(paths, s.Tmp)
	}
	for _, p := range paths {
		if !clean(p) {
			return fmt.Errorf("path %q is not absolute and clean", p)
		}
	}
	if len(s.Binds) == 0 {
		return errors.New("no task dir to mount")
	}
	for _, r := range s.Root {
		for _, b := range Built {
			if Overlap(r, b) {
				return fmt.Errorf("%q meets %s, which the sandbox builds itself", r, b)
			}
		}
	}
	for i, b := range s.Binds {
		for _, r := range s.Root {
			if Overlap(b.Target, r) {
				return fmt.Errorf("%q meets %q, which the task sees read-only from the host", b.Target, r)
			}
		}
		for _, other := range s.Binds[i+1:] {
			if Overlap(b.Target, other.Target) {
				return fmt.Errorf("%q and %q nest", b.Target, other.Target)
			}
		}
		for _, t := range s.Tmpfs {
			if t == b.Target || Below(t, b.Target) {
				return fmt.Errorf("tmpfs %q lies in %q", t, b.Target)
			}
		}
		for _, t := range s.TmpTargets {
			if Overlap(t, b.Target) {
				return fmt.Errorf("tmp target %q meets %q", t, b.Target)
			}
		}
	}
	return nil
}

func clean(p string) bool { return filepath.IsAbs(p) && filepath.Clean(p) == p }

// Overlap says whether a and b are the same path or one lies inside the other.
func Overlap(a, b string) bool {
	return a == b || Below(a, b) || Below(b, a)
}

// Below says whether path lies strictly inside dir.
func Below(path, dir string) bool {
	if dir == "/" {
		return path != "/"
	}
	return strings.HasPrefix(path, dir+"/")
}

// Args is the launcher's argv after the binary: the command runs argv.
func Args(s *Spec, argv []string) ([]string, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	return append([]string{Command, string(b), "--"}, argv...), nil
}

// Env is the task's environment as the launcher receives it.
func Env(env []string) []string {
	out := make([]string, len(env))
	for i, kv := range env {
		out[i] = EnvPrefix + kv
	}
	return out
}

// taskEnv recovers the task's environment from the launcher's; anything else
// in it is dropped.
func taskEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if rest, ok := strings.CutPrefix(kv, EnvPrefix); ok {
			out = append(out, rest)
		}
	}
	return out
}

// parseArgs splits `<spec> -- <command> [args…]`.
func parseArgs(args []string) (*Spec, []string, error) {
	if len(args) < 3 || args[1] != "--" {
		return nil, nil, errors.New("usage: " + Command + " <spec> -- <command> [args…]")
	}
	var s Spec
	if err := json.Unmarshal([]byte(args[0]), &s); err != nil {
		return nil, nil, fmt.Errorf("spec: %w", err)
	}
	if err := s.Validate(); err != nil {
		return nil, nil, fmt.Errorf("spec: %w", err)
	}
	return &s, args[2:], nil
}

func init() {
	if len(os.Args) > 1 && os.Args[1] == Command {
		os.Exit(run(os.Args[2:]))
	}
}

// run isolates the process and execs the command; it returns only on failure.
func run(args []string) int {
	spec, argv, err := parseArgs(args)
	if err != nil {
		return fail(ExitSetup, err)
	}
	env := taskEnv(os.Environ())
	if err := isolate(spec); err != nil {
		return fail(ExitSetup, err)
	}
	return execCommand(argv, env)
}

func fail(code int, err error) int {
	fmt.Fprintf(os.Stderr, "zeroscale sandbox: %v\n", err)
	return code
}

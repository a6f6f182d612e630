// Package sandbox is the launcher that puts a `zeroscale` task into its
// isolation. The executor starts this binary as root with argv[1] = Command;
// the launcher builds a private mount and IPC namespace in which the client's
// allocations (or its whole data dir) are an empty tmpfs with only this
// allocation's shared dir and this task's dir mounted back, gives the task its
// own /tmp and /dev/shm, puts it in its own Landlock domain, drops the
// capability bounding set to Nomad's default set, switches to the task's user
// and execs the command in place: the process the executor watches and
// signals is the task itself, and nothing stays resident.
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

// SpecVersion is the version of Spec this launcher understands.
const SpecVersion = 1

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

	// Hide is covered by an empty, read-only tmpfs: the client's data dir
	// (or its alloc dir) or a higher directory the user cannot enter anyway.
	Hide string `json:"hide" codec:"hide"`
	// Binds are directories below Hide mounted back at their own path: the
	// allocation's shared dir and the task's dir.
	Binds []string `json:"binds" codec:"binds"`
	// Tmp is the task's tmp dir, mounted on each of TmpTargets (/tmp,
	// /var/tmp); a fresh tmpfs takes its place if it is not a directory.
	Tmp        string   `json:"tmp,omitempty" codec:"tmp"`
	TmpTargets []string `json:"tmp_targets,omitempty" codec:"tmp_targets"`
	// Shm mounts a fresh tmpfs on /dev/shm.
	Shm bool `json:"shm,omitempty" codec:"shm"`
	// Dir is the working directory of the command.
	Dir string `json:"dir" codec:"dir"`
}

// Validate checks what the launcher relies on: absolute, clean paths, binds
// strictly below Hide.
func (s *Spec) Validate() error {
	if s.Version != SpecVersion {
		return fmt.Errorf("spec version %d, this launcher knows %d", s.Version, SpecVersion)
	}
	for _, p := range append([]string{s.Hide, s.Dir}, s.Binds...) {
		if !clean(p) {
			return fmt.Errorf("path %q is not absolute and clean", p)
		}
	}
	if s.Hide == "/" {
		return errors.New("cannot hide /")
	}
	if len(s.Binds) == 0 {
		return errors.New("nothing to mount back below " + s.Hide)
	}
	for _, b := range s.Binds {
		if !Below(b, s.Hide) {
			return fmt.Errorf("%q is not below %q", b, s.Hide)
		}
	}
	for _, t := range s.TmpTargets {
		if !clean(t) || s.Tmp != "" && !clean(s.Tmp) {
			return fmt.Errorf("tmp %q on %q: not absolute and clean", s.Tmp, t)
		}
	}
	return nil
}

func clean(p string) bool { return filepath.IsAbs(p) && filepath.Clean(p) == p }

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

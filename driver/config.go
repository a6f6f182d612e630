package driver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

// taskConfigSpec is the `config { … }` block of a task with driver = "zeroscale".
var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"command": hclspec.NewAttr("command", "string", true),
	"args":    hclspec.NewAttr("args", "list(string)", false),
})

// TaskConfig is the decoded task `config` block.
type TaskConfig struct {
	Command string   `codec:"command"`
	Args    []string `codec:"args"`
}

func (c *TaskConfig) validate() error {
	if strings.TrimSpace(c.Command) == "" {
		return errors.New("config.command: must not be empty")
	}
	return nil
}

// resolveCommand finds the executable the way the universal executor will
// (task local dir, task dir, absolute host path, then PATH), so that a missing
// command fails StartTask with a message that says where we looked instead of
// failing inside the executor.
func resolveCommand(command, taskDir string, env map[string]string) (string, error) {
	candidates := []string{
		filepath.Join(taskDir, "local", command),
		filepath.Join(taskDir, command),
	}
	if filepath.IsAbs(command) {
		candidates = []string{command}
	}
	for _, path := range candidates {
		if info, err := os.Stat(path); err == nil {
			if info.IsDir() {
				return "", fmt.Errorf("config.command: %q is a directory, not an executable", path)
			}
			return path, nil
		}
	}
	if filepath.IsAbs(command) {
		return "", fmt.Errorf("config.command: %q does not exist on this client", command)
	}
	if !strings.Contains(command, "/") {
		if found, err := lookPath(command, env["PATH"]); err == nil {
			return found, nil
		}
	}
	return "", fmt.Errorf("config.command: %q not found in %s, %s or $PATH",
		command, filepath.Join(taskDir, "local"), taskDir)
}

// lookPath searches the task's PATH first, then the agent's.
func lookPath(command, taskPath string) (string, error) {
	for _, dir := range filepath.SplitList(taskPath) {
		if dir == "" {
			continue
		}
		path := filepath.Join(dir, command)
		if info, err := os.Stat(path); err == nil && !info.IsDir() && info.Mode()&0o111 != 0 {
			return path, nil
		}
	}
	return exec.LookPath(command)
}

// configAttrs are the driver's fields of the plugin config block. The plugin
// package owns that block and merges them into it (WithConfigSpec).
var configAttrs = map[string]*hclspec.Spec{
	// Without a default in the spec: unset means defaultDeniedUsers, and an
	// explicit [] denies no one.
	"denied_users": hclspec.NewAttr("denied_users", "list(string)", false),
}

// pluginConfig is the driver's part of the decoded plugin config.
type pluginConfig struct {
	DeniedUsers *[]string `codec:"denied_users"`
}

// WithConfigSpec returns the object spec with the driver's fields added.
func WithConfigSpec(spec *hclspec.Spec) *hclspec.Spec {
	attrs := map[string]*hclspec.Spec{}
	for name, s := range spec.GetObject().GetAttributes() {
		attrs[name] = s
	}
	for name, s := range configAttrs {
		attrs[name] = s
	}
	return hclspec.NewObject(attrs)
}

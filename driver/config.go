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

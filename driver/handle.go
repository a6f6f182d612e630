package driver

import (
	"context"
	"strconv"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	goplugin "github.com/hashicorp/go-plugin"
	"github.com/hashicorp/nomad/drivers/shared/executor"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

// taskHandle supervises one task through its executor process.
type taskHandle struct {
	exec         executor.Executor
	pluginClient *goplugin.Client
	logger       hclog.Logger
	pid          int
	taskConfig   *drivers.TaskConfig
	startedAt    time.Time
	// sandbox is how the task was isolated; nil for a task started by a
	// version 1 plugin, whose executor runs commands as the task's user.
	sandbox *sandbox.Spec

	// exited is closed once the task's process has ended.
	exited chan struct{}

	mu          sync.RWMutex
	state       drivers.TaskState
	completedAt time.Time
	exitResult  *drivers.ExitResult
}

func newTaskHandle(exec executor.Executor, client *goplugin.Client, logger hclog.Logger,
	pid int, cfg *drivers.TaskConfig, startedAt time.Time, spec *sandbox.Spec) *taskHandle {
	return &taskHandle{
		exec:         exec,
		pluginClient: client,
		logger:       logger,
		pid:          pid,
		taskConfig:   cfg,
		startedAt:    startedAt,
		sandbox:      spec,
		exited:       make(chan struct{}),
		state:        drivers.TaskStateRunning,
	}
}

func (h *taskHandle) status() *drivers.TaskStatus {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return &drivers.TaskStatus{
		ID:          h.taskConfig.ID,
		Name:        h.taskConfig.Name,
		State:       h.state,
		StartedAt:   h.startedAt,
		CompletedAt: h.completedAt,
		ExitResult:  h.exitResult.Copy(),
		DriverAttributes: map[string]string{
			"pid": strconv.Itoa(h.pid),
		},
	}
}

func (h *taskHandle) running() bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.state == drivers.TaskStateRunning
}

func (h *taskHandle) result() *drivers.ExitResult {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.exitResult.Copy()
}

// watch blocks until the process exits and records how it ended.
func (h *taskHandle) watch() {
	defer close(h.exited)
	ps, err := h.exec.Wait(context.Background())

	h.mu.Lock()
	defer h.mu.Unlock()
	h.completedAt = time.Now()
	if err != nil {
		// The executor went away (killed with the plugin, or the node
		// rebooted): the task's fate is unknown, not a clean exit.
		h.logger.Error("lost the task's executor", "error", err)
		h.state = drivers.TaskStateUnknown
		h.exitResult = &drivers.ExitResult{ExitCode: -1, Err: err}
		return
	}
	h.state = drivers.TaskStateExited
	h.completedAt = ps.Time
	h.exitResult = &drivers.ExitResult{
		ExitCode:  ps.ExitCode,
		Signal:    ps.Signal,
		OOMKilled: ps.OOMKilled,
	}
}

// command is how a command exec'd in the task (a script check, `nomad alloc
// exec`) is run: through the launcher, into the same isolation and user as
// the task, for a sandboxed task; as it is for a version 1 task, whose
// executor sets the user itself.
func (h *taskHandle) command(launcher string, argv []string) ([]string, error) {
	if h.sandbox == nil {
		return argv, nil
	}
	args, err := sandbox.Args(h.sandbox, argv)
	if err != nil {
		return nil, err
	}
	return append([]string{launcher}, args...), nil
}

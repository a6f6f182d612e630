// Package driver is the `zeroscale` task driver: exec-style tasks (a command
// and its args) supervised by Nomad's universal executor, with cgroups, logs,
// stats, exec, signals and recovery after a client or plugin restart. Each
// task runs in a sandbox (package sandbox) that hides other allocations and
// drops to the task's user and Nomad's default capabilities.
package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/hashicorp/consul-template/signals"
	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cgroupslib"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/client/lib/numalib"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/drivers/shared/executor"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/fsisolation"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"
	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

const (
	// Name is what jobs write as `driver = "zeroscale"`.
	Name = "zeroscale"

	fingerprintPeriod = 30 * time.Second
)

// Version is the plugin version, stamped at build time with -ldflags -X.
var Version = "0.1.0-dev"

var capabilities = &drivers.Capabilities{
	SendSignals: true,
	Exec:        true,
	FSIsolation: fsisolation.None,
	NetIsolationModes: []drivers.NetIsolationMode{
		drivers.NetIsolationModeHost,
		drivers.NetIsolationModeGroup,
	},
	MountConfigs: drivers.MountConfigSupportNone,
}

// GateStatus says whether this node can run the XDP gate; the node agent
// sets it and the fingerprint publishes it.
type GateStatus struct {
	Supported bool
	Reason    string
}

// Driver runs exec-style tasks. The zero value is not usable; call New.
type Driver struct {
	ctx     context.Context
	logger  hclog.Logger
	eventer *eventer.Eventer
	tasks   *taskStore

	// launcher is this binary, which the executor starts as the sandbox.
	launcher string
	// landlock says whether the kernel gives tasks a Landlock domain.
	landlock bool

	mu          sync.RWMutex
	nomadConfig *base.ClientDriverConfig
	compute     cpustats.Compute
	gate        GateStatus
	healthIssue string
	deniedUsers []string

	// fingerprintNow wakes the fingerprint loop when the gate status changes.
	fingerprintNow chan struct{}
}

// New returns a driver whose background work stops when ctx is done.
func New(ctx context.Context, logger hclog.Logger) *Driver {
	logger = logger.Named(Name)
	topology := numalib.Scan(numalib.PlatformScanners(false))
	launcher, err := os.Executable()
	if err != nil {
		logger.Error("cannot find our own binary; tasks will not start", "error", err)
	}
	return &Driver{
		ctx:            ctx,
		logger:         logger,
		eventer:        eventer.NewEventer(ctx, logger),
		tasks:          newTaskStore(),
		launcher:       launcher,
		landlock:       sandbox.LandlockABI() >= 2,
		nomadConfig:    &base.ClientDriverConfig{Topology: topology},
		compute:        topology.Compute(),
		gate:           GateStatus{Reason: "node agent not started: waiting for the plugin config"},
		deniedUsers:    defaultDeniedUsers(),
		fingerprintNow: make(chan struct{}, 1),
	}
}

// PluginInfo describes the plugin to Nomad.
func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) {
	return &base.PluginInfoResponse{
		Type:              base.PluginTypeDriver,
		PluginApiVersions: []string{drivers.ApiVersion010},
		PluginVersion:     Version,
		Name:              Name,
	}, nil
}

// ConfigSchema holds the driver's own fields; the plugin package merges them
// into the plugin config block it owns.
func (d *Driver) ConfigSchema() (*hclspec.Spec, error) {
	return hclspec.NewObject(configAttrs), nil
}

// SetConfig takes the driver's fields of the plugin config (applied to tasks
// started from now on) and the parts of the agent's config the executor
// needs.
func (d *Driver) SetConfig(cfg *base.Config) error {
	if cfg == nil {
		return nil
	}
	denied := defaultDeniedUsers()
	if len(cfg.PluginConfig) > 0 {
		var pc pluginConfig
		if err := base.MsgPackDecode(cfg.PluginConfig, &pc); err != nil {
			return fmt.Errorf("decode the driver's plugin config: %w", err)
		}
		if pc.DeniedUsers != nil {
			denied = *pc.DeniedUsers
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.deniedUsers = denied
	if cfg.AgentConfig == nil || cfg.AgentConfig.Driver == nil {
		return nil
	}
	d.nomadConfig = cfg.AgentConfig.Driver
	if d.nomadConfig.Topology != nil {
		d.compute = cfg.AgentConfig.Compute()
	}
	return nil
}

// SetGateStatus records whether the XDP gate works on this node and pushes a
// fresh fingerprint.
func (d *Driver) SetGateStatus(status GateStatus) {
	d.mu.Lock()
	d.gate = status
	d.mu.Unlock()
	d.pokeFingerprint()
}

// SetHealthIssue marks the driver unhealthy with a reason (for example an
// invalid plugin config); an empty reason clears it.
func (d *Driver) SetHealthIssue(reason string) {
	d.mu.Lock()
	d.healthIssue = reason
	d.mu.Unlock()
	d.pokeFingerprint()
}

func (d *Driver) pokeFingerprint() {
	select {
	case d.fingerprintNow <- struct{}{}:
	default:
	}
}

// TaskConfigSchema is the task `config` block.
func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) {
	return taskConfigSpec, nil
}

// Capabilities lists what the driver supports.
func (d *Driver) Capabilities() (*drivers.Capabilities, error) {
	return capabilities, nil
}

// Fingerprint sends the driver's health now, every 30 s, and whenever the
// gate status changes.
func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		timer := time.NewTimer(0)
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-timer.C:
				timer.Reset(fingerprintPeriod)
			case <-d.fingerprintNow:
			}
			select {
			case ch <- d.fingerprint():
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

func (d *Driver) fingerprint() *drivers.Fingerprint {
	if runtime.GOOS != "linux" {
		return &drivers.Fingerprint{
			Health:            drivers.HealthStateUndetected,
			HealthDescription: "the zeroscale driver runs only on Linux",
		}
	}
	if os.Geteuid() != 0 {
		return &drivers.Fingerprint{
			Health:            drivers.HealthStateUndetected,
			HealthDescription: drivers.DriverRequiresRootMessage,
		}
	}
	if cgroupslib.GetMode() == cgroupslib.OFF {
		return &drivers.Fingerprint{
			Health:            drivers.HealthStateUnhealthy,
			HealthDescription: drivers.NoCgroupMountMessage,
		}
	}

	d.mu.RLock()
	gate, issue := d.gate, d.healthIssue
	d.mu.RUnlock()

	fp := &drivers.Fingerprint{
		Attributes: map[string]*pstructs.Attribute{
			"driver.zeroscale":          pstructs.NewBoolAttribute(true),
			"driver.zeroscale.version":  pstructs.NewStringAttribute(Version),
			"driver.zeroscale.gate":     pstructs.NewBoolAttribute(gate.Supported),
			"driver.zeroscale.landlock": pstructs.NewBoolAttribute(d.landlock),
		},
		Health:            drivers.HealthStateHealthy,
		HealthDescription: drivers.DriverHealthy,
	}
	// Always sent: Nomad keeps a driver attribute until a fingerprint sets it
	// to "", which removes it.
	reason := ""
	if !gate.Supported {
		reason = gate.Reason
		fp.HealthDescription = "Healthy; XDP gate unavailable: " + gate.Reason
	}
	fp.Attributes["driver.zeroscale.gate.reason"] = pstructs.NewStringAttribute(reason)
	if issue != "" {
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = issue
	}
	return fp
}

// StartTask launches the task under a new executor process.
func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	if _, ok := d.tasks.Get(cfg.ID); ok {
		return nil, nil, fmt.Errorf("start task %q: already started", cfg.ID)
	}

	var taskConfig TaskConfig
	if err := cfg.DecodeDriverConfig(&taskConfig); err != nil {
		return nil, nil, fmt.Errorf("decode task config: %w", err)
	}
	if err := taskConfig.validate(); err != nil {
		return nil, nil, fmt.Errorf("validate task config: %w", err)
	}
	taskDir := cfg.TaskDir().Dir
	command, err := resolveCommand(taskConfig.Command, taskDir, cfg.Env)
	if err != nil {
		return nil, nil, fmt.Errorf("validate task config: %w", err)
	}

	d.mu.RLock()
	nomadConfig, compute, denied := d.nomadConfig, d.compute, d.deniedUsers
	d.mu.RUnlock()

	spec, err := d.prepareSandbox(cfg, command, denied)
	if err != nil {
		return nil, nil, err
	}
	args, err := sandbox.Args(spec, append([]string{command}, taskConfig.Args...))
	if err != nil {
		return nil, nil, fmt.Errorf("prepare task: %w", err)
	}

	logger := d.logger.With("alloc_id", cfg.AllocID, "task", cfg.Name)
	execConfig := &executor.ExecutorConfig{
		LogFile:     executorLogPath(taskDir),
		LogLevel:    "debug",
		FSIsolation: false,
		Compute:     compute,
	}
	exec, pluginClient, err := executor.CreateExecutor(logger, nomadConfig, execConfig)
	if err != nil {
		return nil, nil, fmt.Errorf("create executor: %w", err)
	}

	// The launcher starts as root and becomes the task's user itself.
	ps, err := exec.Launch(&executor.ExecCommand{
		Cmd:              launcherPath(d.launcher, taskDir),
		Args:             args,
		Env:              sandbox.Env(cfg.EnvList()),
		TaskDir:          taskDir,
		StdoutPath:       cfg.StdoutPath,
		StderrPath:       cfg.StderrPath,
		Resources:        cfg.Resources,
		ResourceLimits:   true,
		NetworkIsolation: cfg.NetworkIsolation,
	})
	if err != nil {
		pluginClient.Kill()
		return nil, nil, fmt.Errorf("launch %q: %w", command, err)
	}

	h := newTaskHandle(exec, pluginClient, logger, ps.Pid, cfg, time.Now().Round(time.Millisecond), spec)
	handle := drivers.NewTaskHandle(taskStateVersion)
	handle.Config = cfg
	state := TaskState{
		ReattachConfig: pstructs.ReattachConfigFromGoPlugin(pluginClient.ReattachConfig()),
		TaskConfig:     cfg,
		Pid:            ps.Pid,
		StartedAt:      h.startedAt,
		Sandbox:        spec,
	}
	if err := handle.SetDriverState(&state); err != nil {
		_ = exec.Shutdown("", 0)
		pluginClient.Kill()
		return nil, nil, fmt.Errorf("store task state: %w", err)
	}

	d.tasks.Set(cfg.ID, h)
	go h.watch()
	logger.Info("started task", "command", command, "pid", ps.Pid, "user", spec.UID)
	return handle, nil, nil
}

// prepareSandbox checks the task's user against denied_users and decides its
// isolation.
func (d *Driver) prepareSandbox(cfg *drivers.TaskConfig, command string, denied []string) (*sandbox.Spec, error) {
	if d.launcher == "" {
		return nil, errors.New("prepare task: cannot find the plugin's own binary to launch the sandbox")
	}
	name := cfg.User
	if name == "" {
		name = defaultUser
	}
	u, err := lookupUser(name)
	if err != nil {
		return nil, fmt.Errorf("prepare task: %w", err)
	}
	if err := checkAllowed(u, denied); err != nil {
		return nil, err
	}
	spec, err := sandboxSpec(cfg.AllocDir, cfg.Name, u)
	if err != nil {
		return nil, fmt.Errorf("prepare task: sandbox: %w", err)
	}
	if err := checkInView(command, spec); err != nil {
		return nil, fmt.Errorf("validate task config: %w", err)
	}
	if err := makeExecutable(command, cfg.TaskDir().Dir); err != nil {
		return nil, fmt.Errorf("prepare task: %w", err)
	}
	return spec, nil
}

func executorLogPath(taskDir string) string {
	return taskDir + "/executor.out"
}

// RecoverTask reattaches to the executor of a task started earlier, by this
// or a previous plugin process.
func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil || handle.Config == nil {
		return errors.New("recover task: handle without a task config")
	}
	if _, ok := d.tasks.Get(handle.Config.ID); ok {
		return nil
	}
	if handle.Version != taskStateVersion && handle.Version != taskStateVersionV1 {
		return fmt.Errorf("recover task %q: task state version %d is neither %d nor %d",
			handle.Config.ID, handle.Version, taskStateVersionV1, taskStateVersion)
	}

	var state TaskState
	if err := handle.GetDriverState(&state); err != nil {
		return fmt.Errorf("recover task %q: decode task state: %w", handle.Config.ID, err)
	}
	// Its executor runs commands as root; without the spec, exec into the
	// task could not be isolated.
	if handle.Version == taskStateVersion && state.Sandbox == nil {
		return fmt.Errorf("recover task %q: task state version %d without a sandbox", handle.Config.ID, handle.Version)
	}
	reattach, err := pstructs.ReattachConfigToGoPlugin(state.ReattachConfig)
	if err != nil {
		return fmt.Errorf("recover task %q: read reattach config: %w", handle.Config.ID, err)
	}

	d.mu.RLock()
	compute := d.compute
	d.mu.RUnlock()
	logger := d.logger.With("alloc_id", handle.Config.AllocID, "task", handle.Config.Name)
	exec, pluginClient, err := executor.ReattachToExecutor(reattach, logger, compute)
	if err != nil {
		return fmt.Errorf("recover task %q: reattach to executor: %w", handle.Config.ID, err)
	}

	taskConfig := state.TaskConfig
	if taskConfig == nil {
		taskConfig = handle.Config
	}
	h := newTaskHandle(exec, pluginClient, logger, state.Pid, taskConfig, state.StartedAt, state.Sandbox)
	d.tasks.Set(handle.Config.ID, h)
	go h.watch()
	logger.Info("recovered task", "pid", state.Pid)
	return nil
}

// WaitTask returns a channel that yields the task's exit result.
func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.exited:
			ch <- h.result()
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

// StopTask sends the task's kill signal and force-kills it after timeout.
func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if err := h.exec.Shutdown(signal, timeout); err != nil {
		if h.pluginClient.Exited() {
			return nil
		}
		return fmt.Errorf("stop task %q: %w", taskID, err)
	}
	return nil
}

// DestroyTask removes the task; with force it kills a running one first.
func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if h.running() && !force {
		return fmt.Errorf("destroy task %q: task is running; stop it or destroy with force", taskID)
	}
	if !h.pluginClient.Exited() {
		if err := h.exec.Shutdown("", 0); err != nil {
			h.logger.Warn("could not shut the executor down", "error", err)
		}
		h.pluginClient.Kill()
	}
	d.tasks.Delete(taskID)
	return nil
}

// InspectTask reports the task's state.
func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h.status(), nil
}

// TaskStats streams resource usage from the executor.
func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *drivers.TaskResourceUsage, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h.exec.Stats(ctx, interval)
}

// TaskEvents streams driver events to Nomad.
func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

// EmitEvent publishes a task event (shown in `nomad alloc status`).
func (d *Driver) EmitEvent(event *drivers.TaskEvent) error {
	return d.eventer.EmitEvent(event)
}

// SignalTask delivers a named signal (e.g. "SIGHUP") to the task.
func (d *Driver) SignalTask(taskID string, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	sig, ok := signals.SignalLookup[signal]
	if !ok {
		return fmt.Errorf("signal task %q: unknown signal %q", taskID, signal)
	}
	return h.exec.Signal(sig)
}

// ExecTask runs a command beside the task, with its environment and cgroup.
func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	if len(cmd) == 0 {
		return nil, errors.New("exec task: empty command")
	}
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	argv, err := h.command(d.launcher, cmd)
	if err != nil {
		return nil, fmt.Errorf("exec in task %q: %w", taskID, err)
	}
	out, exitCode, err := h.exec.Exec(time.Now().Add(timeout), argv[0], argv[1:])
	if err != nil {
		return nil, fmt.Errorf("exec in task %q: %w", taskID, err)
	}
	return &drivers.ExecTaskResult{
		Stdout:     out,
		ExitResult: &drivers.ExitResult{ExitCode: exitCode},
	}, nil
}

var _ drivers.ExecTaskStreamingRawDriver = (*Driver)(nil)

// ExecTaskStreamingRaw backs `nomad alloc exec`.
func (d *Driver) ExecTaskStreamingRaw(ctx context.Context, taskID string, command []string,
	tty bool, stream drivers.ExecTaskStream) error {
	if len(command) == 0 {
		return errors.New("exec task: empty command")
	}
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	argv, err := h.command(d.launcher, command)
	if err != nil {
		return fmt.Errorf("exec in task %q: %w", taskID, err)
	}
	return h.exec.ExecStreaming(ctx, argv, tty, stream)
}

// EmitGroupEvent records a task event on every running task of a task group
// run by this driver (shown by `nomad alloc status`).
func (d *Driver) EmitGroupEvent(namespace, job, group, message string) {
	for _, h := range d.tasks.All() {
		cfg := h.taskConfig
		if cfg.Namespace != namespace || cfg.JobName != job || cfg.TaskGroupName != group || !h.running() {
			continue
		}
		err := d.eventer.EmitEvent(&drivers.TaskEvent{
			TaskID:    cfg.ID,
			AllocID:   cfg.AllocID,
			TaskName:  cfg.Name,
			Timestamp: time.Now(),
			Message:   message,
		})
		if err != nil {
			d.logger.Debug("could not emit a task event", "task", cfg.Name, "error", err)
		}
	}
}

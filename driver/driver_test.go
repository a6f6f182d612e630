package driver

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cgroupslib"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
)

// These tests run real processes under real executors and cgroups: they need
// root, which `make test` and .ci/run provide.

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("driver tests need root (real cgroups and executors); run them through `make test`")
	}
}

func newHarness(t *testing.T) (*Driver, *dtestutil.DriverHarness) {
	t.Helper()
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	logger := hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: testWriter{t}})
	d := New(ctx, logger)
	h := dtestutil.NewDriverHarness(t, d)
	t.Cleanup(h.Kill)
	// Executors outlive their task until destroyed; leave none behind.
	t.Cleanup(func() {
		for _, th := range d.tasks.All() {
			_ = d.DestroyTask(th.taskConfig.ID, true)
		}
	})
	return d, h
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newTask builds a task config running `sh -c script` with resources and a
// task cgroup, the way the Nomad client prepares them.
func newTask(t *testing.T, h *dtestutil.DriverHarness, script string) (*drivers.TaskConfig, func()) {
	t.Helper()
	return newTaskWithLogs(t, h, script, true)
}

// newRefusedTask is a task StartTask is expected to refuse: without log
// fifos, whose reader would wait 4 s for a writer that never comes.
func newRefusedTask(t *testing.T, h *dtestutil.DriverHarness, script string) (*drivers.TaskConfig, func()) {
	t.Helper()
	return newTaskWithLogs(t, h, script, false)
}

func newTaskWithLogs(t *testing.T, h *dtestutil.DriverHarness, script string, logs bool) (*drivers.TaskConfig, func()) {
	t.Helper()
	allocID := uuid.Generate()
	name := "web"
	task := &drivers.TaskConfig{
		ID:      uuid.Generate(),
		AllocID: allocID,
		Name:    name,
		Env:     map[string]string{"GREETING": "hello from nomad"},
		Resources: &drivers.Resources{
			NomadResources: &structs.AllocatedTaskResources{
				Memory: structs.AllocatedMemoryResources{MemoryMB: 128},
				Cpu:    structs.AllocatedCpuResources{CpuShares: 100},
			},
			LinuxResources: &drivers.LinuxResources{
				MemoryLimitBytes: 128 << 20,
				CPUShares:        100,
				CpusetCgroupPath: cgroupslib.LinuxResourcesPath(allocID, name, false),
			},
		},
	}
	mustEncode(t, task, &TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}})
	// The harness's alloc root is a MkdirTemp of mode 0700, like a
	// client's data dir: the task's user need not be able to enter it.
	cleanup := h.MkAllocDir(task, logs)
	h.MakeTaskCgroup(allocID, name)
	return task, cleanup
}

func mustEncode(t *testing.T, task *drivers.TaskConfig, cfg *TaskConfig) {
	t.Helper()
	if err := task.EncodeConcreteDriverConfig(cfg); err != nil {
		t.Fatalf("encode task config: %v", err)
	}
}

func start(t *testing.T, h *dtestutil.DriverHarness, task *drivers.TaskConfig) *drivers.TaskHandle {
	t.Helper()
	handle, _, err := h.StartTask(task)
	if err != nil {
		t.Fatalf("start task: %v", err)
	}
	if err := h.WaitUntilStarted(task.ID, 10*time.Second); err != nil {
		t.Fatalf("wait for start: %v", err)
	}
	return handle
}

// startQuick starts a task that may exit before it could be seen running.
func startQuick(t *testing.T, h *dtestutil.DriverHarness, task *drivers.TaskConfig) {
	t.Helper()
	if _, _, err := h.StartTask(task); err != nil {
		t.Fatalf("start task: %v", err)
	}
}

func waitExit(t *testing.T, h *dtestutil.DriverHarness, taskID string, timeout time.Duration) *drivers.ExitResult {
	t.Helper()
	ch, err := h.WaitTask(context.Background(), taskID)
	if err != nil {
		t.Fatalf("wait task: %v", err)
	}
	select {
	case res := <-ch:
		if res == nil {
			t.Fatal("wait channel closed without a result")
		}
		return res
	case <-time.After(timeout):
		t.Fatalf("task did not exit within %s", timeout)
	}
	return nil
}

func waitForFile(t *testing.T, path string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

func waitGone(t *testing.T, pid int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for processAlive(pid) {
		// a zombie still answers kill(0); read its state
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && strings.Contains(string(b), ") Z ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d still alive after %s", pid, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func taskPid(t *testing.T, h *dtestutil.DriverHarness, taskID string) int {
	t.Helper()
	status, err := h.InspectTask(taskID)
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	pid, err := strconv.Atoi(status.DriverAttributes["pid"])
	if err != nil || pid <= 0 {
		t.Fatalf("bad pid attribute %q", status.DriverAttributes["pid"])
	}
	return pid
}

func TestStartWaitExitCode(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "exit 7")
	defer cleanup()

	handle, _, err := h.StartTask(task)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	if handle.Version != taskStateVersion {
		t.Fatalf("handle version %d, want %d", handle.Version, taskStateVersion)
	}
	res := waitExit(t, h, task.ID, 10*time.Second)
	if res.ExitCode != 7 || res.Err != nil {
		t.Fatalf("exit result %+v, want code 7", res)
	}
	status, err := h.InspectTask(task.ID)
	if err != nil {
		t.Fatal(err)
	}
	if status.State != drivers.TaskStateExited || status.ExitResult.ExitCode != 7 {
		t.Fatalf("status %+v", status)
	}
	if err := h.DestroyTask(task.ID, false); err != nil {
		t.Fatalf("destroy exited task: %v", err)
	}
}

func TestStopSendsSignalThenKillsAfterTimeout(t *testing.T) {
	t.Run("signal honoured", func(t *testing.T) {
		_, h := newHarness(t)
		task, cleanup := newTask(t, h, `trap 'echo got-term > "$NOMAD_TASK_DIR/term"; exit 3' TERM; while true; do sleep 0.1; done`)
		defer cleanup()
		start(t, h, task)
		time.Sleep(300 * time.Millisecond) // let the shell install its trap

		if err := h.StopTask(task.ID, 10*time.Second, "SIGTERM"); err != nil {
			t.Fatalf("stop: %v", err)
		}
		res := waitExit(t, h, task.ID, 10*time.Second)
		if res.ExitCode != 3 {
			t.Fatalf("exit %+v, want code 3 from the TERM trap", res)
		}
		got := waitForFile(t, filepath.Join(task.TaskDir().LocalDir, "term"), 2*time.Second)
		if strings.TrimSpace(got) != "got-term" {
			t.Fatalf("trap wrote %q", got)
		}
	})

	t.Run("killed after timeout", func(t *testing.T) {
		_, h := newHarness(t)
		task, cleanup := newTask(t, h, `trap '' INT; while true; do sleep 0.1; done`)
		defer cleanup()
		start(t, h, task)
		time.Sleep(300 * time.Millisecond)

		began := time.Now()
		if err := h.StopTask(task.ID, time.Second, "SIGINT"); err != nil {
			t.Fatalf("stop: %v", err)
		}
		res := waitExit(t, h, task.ID, 10*time.Second)
		if took := time.Since(began); took < time.Second {
			t.Fatalf("task ignoring SIGINT ended after %s, before the 1s kill timeout", took)
		}
		if res.Signal != int(syscall.SIGKILL) {
			t.Fatalf("exit %+v, want SIGKILL", res)
		}
	})
}

func TestDestroyRunningTask(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	start(t, h, task)
	pid := taskPid(t, h, task.ID)

	err := h.DestroyTask(task.ID, false)
	if err == nil || !strings.Contains(err.Error(), "running") {
		t.Fatalf("destroy without force: %v, want a 'running' error", err)
	}
	if err := h.DestroyTask(task.ID, true); err != nil {
		t.Fatalf("force destroy: %v", err)
	}
	waitGone(t, pid, 10*time.Second)
	if _, err := h.InspectTask(task.ID); err == nil || !strings.Contains(err.Error(), drivers.ErrTaskNotFound.Error()) {
		t.Fatalf("inspect after destroy: %v, want task not found", err)
	}
}

func TestUnknownTaskIsNotFound(t *testing.T) {
	d, _ := newHarness(t)
	if _, err := d.InspectTask("nope"); err != drivers.ErrTaskNotFound {
		t.Fatalf("InspectTask: %v", err)
	}
	if err := d.StopTask("nope", time.Second, "SIGTERM"); err != drivers.ErrTaskNotFound {
		t.Fatalf("StopTask: %v", err)
	}
	if err := d.SignalTask("nope", "SIGHUP"); err != drivers.ErrTaskNotFound {
		t.Fatalf("SignalTask: %v", err)
	}
	if _, err := d.WaitTask(context.Background(), "nope"); err != drivers.ErrTaskNotFound {
		t.Fatalf("WaitTask: %v", err)
	}
}

func TestLogsReachNomadFifos(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `echo "to stdout $GREETING"; echo "to stderr" >&2`)
	defer cleanup()
	startQuick(t, h, task)
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	logDir := task.TaskDir().LogDir
	out := waitForFile(t, filepath.Join(logDir, "web.stdout.0"), 5*time.Second)
	if !strings.Contains(out, "to stdout hello from nomad") {
		t.Fatalf("stdout log %q", out)
	}
	errLog := waitForFile(t, filepath.Join(logDir, "web.stderr.0"), 5*time.Second)
	if !strings.Contains(errLog, "to stderr") {
		t.Fatalf("stderr log %q", errLog)
	}
}

func TestEnvAndTaskDir(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `pwd > "$NOMAD_TASK_DIR/pwd"; echo "$NOMAD_ALLOC_ID $GREETING" > "$NOMAD_TASK_DIR/env"`)
	defer cleanup()
	startQuick(t, h, task)
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	local := task.TaskDir().LocalDir
	if got := strings.TrimSpace(waitForFile(t, filepath.Join(local, "pwd"), 2*time.Second)); got != task.TaskDir().Dir {
		t.Fatalf("working directory %q, want the task dir %q", got, task.TaskDir().Dir)
	}
	want := task.AllocID + " hello from nomad"
	if got := strings.TrimSpace(waitForFile(t, filepath.Join(local, "env"), 2*time.Second)); got != want {
		t.Fatalf("env %q, want %q", got, want)
	}
}

func TestRunsAsNobodyByDefault(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `id -un > "$NOMAD_ALLOC_DIR/whoami"`)
	defer cleanup()
	task.User = ""
	startQuick(t, h, task)
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	got := waitForFile(t, filepath.Join(task.AllocDir, "alloc", "whoami"), 2*time.Second)
	if strings.TrimSpace(got) != "nobody" {
		t.Fatalf("task ran as %q, want nobody", got)
	}
}

func TestExec(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	start(t, h, task)
	defer h.DestroyTask(task.ID, true)

	res, err := h.ExecTask(task.ID, []string{"/bin/sh", "-c", "echo $GREETING; exit 5"}, 5*time.Second)
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if string(res.Stdout) != "hello from nomad\n" || res.ExitResult.ExitCode != 5 {
		t.Fatalf("exec result stdout=%q code=%d", res.Stdout, res.ExitResult.ExitCode)
	}
	dtestutil.TestExecTaskStreamingBasicResponses(t, h, task.ID)
}

func TestStats(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	start(t, h, task)
	defer h.DestroyTask(task.ID, true)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ch, err := h.TaskStats(ctx, task.ID, 200*time.Millisecond)
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	for {
		select {
		case usage := <-ch:
			if usage == nil || usage.ResourceUsage == nil {
				continue
			}
			if usage.ResourceUsage.MemoryStats.RSS > 0 && len(usage.Pids) > 0 {
				return
			}
		case <-ctx.Done():
			t.Fatal("no stats with RSS and pids within 10s")
		}
	}
}

func TestSignal(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `trap 'echo usr1 > "$NOMAD_TASK_DIR/signal"' USR1; while true; do sleep 0.1; done`)
	defer cleanup()
	start(t, h, task)
	defer h.DestroyTask(task.ID, true)
	time.Sleep(300 * time.Millisecond)

	if err := h.SignalTask(task.ID, "SIGUSR1"); err != nil {
		t.Fatalf("signal: %v", err)
	}
	got := waitForFile(t, filepath.Join(task.TaskDir().LocalDir, "signal"), 5*time.Second)
	if strings.TrimSpace(got) != "usr1" {
		t.Fatalf("trap wrote %q", got)
	}
	if err := h.SignalTask(task.ID, "SIGNOPE"); err == nil || !strings.Contains(err.Error(), "SIGNOPE") {
		t.Fatalf("unknown signal: %v, want an error naming it", err)
	}
}

func TestRecoverAfterTaskForgotten(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	handle := start(t, h, task)
	pid := taskPid(t, h, task.ID)

	d.tasks.Delete(task.ID)
	if _, err := h.InspectTask(task.ID); err == nil {
		t.Fatal("task still known after removal from the store")
	}
	if err := h.RecoverTask(handle); err != nil {
		t.Fatalf("recover: %v", err)
	}
	if got := taskPid(t, h, task.ID); got != pid {
		t.Fatalf("recovered pid %d, want %d", got, pid)
	}
	if err := h.RecoverTask(handle); err != nil {
		t.Fatalf("second recover of a known task: %v", err)
	}
	// The executor of a sandboxed task runs commands as root: exec must
	// still go through the sandbox, from the recovered state.
	out, err := h.ExecTask(task.ID, []string{"id", "-un"}, 5*time.Second)
	if err != nil {
		t.Fatalf("exec after recovery: %v", err)
	}
	if string(out.Stdout) != "nobody\n" {
		t.Fatalf("exec after recovery ran as %q, want nobody", out.Stdout)
	}
	if err := h.StopTask(task.ID, 5*time.Second, "SIGTERM"); err != nil {
		t.Fatalf("stop recovered task: %v", err)
	}
	res := waitExit(t, h, task.ID, 10*time.Second)
	if res.Signal != int(syscall.SIGTERM) {
		t.Fatalf("exit %+v, want SIGTERM", res)
	}
	waitGone(t, pid, 5*time.Second)
}

func TestRecoverFromAnotherPluginInstance(t *testing.T) {
	_, first := newHarness(t)
	task, cleanup := newTask(t, first, `trap 'exit 9' TERM; while true; do sleep 0.1; done`)
	defer cleanup()
	handle := start(t, first, task)
	pid := taskPid(t, first, task.ID)

	// A second plugin instance, as after a plugin restart: it must reattach
	// to the running executor, not start the task again.
	_, second := newHarness(t)
	if err := second.RecoverTask(handle.Copy()); err != nil {
		t.Fatalf("recover in second instance: %v", err)
	}
	if got := taskPid(t, second, task.ID); got != pid {
		t.Fatalf("second instance sees pid %d, want %d", got, pid)
	}
	if !processAlive(pid) {
		t.Fatal("task process died during recovery")
	}
	first.Kill()
	time.Sleep(300 * time.Millisecond)
	if !processAlive(pid) {
		t.Fatal("task process died when the first plugin instance went away")
	}

	if err := second.StopTask(task.ID, 5*time.Second, "SIGTERM"); err != nil {
		t.Fatalf("stop through second instance: %v", err)
	}
	res := waitExit(t, second, task.ID, 10*time.Second)
	if res.ExitCode != 9 {
		t.Fatalf("exit %+v, want 9 from the TERM trap", res)
	}
}

func TestRecoverRejectsUnknownStateVersion(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	handle := start(t, h, task)
	defer h.DestroyTask(task.ID, true)

	stale := handle.Copy()
	stale.Version = taskStateVersion + 1
	stale.Config.ID = uuid.Generate()
	err := h.RecoverTask(stale)
	if err == nil || !strings.Contains(err.Error(), "version") {
		t.Fatalf("recover with unknown version: %v, want a version error", err)
	}
}

func TestBadTaskConfig(t *testing.T) {
	cases := []struct {
		name    string
		config  TaskConfig
		wantErr string
	}{
		{"empty command", TaskConfig{Command: " "}, "config.command: must not be empty"},
		{"absolute path missing", TaskConfig{Command: "/no/such/binary"}, `"/no/such/binary" does not exist`},
		{"relative path missing", TaskConfig{Command: "bin/absent"}, `"bin/absent" not found`},
		{"name not on PATH", TaskConfig{Command: "zeroscale-no-such-command"}, `"zeroscale-no-such-command" not found`},
		{"directory", TaskConfig{Command: "/tmp"}, "is a directory"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, h := newHarness(t)
			task, cleanup := newRefusedTask(t, h, "true")
			defer cleanup()
			mustEncode(t, task, &tc.config)
			_, _, err := h.StartTask(task)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("start: %v, want error containing %q", err, tc.wantErr)
			}
			if _, err := h.InspectTask(task.ID); err == nil {
				t.Fatal("a task that failed to start is still tracked")
			}
		})
	}
}

func TestCommandFromTaskLocalDir(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, "")
	defer cleanup()
	script := filepath.Join(task.TaskDir().LocalDir, "hello.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 4\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	mustEncode(t, task, &TaskConfig{Command: "hello.sh"})
	startQuick(t, h, task)
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 4 {
		t.Fatalf("exit %+v, want 4 from local/hello.sh", res)
	}
}

func TestFingerprint(t *testing.T) {
	d, h := newHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ch, err := h.Fingerprint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	next := func() *drivers.Fingerprint {
		t.Helper()
		select {
		case fp := <-ch:
			return fp
		case <-ctx.Done():
			t.Fatal("no fingerprint")
		}
		return nil
	}

	fp := next()
	if fp.Health != drivers.HealthStateHealthy {
		t.Fatalf("health %s: %s", fp.Health, fp.HealthDescription)
	}
	if v, ok := fp.Attributes["driver.zeroscale.version"].GetString(); !ok || v != Version {
		t.Fatalf("version attribute %v", fp.Attributes["driver.zeroscale.version"])
	}
	if b, ok := fp.Attributes["driver.zeroscale.gate"].GetBool(); !ok || b {
		t.Fatalf("gate attribute before the agent reports: %v", fp.Attributes["driver.zeroscale.gate"])
	}
	if b, ok := fp.Attributes["driver.zeroscale.landlock"].GetBool(); !ok || b != d.landlock {
		t.Fatalf("landlock attribute %v, want %v", fp.Attributes["driver.zeroscale.landlock"], d.landlock)
	}

	d.SetGateStatus(GateStatus{Supported: true})
	fp = next()
	if b, ok := fp.Attributes["driver.zeroscale.gate"].GetBool(); !ok || !b {
		t.Fatalf("gate attribute after the agent reports: %v", fp.Attributes["driver.zeroscale.gate"])
	}
	if r, _ := fp.Attributes["driver.zeroscale.gate.reason"].GetString(); r != "" {
		t.Fatalf("a supported gate still carries a reason: %q", r)
	}

	d.SetGateStatus(GateStatus{Reason: "no BTF at /sys/kernel/btf/vmlinux"})
	fp = next()
	if r, _ := fp.Attributes["driver.zeroscale.gate.reason"].GetString(); r != "no BTF at /sys/kernel/btf/vmlinux" {
		t.Fatalf("gate reason %q", r)
	}
	if fp.Health != drivers.HealthStateHealthy {
		t.Fatalf("tasks can still run without the gate, got %s", fp.Health)
	}

	d.SetHealthIssue("invalid plugin config: wake_from[0]: bad prefix")
	fp = next()
	if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "wake_from[0]") {
		t.Fatalf("health %s %q", fp.Health, fp.HealthDescription)
	}
}

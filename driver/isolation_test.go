package driver

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/nomad/drivers/shared/executor"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	dproto "github.com/hashicorp/nomad/plugins/drivers/proto"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"
	"github.com/zeroscale/nomad-driver-zeroscale/driver/sandbox"
)

// These tests attack the sandbox the way a job would, each beside a control
// run as the same user outside it that shows the attack works there.

const nobodyID = 65534

// asNobodyOnHost runs a shell command as nobody without a sandbox.
func asNobodyOnHost(t *testing.T, script string) error {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyID, Gid: nobodyID}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Logf("as nobody on the host: %s: %v", strings.TrimSpace(string(out)), err)
	}
	return err
}

// plantSecret writes a world-readable file in world-enterable directories.
func plantSecret(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("s3cret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// runToEnd starts a short task and returns what it wrote to local/out.
func runToEnd(t *testing.T, h *dtestutil.DriverHarness, task *drivers.TaskConfig) string {
	t.Helper()
	startQuick(t, h, task)
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	b, err := os.ReadFile(filepath.Join(task.TaskDir().LocalDir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestTaskSeesOnlyItsOwnAllocation(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		cat "$NOMAD_TASK_DIR/mine" && echo own-task-dir-readable
		echo shared > "$NOMAD_ALLOC_DIR/data/shared" && echo shared-dir-writable
		cat "$OTHER_ALLOC/web/secrets/token" && echo LEAK-other-allocation
		cat "$SIDECAR/secrets/token" && echo LEAK-other-task-of-the-group
		echo "alloc root:" $(ls "$(dirname "$NOMAD_ALLOC_DIR")/..")
		echo "alloc dir:" $(ls "$(dirname "$NOMAD_ALLOC_DIR")")
		true`)
	defer cleanup()
	allocRoot := filepath.Dir(task.AllocDir)
	other := filepath.Join(allocRoot, "0ther-a11oc")
	sidecar := filepath.Join(task.AllocDir, "sidecar")
	plantSecret(t, filepath.Join(other, "web", "secrets", "token"))
	plantSecret(t, filepath.Join(sidecar, "secrets", "token"))
	if err := os.WriteFile(filepath.Join(task.TaskDir().LocalDir, "mine"), []byte("mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	task.Env["OTHER_ALLOC"], task.Env["SIDECAR"] = other, sidecar

	// As the old README advised: a data dir others may enter.
	if err := os.Chmod(allocRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := asNobodyOnHost(t, "cat "+filepath.Join(other, "web", "secrets", "token")); err != nil {
		t.Fatal("control: nobody cannot read the other allocation even outside the sandbox; the test proves nothing")
	}

	out := runToEnd(t, h, task)
	t.Logf("task output:\n%s", out)
	for _, want := range []string{"own-task-dir-readable", "shared-dir-writable",
		"alloc root: " + task.AllocID + "\n", "alloc dir: alloc web\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("task output lacks %q", want)
		}
	}
	if strings.Contains(out, "LEAK") {
		t.Error("the task read another allocation's or task's secrets")
	}
}

func TestDataDirNeedNotBeOpenToTheTaskUser(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `id -un > "$NOMAD_TASK_DIR/out"`)
	defer cleanup()
	allocRoot := filepath.Dir(task.AllocDir)
	if err := os.Chmod(allocRoot, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := asNobodyOnHost(t, "ls "+task.TaskDir().Dir); err == nil {
		t.Fatal("control: nobody can enter the task dir through a 0700 data dir")
	}
	if got := strings.TrimSpace(runToEnd(t, h, task)); got != "nobody" {
		t.Fatalf("task wrote %q, want nobody", got)
	}
}

func TestOtherTasksProcessesAreOutOfReach(t *testing.T) {
	d, h := newHarness(t)
	if !d.landlock {
		t.Skip("no Landlock in this kernel: tasks of one user can read each other's /proc entries")
	}
	victim, cleanupVictim := newTask(t, h, "sleep 600")
	defer cleanupVictim()
	victim.Env["VICTIM_TOKEN"] = "s3cret"
	plantSecret(t, filepath.Join(victim.TaskDir().SecretsDir, "token"))
	start(t, h, victim)
	defer h.DestroyTask(victim.ID, true)
	pid := strconv.Itoa(execed(t, taskPid(t, h, victim.ID), "sh"))
	token := "/proc/" + pid + "/root" + filepath.Join(victim.TaskDir().SecretsDir, "token")

	if err := asNobodyOnHost(t, "cat "+token+" && grep -q VICTIM_TOKEN /proc/"+pid+"/environ"); err != nil {
		t.Fatal("control: another nobody process cannot reach the victim through /proc; the test proves nothing")
	}

	attacker, cleanup := newTask(t, h, fmt.Sprintf(`
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		cat %s && echo LEAK-root
		grep VICTIM_TOKEN /proc/%s/environ && echo LEAK-environ
		ls /proc/%s/cwd/ && echo LEAK-cwd
		ls /proc/%s >/dev/null && echo sees-the-process
		true`, token, pid, pid, pid))
	defer cleanup()
	out := runToEnd(t, h, attacker)
	t.Logf("attacker output:\n%s", out)
	if strings.Contains(out, "LEAK") {
		t.Error("a task reached another task's files or environment through /proc")
	}
	if !strings.Contains(out, "sees-the-process") {
		t.Error("the attacker did not even see the victim's /proc entry: the test proves nothing")
	}
}

func TestRootIsRefusedByDefault(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newRefusedTask(t, h, "true")
	defer cleanup()
	task.User = "root"
	_, _, err := h.StartTask(task)
	want := `task user "root" is denied by the plugin option denied_users [root]`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("start as root: %v, want an error containing %q", err, want)
	}
	if _, err := h.InspectTask(task.ID); err == nil {
		t.Fatal("a refused task is tracked")
	}
}

// pluginConfigFromHCL encodes the plugin config block as Nomad hands it to
// SetConfig, through the driver's part of the real schema.
func pluginConfigFromHCL(t *testing.T, body string) []byte {
	t.Helper()
	spec, err := (&Driver{}).ConfigSchema()
	if err != nil {
		t.Fatal(err)
	}
	var pc pluginConfig
	hclutils.NewConfigParser(WithConfigSpec(spec)).ParseHCL(t, "config {\n"+body+"\n}", &pc)
	var b []byte
	if err := base.MsgPackEncode(&b, &pc); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDeniedUsersFromThePluginConfig(t *testing.T) {
	cases := []struct {
		name, config, user, refused string
	}{
		{"unset denies root", ``, "root", `"root" is denied by the plugin option denied_users [root]`},
		{"a custom list denies the default user", `denied_users = ["daemon", "nobody"]`, "",
			`"nobody" is denied by the plugin option denied_users [daemon, nobody]`},
		{"a custom list without root allows root", `denied_users = ["nobody"]`, "root", ""},
		{"an empty list denies no one", `denied_users = []`, "root", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, h := newHarness(t)
			if err := d.SetConfig(&base.Config{PluginConfig: pluginConfigFromHCL(t, tc.config)}); err != nil {
				t.Fatalf("set config: %v", err)
			}
			newTask := newTask
			if tc.refused != "" {
				newTask = newRefusedTask
			}
			task, cleanup := newTask(t, h, `id -un > "$NOMAD_TASK_DIR/out"`)
			defer cleanup()
			task.User = tc.user
			if tc.refused != "" {
				if _, _, err := h.StartTask(task); err == nil || !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("start: %v, want an error containing %q", err, tc.refused)
				}
				return
			}
			if got := strings.TrimSpace(runToEnd(t, h, task)); got != tc.user {
				t.Fatalf("task ran as %q, want %q", got, tc.user)
			}
		})
	}
}

// defaultCapMask is Nomad's default set as in /proc/PID/status.
func defaultCapMask() uint64 {
	var m uint64
	for c := range sandbox.DefaultCapabilities {
		m |= 1 << c
	}
	return m
}

func capabilitiesOf(t *testing.T, pid int) map[string]uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	caps := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		name, value, ok := strings.Cut(line, ":\t")
		if ok && strings.HasPrefix(name, "Cap") {
			v, err := strconv.ParseUint(value, 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			caps[name] = v
		}
	}
	return caps
}

func TestCapabilitiesAreAtMostNomadsDefaultSet(t *testing.T) {
	for _, user := range []string{"", "root"} {
		t.Run("user "+cmpOr(user, "default"), func(t *testing.T) {
			d, h := newHarness(t)
			if err := d.SetConfig(&base.Config{PluginConfig: pluginConfigFromHCL(t, `denied_users = []`)}); err != nil {
				t.Fatal(err)
			}
			task, cleanup := newTask(t, h, "sleep 600")
			defer cleanup()
			task.User = user
			start(t, h, task)
			defer h.DestroyTask(task.ID, true)
			caps := capabilitiesOf(t, execed(t, taskPid(t, h, task.ID), "sh"))
			want := map[string]uint64{"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": defaultCapMask(), "CapAmb": 0}
			if user == "root" {
				want["CapPrm"], want["CapEff"] = defaultCapMask(), defaultCapMask()
			}
			for name, v := range want {
				if caps[name] != v {
					t.Errorf("%s = %016x, want %016x", name, caps[name], v)
				}
			}
		})
	}
}

// execed waits until pid runs command: until then it is the launcher, as root.
func execed(t *testing.T, pid int, command string) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		if strings.TrimSpace(string(b)) == command {
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is %q, not %s, after 5s", pid, b, command)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cmpOr(s, fallback string) string {
	if s == "" {
		return fallback
	}
	return s
}

func TestTaskHasItsOwnTmpAndShm(t *testing.T) {
	// The harness puts allocations in $TMPDIR; below /tmp the sandbox leaves
	// /tmp to the host (hiding it would hide the allocation).
	outside, err := os.MkdirTemp("/var/tmp", "zeroscale-driver-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(outside)
	t.Setenv("TMPDIR", outside)

	_, h := newHarness(t)
	name := fmt.Sprintf("zeroscale-test-%d", time.Now().UnixNano())
	task, cleanup := newTask(t, h, fmt.Sprintf(`
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		echo tmp > /tmp/%[1]s && echo wrote-tmp
		echo shm > /dev/shm/%[1]s && echo wrote-shm
		ls /tmp/zeroscale-host-%[1]s 2>/dev/null && echo LEAK-host-tmp
		true`, name))
	defer cleanup()
	hostFile := "/tmp/zeroscale-host-" + name
	if err := os.WriteFile(hostFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(hostFile)

	out := runToEnd(t, h, task)
	t.Logf("task output:\n%s", out)
	if !strings.Contains(out, "wrote-tmp") || !strings.Contains(out, "wrote-shm") || strings.Contains(out, "LEAK") {
		t.Fatal("the task did not get a /tmp and /dev/shm of its own")
	}
	if _, err := os.Stat(filepath.Join(task.TaskDir().Dir, "tmp", name)); err != nil {
		t.Errorf("/tmp of the task is not its task dir's tmp: %v", err)
	}
	for _, p := range []string{"/tmp/" + name, "/dev/shm/" + name} {
		if _, err := os.Stat(p); err == nil {
			os.Remove(p)
			t.Errorf("the task wrote %s on the host", p)
		}
	}
}

func TestExecLandsInTheSandbox(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	other := filepath.Join(filepath.Dir(task.AllocDir), "0ther-a11oc")
	plantSecret(t, filepath.Join(other, "web", "secrets", "token"))
	if err := os.Chmod(filepath.Dir(task.AllocDir), 0o755); err != nil {
		t.Fatal(err)
	}
	start(t, h, task)
	defer h.DestroyTask(task.ID, true)

	script := fmt.Sprintf(`id -un; grep CapBnd /proc/self/status; cat %s/web/secrets/token 2>/dev/null && echo LEAK; ls "$(dirname "$NOMAD_ALLOC_DIR")/.."`, other)
	want := fmt.Sprintf("nobody\nCapBnd:\t%016x\n%s\n", defaultCapMask(), task.AllocID)

	res, err := h.ExecTask(task.ID, []string{"/bin/sh", "-c", script}, 5*time.Second)
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if string(res.Stdout) != want {
		t.Errorf("exec printed %q, want %q", res.Stdout, want)
	}

	stream := &collectStream{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.ExecTaskStreamingRaw(ctx, task.ID, []string{"sh", "-c", script}, false, stream); err != nil {
		t.Fatalf("exec streaming: %v", err)
	}
	if got := stream.stdout(); got != want {
		t.Errorf("streaming exec printed %q, want %q", got, want)
	}
}

// collectStream is a `nomad alloc exec` without input.
type collectStream struct {
	mu     sync.Mutex
	out    strings.Builder
	closed bool
}

func (s *collectStream) Send(m *drivers.ExecTaskStreamingResponseMsg) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m.Stdout != nil {
		s.out.Write(m.Stdout.Data)
	}
	return nil
}

func (s *collectStream) Recv() (*drivers.ExecTaskStreamingRequestMsg, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, io.EOF
	}
	s.closed = true
	return &drivers.ExecTaskStreamingRequestMsg{Stdin: &dproto.ExecTaskStreamingIOOperation{Close: true}}, nil
}

func (s *collectStream) stdout() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

func TestAFilePlantedAtTheLaunchersPathIsNotRun(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, `echo ran > "$NOMAD_TASK_DIR/out"`)
	defer cleanup()
	marker := filepath.Join(t.TempDir(), "planted-ran")
	for _, dir := range []string{task.TaskDir().LocalDir, task.TaskDir().Dir} {
		planted := filepath.Join(dir, d.launcher)
		if err := os.MkdirAll(filepath.Dir(planted), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(planted, []byte("#!/bin/sh\ntouch "+marker+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.TrimSpace(runToEnd(t, h, task)); got != "ran" {
		t.Fatalf("task wrote %q", got)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the executor ran the file a job left at local/<launcher path>, as root")
	}
}

func TestLauncherPathCleansToTheBinaryWhereverJoined(t *testing.T) {
	self, taskDir := "/opt/nomad/plugins/nomad-driver-zeroscale", "/var/lib/nomad/alloc/1234/web"
	p := launcherPath(self, taskDir)
	for _, joined := range []string{filepath.Join(taskDir, "local", p), filepath.Join(taskDir, p), filepath.Clean(p)} {
		if joined != self {
			t.Errorf("%q joined to the task dir is %q, want %q", p, joined, self)
		}
	}
}

func TestSandboxSpec(t *testing.T) {
	nobody := &taskUser{name: "nobody", uid: nobodyID, gid: nobodyID}
	root := &taskUser{name: "root"}
	layout := func(t *testing.T, modes map[string]os.FileMode) string {
		t.Helper()
		top := t.TempDir()
		for _, dir := range []string{"data/client", "data/alloc/A/alloc", "data/alloc/A/web/tmp", "other/alloc/B/web"} {
			if err := os.MkdirAll(filepath.Join(top, dir), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for dir, mode := range modes {
			if err := os.Chmod(filepath.Join(top, dir), mode); err != nil {
				t.Fatal(err)
			}
		}
		// t.TempDir's parent is closed to others too.
		for _, dir := range []string{top, filepath.Dir(top)} {
			if err := os.Chmod(dir, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		return top
	}
	cases := []struct {
		name     string
		modes    map[string]os.FileMode
		allocDir string
		user     *taskUser
		hide     string
	}{
		{"the data dir when it holds client state", nil, "data/alloc/A", nobody, "data"},
		{"the alloc dir when it is not Nomad's default layout", nil, "other/alloc/B", nobody, "other/alloc"},
		{"a closed data dir", map[string]os.FileMode{"data": 0o700}, "data/alloc/A", nobody, "data"},
		{"a closed directory above", map[string]os.FileMode{".": 0o700}, "data/alloc/A", nobody, "."},
		{"nothing higher for root", map[string]os.FileMode{".": 0o700}, "data/alloc/A", root, "data"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			top := layout(t, nil)
			for dir, mode := range tc.modes {
				if err := os.Chmod(filepath.Join(top, dir), mode); err != nil {
					t.Fatal(err)
				}
			}
			allocDir := filepath.Join(top, tc.allocDir)
			spec, err := sandboxSpec(allocDir, "web", tc.user)
			if err != nil {
				t.Fatal(err)
			}
			if want := filepath.Join(top, tc.hide); spec.Hide != want {
				t.Errorf("hide %s, want %s", spec.Hide, want)
			}
			wantBinds := []string{filepath.Join(allocDir, "alloc"), filepath.Join(allocDir, "web")}
			if strings.Join(spec.Binds, " ") != strings.Join(wantBinds, " ") {
				t.Errorf("binds %v, want %v", spec.Binds, wantBinds)
			}
			// t.TempDir is below /tmp: /tmp must stay, or the allocation
			// would be hidden with it.
			for _, target := range spec.TmpTargets {
				if target == "/tmp" {
					t.Errorf("/tmp is a tmp target although the allocation lies below it")
				}
			}
		})
	}
}

// startAsVersion1 starts a task the way a version 1 plugin did: the executor
// runs the command itself, as the task's user, and the handle has no sandbox.
func startAsVersion1(t *testing.T, d *Driver, task *drivers.TaskConfig) *drivers.TaskHandle {
	t.Helper()
	var tc TaskConfig
	if err := task.DecodeDriverConfig(&tc); err != nil {
		t.Fatal(err)
	}
	// Version 1 needed a data dir others may enter.
	if err := os.Chmod(filepath.Dir(task.AllocDir), 0o711); err != nil {
		t.Fatal(err)
	}
	exec, client, err := executor.CreateExecutor(d.logger, d.nomadConfig, &executor.ExecutorConfig{
		LogFile:  executorLogPath(task.TaskDir().Dir),
		LogLevel: "debug",
		Compute:  d.compute,
	})
	if err != nil {
		t.Fatal(err)
	}
	ps, err := exec.Launch(&executor.ExecCommand{
		Cmd:            tc.Command,
		Args:           tc.Args,
		Env:            task.EnvList(),
		User:           "nobody",
		TaskDir:        task.TaskDir().Dir,
		StdoutPath:     task.StdoutPath,
		StderrPath:     task.StderrPath,
		Resources:      task.Resources,
		ResourceLimits: true,
	})
	if err != nil {
		client.Kill()
		t.Fatal(err)
	}
	handle := drivers.NewTaskHandle(taskStateVersionV1)
	handle.Config = task
	if err := handle.SetDriverState(&struct {
		ReattachConfig *pstructs.ReattachConfig
		TaskConfig     *drivers.TaskConfig
		Pid            int
		StartedAt      time.Time
	}{pstructs.ReattachConfigFromGoPlugin(client.ReattachConfig()), task, ps.Pid, time.Now()}); err != nil {
		t.Fatal(err)
	}
	return handle
}

func TestRecoverTaskStartedByVersion1(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, `trap 'exit 9' TERM; while true; do sleep 0.1; done`)
	defer cleanup()
	handle := startAsVersion1(t, d, task)

	if err := h.RecoverTask(handle); err != nil {
		t.Fatalf("recover a version 1 task: %v", err)
	}
	res, err := h.ExecTask(task.ID, []string{"/bin/sh", "-c", "id -un"}, 5*time.Second)
	if err != nil {
		t.Fatalf("exec in a version 1 task: %v", err)
	}
	if string(res.Stdout) != "nobody\n" {
		t.Fatalf("exec in a version 1 task ran as %q, want nobody, as its executor sets the user", res.Stdout)
	}
	if err := h.StopTask(task.ID, 5*time.Second, "SIGTERM"); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 9 {
		t.Fatalf("exit %+v, want 9 from the TERM trap", res)
	}
}

func TestRecoverRefusesAVersion2StateWithoutSandbox(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	handle := startAsVersion1(t, d, task)
	defer func() {
		if err := h.RecoverTask(handle); err == nil {
			_ = h.DestroyTask(task.ID, true)
		}
	}()
	forged := handle.Copy()
	forged.Version = taskStateVersion
	err := h.RecoverTask(forged)
	if err == nil || !strings.Contains(err.Error(), "without a sandbox") {
		t.Fatalf("recover: %v, want a refusal: its executor would run exec'd commands as root", err)
	}
}

// Landlock denies reparenting files to any ruleset that does not grant it.
func TestRenamesAndLinksAcrossDirectoriesStillWork(t *testing.T) {
	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		cd "$NOMAD_TASK_DIR" && mkdir a b && : > a/f
		python3 -c 'import os; os.rename("a/f", "b/f")' && echo renamed
		ln b/f a/g && echo linked
		true`)
	defer cleanup()
	out := runToEnd(t, h, task)
	if !strings.Contains(out, "renamed") || !strings.Contains(out, "linked") {
		t.Fatalf("task output:\n%s", out)
	}
}

func TestPrivateDirsNeitherHoldNorHideTheAllocation(t *testing.T) {
	cases := []struct {
		hide, target string
		mount        bool
	}{
		{"/var/lib/nomad", "/tmp", true},
		{"/tmp/nomad-data", "/tmp", false}, // would hide the allocation
		{"/tmp", "/tmp", false},
		{"/var", "/var/tmp", false}, // hidden already, and no mount point left
	}
	for _, tc := range cases {
		if got := outside(tc.hide, tc.target); got != tc.mount {
			t.Errorf("hide %s, mount on %s: %v, want %v", tc.hide, tc.target, got, tc.mount)
		}
	}
}

// The task owns its task dir: it can leave tmp as a symlink for its next
// start, pointing where the sandbox would otherwise mount it on /tmp.
func TestATmpSymlinkIsNotFollowed(t *testing.T) {
	outside, err := os.MkdirTemp("/var/tmp", "zeroscale-driver-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(outside)
	t.Setenv("TMPDIR", outside)

	_, h := newHarness(t)
	task, cleanup := newTask(t, h, `echo planted > /tmp/planted; ls -a /tmp > "$NOMAD_TASK_DIR/out"`)
	defer cleanup()
	target := filepath.Join(filepath.Dir(task.AllocDir), "0ther-a11oc", "web", "secrets")
	if err := os.MkdirAll(target, 0o777); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(task.TaskDir().Dir, "tmp")
	if err := os.RemoveAll(tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(runToEnd(t, h, task)); strings.Join(got, " ") != ". .. planted" {
		t.Errorf("/tmp of the task holds %q, want a fresh tmpfs", got)
	}
	if _, err := os.Stat(filepath.Join(target, "planted")); err == nil {
		t.Error("the sandbox followed the task's tmp symlink into another allocation")
	}
}

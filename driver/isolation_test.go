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
	top := t.TempDir()
	for _, dir := range []string{"data/alloc/A/alloc", "data/alloc/A/web/tmp"} {
		if err := os.MkdirAll(filepath.Join(top, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(top, "data"), filepath.Join(top, "link")); err != nil {
		t.Fatal(err)
	}
	allocDir := filepath.Join(top, "link", "alloc", "A")
	spec, err := sandboxSpec(allocDir, "web", nobody)
	if err != nil {
		t.Fatal(err)
	}
	// Mounted from where they are, at the paths Nomad gives the task.
	want := []sandbox.Bind{
		{Source: filepath.Join(top, "data/alloc/A/alloc"), Target: filepath.Join(allocDir, "alloc")},
		{Source: filepath.Join(top, "data/alloc/A/web"), Target: filepath.Join(allocDir, "web")},
	}
	if fmt.Sprint(spec.Binds) != fmt.Sprint(want) {
		t.Errorf("binds %v, want %v", spec.Binds, want)
	}
	if spec.Dir != filepath.Join(allocDir, "web") || spec.Tmp != filepath.Join(top, "data/alloc/A/web/tmp") {
		t.Errorf("dir %s, tmp %s", spec.Dir, spec.Tmp)
	}
	// t.TempDir is below /tmp: the task's tmp dir on /tmp would hide the
	// allocation, so /tmp is a fresh tmpfs that the allocation is mounted in.
	if strings.Join(spec.Tmpfs, " ") != "/tmp" || strings.Join(spec.TmpTargets, " ") != "/var/tmp" {
		t.Errorf("tmpfs %v, tmp targets %v", spec.Tmpfs, spec.TmpTargets)
	}
	if strings.Join(spec.Root, " ") != strings.Join(chrootEnv, " ") {
		t.Errorf("root %v, want Nomad's default chroot_env", spec.Root)
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

// The task's root holds Nomad's default chroot_env from the host, read-only,
// and its own allocation; the rest of the host's filesystem is not there.
func TestTaskSeesOnlyChrootEnvOfTheHost(t *testing.T) {
	_, h := newHarness(t)
	name := fmt.Sprintf("zs-test-%d", time.Now().UnixNano())
	secrets := []string{filepath.Join("/srv", name, "token"), filepath.Join("/var/lib", name, "token")}
	for _, s := range secrets {
		plantSecret(t, s)
		defer os.RemoveAll(filepath.Dir(s))
		if err := asNobodyOnHost(t, "cat "+s); err != nil {
			t.Fatal("control: nobody cannot read the planted file on the host; the test proves nothing")
		}
	}
	task, cleanup := newTask(t, h, fmt.Sprintf(`
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		for p in /root /home /var/lib /srv /opt /run/lock /sys /boot /mnt %s; do
			ls -d "$p" >/dev/null 2>&1 && echo "LEAK-$p"
		done
		echo "root:" $(ls /)
		echo "var:" $(ls /var)
		head -c1 /etc/hostname >/dev/null && echo reads-etc
		/usr/bin/env | grep -q '^GREETING=hello' && echo runs-usr-bin-env
		"$NOMAD_TASK_DIR/script.sh" && echo runs-local-script
		echo x > "$NOMAD_TASK_DIR/written" && echo writes-task-dir
		echo x > /tmp/written && echo writes-tmp
		echo x > /dev/null && head -c1 /dev/urandom >/dev/null && echo has-dev-null-urandom
		[ -e /dev/mem ] || [ -e /dev/kmsg ] && echo LEAK-dev
		true`, strings.Join(secrets, " ")))
	defer cleanup()
	script := filepath.Join(task.TaskDir().LocalDir, "script.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}

	out := runToEnd(t, h, task)
	t.Logf("task output:\n%s", out)
	for _, want := range []string{"var: tmp\n", "reads-etc", "runs-usr-bin-env", "runs-local-script",
		"writes-task-dir", "writes-tmp", "has-dev-null-urandom"} {
		if !strings.Contains(out, want) {
			t.Errorf("task output lacks %q", want)
		}
	}
	if strings.Contains(out, "LEAK") {
		t.Error("the task sees host paths outside chroot_env")
	}
}

// Read-only is the mounts', not the permissions': root, with dac_override,
// writes /usr and /etc on the host.
func TestChrootEnvIsReadOnlyEvenForRoot(t *testing.T) {
	d, h := newHarness(t)
	if err := d.SetConfig(&base.Config{PluginConfig: pluginConfigFromHCL(t, `denied_users = []`)}); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("zs-test-%d", time.Now().UnixNano())
	task, cleanup := newTask(t, h, fmt.Sprintf(`
		exec > "$NOMAD_TASK_DIR/out" 2>&1
		for d in /usr /usr/bin /etc /bin/ /lib/ /; do
			touch "$d/%s" && echo "LEAK-wrote-$d"
		done
		echo done`, name))
	defer cleanup()
	task.User = "root"
	out := runToEnd(t, h, task)
	t.Logf("task output:\n%s", out)
	for _, d := range []string{"/usr", "/usr/bin", "/etc", "/bin", "/lib"} {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			os.Remove(filepath.Join(d, name))
			t.Errorf("a root task wrote %s on the host", d)
		}
	}
	if !strings.Contains(out, "done") || strings.Contains(out, "LEAK") {
		t.Error("a root task wrote into its read-only root")
	}
}

// The executor resolves the command on the host; the launcher runs that path
// in the new root.
func TestCommandsRunFromTheHostsDirsAndTheTaskDir(t *testing.T) {
	cases := []struct {
		name    string
		command string
		args    []string
	}{
		{"in /usr/bin", "/usr/bin/env", []string{"true"}},
		{"in /usr/sbin", "/usr/sbin/chroot", []string{"--version"}},
		{"in /bin", "/bin/sh", []string{"-c", "true"}},
		{"in PATH", "sh", []string{"-c", "true"}},
		{"in local/", "run.sh", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, h := newHarness(t)
			task, cleanup := newTask(t, h, "")
			defer cleanup()
			if err := os.WriteFile(filepath.Join(task.TaskDir().LocalDir, "run.sh"), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			mustEncode(t, task, &TaskConfig{Command: tc.command, Args: tc.args})
			startQuick(t, h, task)
			if res := waitExit(t, h, task.ID, 10*time.Second); res.ExitCode != 0 {
				t.Fatalf("exit %+v", res)
			}
		})
	}
}

// `nomad alloc exec -t`: the executor opens the terminal on the host; the
// task's /dev has the host's ptys so that the shell finds it by name.
func TestExecWithATerminal(t *testing.T) {
	d, h := newHarness(t)
	task, cleanup := newTask(t, h, "sleep 600")
	defer cleanup()
	start(t, h, task)
	defer h.DestroyTask(task.ID, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Closing a terminal's input ends the session: keep it open.
	stream := &terminalStream{ctx: ctx}
	if err := d.ExecTaskStreamingRaw(ctx, task.ID, []string{"sh", "-c", "tty; ls /dev/pts/ptmx"}, true, stream); err != nil {
		t.Fatalf("exec streaming with a terminal: %v", err)
	}
	t.Logf("exec -t printed %q", stream.stdout())
	if got := stream.stdout(); !strings.HasPrefix(got, "/dev/pts/") || !strings.Contains(got, "/dev/pts/ptmx") {
		t.Errorf("exec -t printed %q, want its terminal's name", got)
	}
}

// terminalStream is a `nomad alloc exec -t` that types nothing.
type terminalStream struct {
	collectStream
	ctx context.Context
}

func (s *terminalStream) Recv() (*drivers.ExecTaskStreamingRequestMsg, error) {
	<-s.ctx.Done()
	return nil, io.EOF
}

func TestACommandOutsideTheTasksRootIsRefused(t *testing.T) {
	dir, err := os.MkdirTemp("/var/tmp", "zeroscale-driver-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	command := filepath.Join(dir, "app")
	if err := os.WriteFile(command, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, h := newHarness(t)
	task, cleanup := newRefusedTask(t, h, "")
	defer cleanup()
	mustEncode(t, task, &TaskConfig{Command: command})
	_, _, err = h.StartTask(task)
	if want := "is outside what the task sees"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("start %s: %v, want an error containing %q", command, err, want)
	}
}

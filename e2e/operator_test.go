package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// The operator surface: the CLI and the HTTP API, schedules, wake_with, and
// another scaler on the same group.

// operatorCluster is a node whose plugin serves its HTTP API.
func operatorCluster(t *testing.T) (*harness.Cluster, string) {
	t.Helper()
	agent := fmt.Sprintf("127.0.0.1:%d", harness.FreePorts(t, 1)[0])
	return harness.NewCluster(t, harness.ClusterOptions{PluginConfig: fmt.Sprintf("metrics_address = %q\n", agent)}), agent
}

// cli runs the plugin binary's CLI against the cluster, with token.
func cli(t *testing.T, c *harness.Cluster, agent, token string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(harness.BuildPlugin(t), args...)
	cmd.Env = append(cmd.Environ(), "NOMAD_ADDR="+c.Nomad.Addr, "NOMAD_TOKEN="+token, "ZEROSCALE_AGENT="+agent)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run the CLI: %v", err)
	}
	t.Logf("$ nomad-driver-zeroscale %s  (exit %d)\n%s", strings.Join(args, " "), code, out)
	return string(out), code
}

type statusEntry struct {
	Job, Group, Phase string
	Addresses         []string
	Count             int
	WakeCount         int      `json:"wake_count"`
	IdleTimeout       string   `json:"idle_timeout"`
	AwakeDuring       []string `json:"awake_during"`
	InWindow          bool     `json:"in_window"`
	WakeWith          []string `json:"wake_with"`
	LastWake          *struct {
		Latency, Reason string
	} `json:"last_wake"`
}

func statusOf(t *testing.T, c *harness.Cluster, agent, target string) statusEntry {
	t.Helper()
	out, code := cli(t, c, agent, "", "status", "-json", target)
	var entries []statusEntry
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil || len(entries) != 1 {
		t.Fatalf("status -json %s: exit %d, want one group:\n%s", target, code, out)
	}
	return entries[0]
}

func TestOperatorCLIStatusWakeSleep(t *testing.T) {
	t.Parallel()
	c, agent := operatorCluster(t)
	port := c.RunExample(t, "http.nomad.hcl", "http", "10m")
	addr := fmt.Sprintf("%s:%d", c.Net.HostAddr, port)

	st := statusOf(t, c, agent, "http/http")
	if st.Job != "http" || st.Group != "http" || st.Phase != "awake" || st.Count != 1 || st.WakeCount != 1 ||
		st.IdleTimeout != "10m0s" || !slices.Contains(st.Addresses, addr) {
		t.Fatalf("status of the running group: %+v, want awake at %s, count 1, wake_count 1, idle_timeout 10m0s", st, addr)
	}
	if out, code := cli(t, c, agent, "", "status", "http"); code != 0 || !strings.Contains(out, "default/http/http") ||
		!regexp.MustCompile(`Served at +`+regexp.QuoteMeta(addr)).MatchString(out) || !strings.Contains(out, "Idle left") {
		t.Fatalf("status http: exit %d\n%s", code, out)
	}

	// Sleep now, although idle_timeout is far off.
	out, code := cli(t, c, agent, "", "sleep", "http/http")
	if code != 0 || !strings.Contains(out, "http/http is asleep") {
		t.Fatalf("sleep: exit %d\n%s", code, out)
	}
	c.WaitPlaceholder(t, "http", c.Net.HostAddr, port, 30*time.Second)
	if st := statusOf(t, c, agent, "http/http"); st.Phase != "asleep" || st.Count != 0 || !slices.Contains(st.Addresses, addr) {
		t.Fatalf("status after sleep: %+v, want asleep at count 0, parked at %s", st, addr)
	}

	// Wake without traffic: the command waits for readiness.
	out, code = cli(t, c, agent, "", "wake", "http/http")
	if code != 0 || !strings.Contains(out, "http/http is awake: ready") {
		t.Fatalf("wake: exit %d\n%s", code, out)
	}
	if code, _, err := c.HTTPGet(c.URL(port), 5*time.Second); err != nil || code != 200 {
		t.Fatalf("GET right after wake returned: %d %v", code, err)
	}
	if out, code := cli(t, c, agent, "", "wake", "http/http"); code != 0 || !strings.Contains(out, "already awake") {
		t.Fatalf("wake of an awake group: exit %d\n%s", code, out)
	}
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 1 {
		t.Fatalf("%d scale-ups, want the CLI's one", n)
	}

	// The same over HTTP.
	resp, err := http.Get("http://" + agent + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" || !strings.Contains(string(body), `"job": "http"`) {
		t.Fatalf("GET /v1/status: %s %s", resp.Status, body)
	}
	resp, err = http.Post("http://"+agent+"/v1/groups/default/http/nosuch/wake", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(body), "no such group") {
		t.Fatalf("POST wake of an unknown group: %s %s, want 404 naming it", resp.Status, body)
	}

	// Clear errors.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"wake", "nosuch/web"}, "no such job"},
		{[]string{"sleep", "http/nosuch"}, "no such group"},
		{[]string{"wake", "http"}, "is not JOB/GROUP"},
		{[]string{"status", "nosuch"}, "no such job"},
	} {
		if out, code := cli(t, c, agent, "", tc.args...); code != 1 || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, want 1 and %q:\n%s", tc.args, code, tc.want, out)
		}
	}
	if out, code := cli(t, c, "127.0.0.1:1", "", "status"); code != 1 || !strings.Contains(out, "no zeroscale agent answers at 127.0.0.1:1") {
		t.Errorf("status with no agent to ask: exit %d\n%s", code, out)
	}
}

// A schedule window computed from now opens and closes within the test: the
// group wakes at its start without traffic, stays up inside it although
// idle, and sleeps after it.
func TestOperatorAwakeDuringWindow(t *testing.T) {
	t.Parallel()
	c, agent := operatorCluster(t)
	// The window starts at the next minute that is at least 50 s away (the
	// group first goes to sleep, in about 20 s) and lasts one minute.
	start := time.Now().UTC().Add(110 * time.Second).Truncate(time.Minute)
	window := fmt.Sprintf("* %s-%s UTC", start.Format("15:04"), start.Add(time.Minute).Format("15:04"))
	port := harness.FreePort(t, c.Net.HostAddr)
	c.Run(t, harness.TestdataJob(t, "policy", "scheduled"), map[string]string{
		"nodes": fmt.Sprintf("[%q]", c.Node), "port": fmt.Sprint(port), "idle_timeout": "5s",
		"awake_during": fmt.Sprintf("[%q]", window)})
	c.WaitHealthy(t, "scheduled", 120*time.Second)
	c.WaitDesired(t, "scheduled", "web", 0, 60*time.Second)
	if time.Now().After(start) {
		t.Fatalf("asleep only after the window began (%s)", window)
	}
	st := statusOf(t, c, agent, "scheduled/web")
	if st.InWindow || !slices.Contains(st.AwakeDuring, window) {
		t.Fatalf("status before the window: %+v", st)
	}
	c.WaitDesired(t, "scheduled", "web", 1, time.Until(start)+30*time.Second)
	t.Logf("woke %v after the window opened", time.Since(start).Round(100*time.Millisecond))
	if time.Now().Before(start) {
		t.Fatal("woke before the window")
	}
	// Idle inside the window, past idle_timeout: still up.
	time.Sleep(time.Until(start.Add(45 * time.Second)))
	if st := statusOf(t, c, agent, "scheduled/web"); st.Phase != "awake" || !st.InWindow {
		t.Fatalf("status inside the window, idle: %+v, want awake", st)
	}
	c.WaitDesired(t, "scheduled", "web", 0, time.Until(start.Add(time.Minute))+30*time.Second)
	if time.Now().Before(start.Add(time.Minute)) {
		t.Fatal("asleep inside the window")
	}
	evs := c.ScaleEvents(t, "scheduled", "web")
	found := false
	for _, e := range evs {
		found = found || e.Count != nil && *e.Count == 1 && strings.Contains(e.Message, "awake_during")
	}
	if !found {
		t.Fatal("no scale-up event names the awake_during window")
	}
}

// A web group wakes with a PostgreSQL group: a request to the sleeping web
// wakes both, and is answered once PostgreSQL is up; PostgreSQL does not
// sleep while web is up.
func TestOperatorWakeWithPostgres(t *testing.T) {
	t.Parallel()
	c, agent := operatorCluster(t)
	pgPort := c.RunExample(t, "postgres.nomad.hcl", "postgres", "5s")
	port := harness.FreePort(t, c.Net.HostAddr)
	c.Run(t, harness.TestdataJob(t, "policy", "web"), map[string]string{
		"nodes": fmt.Sprintf("[%q]", c.Node), "port": fmt.Sprint(port), "idle_timeout": "20s",
		"wake_with": `["postgres/postgres"]`})
	c.WaitHealthy(t, "web", 120*time.Second)
	// postgres is idle for 5 s, but web (which wakes with it) is up.
	time.Sleep(12 * time.Second)
	if st := statusOf(t, c, agent, "postgres/postgres"); st.Phase != "awake" {
		t.Fatalf("postgres is %s while web is up, want awake", st.Phase)
	}
	c.WaitDesired(t, "web", "web", 0, 90*time.Second)
	c.WaitDesired(t, "postgres", "postgres", 0, 60*time.Second)
	c.WaitNoneRunning(t, "postgres", 30*time.Second)

	code, _, err := c.HTTPGet(c.URL(port), 60*time.Second)
	if err != nil || code != 200 {
		t.Fatalf("GET to the sleeping web: %d %v\n%s", code, err, c.Diagnose(t))
	}
	// Answered: by then postgres must be up too.
	if st := statusOf(t, c, agent, "postgres/postgres"); st.Phase != "awake" || st.Count != 1 {
		t.Fatalf("postgres after web answered: %+v, want awake at count 1", st)
	}
	out, err := inNS(t, c, 20*time.Second, "psql", "-h", c.Net.HostAddr.String(), "-p", fmt.Sprint(pgPort), "-U", "postgres", "-tAc", "select 1")
	if err != nil || strings.TrimSpace(out) != "1" {
		t.Fatalf("psql after the wake: %v %q", err, out)
	}
	if st := statusOf(t, c, agent, "web/web"); !slices.Contains(st.WakeWith, "postgres/postgres") {
		t.Fatalf("status of web: %+v, want wake_with postgres/postgres", st)
	}
}

// Another scaler (as the Nomad Autoscaler would) moves the group between 1
// and 3; zeroscale only ever moves it between 0 and wake_count.
func TestOperatorBesideAnotherScaler(t *testing.T) {
	t.Parallel()
	c, _ := operatorCluster(t)
	c.Run(t, harness.TestdataJob(t, "dynamic", "shared"), map[string]string{
		"nodes": fmt.Sprintf("[%q]", c.Node), "idle_timeout": "5s", "max": "3"})
	c.WaitHealthy(t, "shared", 120*time.Second)
	began := time.Now()
	c.Scale(t, "shared", "web", 3, "autoscaler: scale out")
	// Idle well past idle_timeout at 3: left to the other scaler.
	time.Sleep(15 * time.Second)
	if st, _, err := c.API.Jobs().ScaleStatus("shared", nil); err != nil || st.TaskGroups["web"].Desired != 3 {
		t.Fatalf("count %v (%v) after 15 s idle at 3, want 3: zeroscale lowered a count above wake_count", st.TaskGroups["web"].Desired, err)
	}
	c.Scale(t, "shared", "web", 2, "autoscaler: scale in")
	time.Sleep(10 * time.Second)
	c.Scale(t, "shared", "web", 1, "autoscaler: scale in")
	c.WaitDesired(t, "shared", "web", 0, 60*time.Second) // at wake_count and idle: zeroscale's
	for _, e := range harness.EventsSince(c.ScaleEvents(t, "shared", "web"), began) {
		if e.Count == nil || strings.HasPrefix(e.Message, "autoscaler") {
			continue
		}
		if *e.Count != 0 && *e.Count != 1 {
			t.Errorf("zeroscale set the count to %d: %s", *e.Count, e.Message)
		}
		if *e.Count == 0 && e.PreviousCount != 1 {
			t.Errorf("zeroscale scaled %d to 0: %s", e.PreviousCount, e.Message)
		}
	}
}

package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

func inNS(t *testing.T, c *harness.Cluster, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := c.Net.Command(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func consulDNSPort(t *testing.T, c *harness.Cluster) string {
	_, port, err := net.SplitHostPort(c.Consul.DNSAddr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}

func TestNginxSleepsDespiteChecksWakesOnCurl(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "nginx.nomad.hcl", "nginx", "5s")

	// Consul checks it over HTTP every second; it sleeps all the same.
	c.WaitDesired(t, "nginx", "nginx", 0, 60*time.Second)

	// While asleep, DNS still answers with its address (the placeholder).
	out, err := exec.Command("dig", "+short", "-p", consulDNSPort(t, c), "@127.0.0.1", "nginx.service.consul").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != c.Net.HostAddr.String() {
		t.Fatalf("dig while asleep: %q %v", out, err)
	}

	url := fmt.Sprintf("http://%s:%d/", c.Net.HostAddr, port)
	began := time.Now()
	out2, err := inNS(t, c, 60*time.Second, "curl", "-sS", "-m", "30", "-o", "-", "-w", "\n%{http_code}", url)
	if err != nil || !strings.HasSuffix(strings.TrimSpace(out2), "200") || !strings.Contains(out2, "nginx woke up for you") {
		t.Fatalf("curl from the namespace: %v\n%s\n%s", err, out2, c.Diagnose(t))
	}
	t.Logf("curl woke nginx and got 200 in %v", time.Since(began))
	if n := harness.CountScaleTo(c.ScaleEvents(t, "nginx", "nginx"), 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
}

func TestPostgresWakesOnPsql(t *testing.T) {
	if _, err := os.Stat("/usr/lib/postgresql/15/bin/postgres"); err != nil {
		t.Fatal("PostgreSQL 15 is not installed (make test installs Debian's postgresql)")
	}
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "postgres.nomad.hcl", "postgres", "5s")
	c.WaitDesired(t, "postgres", "postgres", 0, 90*time.Second)

	began := time.Now()
	out, err := inNS(t, c, 120*time.Second, "psql", "-h", c.Net.HostAddr.String(), "-p", fmt.Sprint(port),
		"-U", "postgres", "-d", "postgres", "-At", "-c", "select 6 * 7")
	if err != nil || strings.TrimSpace(out) != "42" {
		t.Fatalf("psql from the namespace: %v\n%s\n%s", err, out, c.Diagnose(t))
	}
	t.Logf("psql woke PostgreSQL and ran a query in %v", time.Since(began))
	if n := harness.CountScaleTo(c.ScaleEvents(t, "postgres", "postgres"), 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
}

func TestStormOf200ConnectsWakesOnce(t *testing.T) {
	metricsPort := harness.FreePorts(t, 1)[0]
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", metricsPort)
	c := harness.NewCluster(t, harness.ClusterOptions{PluginConfig: fmt.Sprintf("metrics_address = %q\n", metricsAddr)})
	port := harness.FreePort(t, c.Net.HostAddr)
	// nginx: its listen backlog (511) takes a storm; Python's (5) would not,
	// gated or not.
	c.Run(t, harness.Example(t, "nginx.nomad.hcl"), map[string]string{"node": c.Node, "port": fmt.Sprint(port), "idle_timeout": "5s"})
	c.WaitHealthy(t, "nginx", 90*time.Second)
	c.WaitDesired(t, "nginx", "nginx", 0, 60*time.Second)

	const clients = 200
	url := fmt.Sprintf("http://%s:%d/", c.Net.HostAddr, port)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	began := time.Now()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, err := c.HTTPGet(url, 60*time.Second)
			if err == nil && code != 200 {
				err = fmt.Errorf("status %d", code)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			t.Logf("client: %v", err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d concurrent clients failed", failed, clients)
	}
	t.Logf("%d concurrent clients all served in %v", clients, time.Since(began))
	if n := harness.CountScaleTo(c.ScaleEvents(t, "nginx", "nginx"), 1); n != 1 {
		t.Fatalf("%d scale-up events for %d connects, want 1", n, clients)
	}
	time.Sleep(time.Second) // replays finish off the loop
	passed := harness.Metric(t, metricsAddr, `zeroscale_syn_replays_total{result="passed"}`)
	fallback := harness.Metric(t, metricsAddr, `zeroscale_syn_replays_total{result="fallback_retransmit"}`)
	connected := harness.Metric(t, metricsAddr, `zeroscale_syn_replays_total{result="already_connected"}`)
	t.Logf("SYN replay: %v passed, %v fell back to the client's retransmit, %v already connected", passed, fallback, connected)
	if passed == 0 {
		t.Fatal("no SYN was replayed")
	}
}

func TestQuietConnectionKeepsItAwake(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "4s")

	conn, err := c.Net.Dial(context.Background(), "tcp", fmt.Sprintf("%s:%d", c.Net.HostAddr, port))
	if err != nil {
		t.Fatal(err)
	}
	// Open, silent, for four idle timeouts.
	time.Sleep(16 * time.Second)
	st, _, err := c.API.Jobs().ScaleStatus("http", nil)
	if err != nil || st.TaskGroups["http"].Desired != 1 {
		t.Fatalf("with an open connection the group went to %d (%v)", st.TaskGroups["http"].Desired, err)
	}
	conn.Close()
	began := time.Now()
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	t.Logf("slept %v after the connection closed (idle_timeout 4s)", time.Since(began))
}

func TestAnyDriverIsGated(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "raw_exec.nomad.hcl", "raw", "5s")
	c.WaitDesired(t, "raw", "raw", 0, 60*time.Second)
	code, body, err := c.HTTPGet(fmt.Sprintf("http://%s:%d/", c.Net.HostAddr, port), 30*time.Second)
	if err != nil || code != 200 || !strings.Contains(body, "raw_exec") {
		t.Fatalf("GET the raw_exec service: %d %q %v", code, body, err)
	}
}

// pluginPID finds the zeroscale plugin process this Nomad agent started
// (not an executor, which runs the same binary with arguments).
func pluginPID(t *testing.T, c *harness.Cluster) int {
	t.Helper()
	if pid := pluginPIDOrZero(c); pid != 0 {
		return pid
	}
	t.Fatal("plugin process not found")
	return 0
}

func pluginPIDOrZero(c *harness.Cluster) int {
	return findPID(func(args []string) bool {
		return len(args) == 1 && strings.HasSuffix(args[0], "/nomad-driver-zeroscale") &&
			strings.Contains(c.Nomad.Output(), args[0])
	})
}

// findPID returns the first process whose argument list matches, or 0.
func findPID(match func(args []string) bool) int {
	if pids := harness.Processes(match); len(pids) > 0 {
		return pids[0]
	}
	return 0
}

func TestPluginKilledWhileAsleepStillWakes(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "5s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)

	pid := pluginPID(t, c)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// While no plugin runs, the pinned gate keeps the address parked: a
	// connect is held, not refused.
	url := fmt.Sprintf("http://%s:%d/", c.Net.HostAddr, port)
	// Nomad notices the dead plugin and starts it again.
	deadline := time.Now().Add(90 * time.Second)
	for {
		if p := pluginPIDOrZero(c); p != 0 && p != pid {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Nomad did not restart the plugin")
		}
		time.Sleep(500 * time.Millisecond)
	}
	code, _, err := c.HTTPGet(url, 60*time.Second)
	if err != nil || code != 200 {
		t.Fatalf("GET after the plugin restarted: %d %v\n%s", code, err, c.Diagnose(t))
	}
	if n := harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
}

func TestClientRestartRecoversTasks(t *testing.T) {
	dataDir := t.TempDir()
	if err := os.Chmod(dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(dataDir), 0o755); err != nil {
		t.Fatal(err)
	}
	c := harness.NewCluster(t, harness.ClusterOptions{DataDir: dataDir, Persistent: true})
	port := c.RunExample(t, "http.nomad.hcl", "http", "1h")
	before := taskPID(t, c)

	c.Nomad.Restart(t)
	c.WaitHealthy(t, "http", 60*time.Second)
	after := taskPID(t, c)
	if after != before {
		t.Fatalf("task pid %d after the client restart, was %d: the task was restarted, not recovered", after, before)
	}
	if err := syscall.Kill(before, 0); err != nil {
		t.Fatalf("the task process %d is gone: %v", before, err)
	}
	allocs, _, _ := c.API.Jobs().Allocations("http", false, nil)
	for _, a := range allocs {
		for _, ts := range a.TaskStates {
			if ts.Restarts != 0 {
				t.Fatalf("task restarted %d times", ts.Restarts)
			}
		}
	}
	code, _, err := c.HTTPGet(fmt.Sprintf("http://%s:%d/", c.Net.HostAddr, port), 10*time.Second)
	if err != nil || code != 200 {
		t.Fatalf("GET after restart: %d %v", code, err)
	}
}

// taskPID finds the python process of the running http allocation.
func taskPID(t *testing.T, c *harness.Cluster) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		allocs, _, err := c.API.Jobs().Allocations("http", false, nil)
		if err == nil {
			for _, a := range allocs {
				if a.ClientStatus == "running" {
					return findProcess(t, "http.server", a.ID)
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatal("no running http allocation")
	return 0
}

// findProcess returns the pid of the process whose command line contains
// all of the given parts.
func findProcess(t *testing.T, parts ...string) int {
	t.Helper()
	pid := findPID(func(args []string) bool {
		cmd := strings.Join(args, " ")
		for _, p := range parts {
			if !strings.Contains(cmd, p) {
				return false
			}
		}
		return true
	})
	if pid == 0 {
		t.Fatalf("no process with %v", parts)
	}
	return pid
}

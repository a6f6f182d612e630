package plugin

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// These tests load the plugin into a real Nomad agent (with real Consul and
// the real gate) and drive it through the Nomad API, like an operator.

func TestSleepsDespiteChecksAndTheSameConnectWakesIt(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "http.nomad.hcl", "http", "5s")
	// Consul checks the service over HTTP every second; it sleeps anyway.
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)

	// One connect() from the client namespace: it is held while the group
	// wakes and completes; the request then goes over that connection.
	began := time.Now()
	conn, err := c.Net.Dial(context.Background(), "tcp", fmt.Sprintf("%s:%d", c.Net.HostAddr, port))
	if err != nil {
		t.Fatalf("connect to the sleeping service: %v", err)
	}
	defer conn.Close()
	connected := time.Since(began)
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	status, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.Contains(status, " 200 ") {
		t.Fatalf("response on the waking connection: %q %v", status, err)
	}
	t.Logf("connect() to the sleeping service returned after %v", connected)

	evs := c.ScaleEvents(t, "http", "http")
	if n := harness.CountScaleTo(evs, 1); n != 1 {
		t.Fatalf("%d scale-up events, want 1", n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var awake string
		for _, e := range c.ScaleEvents(t, "http", "http") {
			if strings.Contains(e.Message, "zeroscale: awake") {
				awake = e.Message
			}
		}
		if strings.Contains(awake, "replayed SYN accepted") && strings.Contains(awake, "1 passed") {
			t.Logf("awake event: %s", awake)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no awake event saying the original SYN was replayed: %q", awake)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The woken task says so in its events too.
	deadline = time.Now().Add(10 * time.Second)
	for !taskEventsMention(c, "http", "zeroscale: awake") {
		if time.Now().After(deadline) {
			t.Fatal("no task event about the wake")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// taskEventsMention tells whether a running allocation of job has a task
// event containing text.
func taskEventsMention(c *harness.Cluster, job, text string) bool {
	allocs, _, err := c.API.Jobs().Allocations(job, false, nil)
	if err != nil {
		return false
	}
	for _, a := range allocs {
		if a.ClientStatus != "running" {
			continue
		}
		for _, ts := range a.TaskStates {
			for _, ev := range ts.Events {
				if strings.Contains(ev.DisplayMessage, text) || strings.Contains(ev.Message, text) {
					return true
				}
			}
		}
	}
	return false
}

func TestHundredConcurrentConnectsScaleUpOnce(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	port := c.RunExample(t, "nginx.nomad.hcl", "nginx", "5s")
	c.WaitDesired(t, "nginx", "nginx", 0, 60*time.Second)

	const clients = 100
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []error
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, err := c.HTTPGet(c.URL(port), 60*time.Second)
			if err == nil && code != 200 {
				err = fmt.Errorf("status %d", code)
			}
			if err != nil {
				mu.Lock()
				failures = append(failures, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d clients failed, first: %v", len(failures), clients, failures[0])
	}
	if n := harness.CountScaleTo(c.ScaleEvents(t, "nginx", "nginx"), 1); n != 1 {
		t.Fatalf("%d scale-up events for %d concurrent connects, want exactly 1", n, clients)
	}
}

func TestInvalidPluginConfigMarksTheDriverUnhealthy(t *testing.T) {
	consul := harness.StartConsul(t, harness.ConsulOptions{})
	nomad := harness.StartNomad(t, harness.NomadOptions{Consul: consul, NoWait: true,
		PluginConfig: `wake_from = ["10.0.0.0/33"]`})
	api := nomad.Client(t)
	deadline := time.Now().Add(90 * time.Second)
	for {
		nodes, _, err := api.Nodes().List(nil)
		if err == nil && len(nodes) > 0 {
			if d := nodes[0].Drivers["zeroscale"]; d != nil && d.Detected && !d.Healthy {
				if !strings.Contains(d.HealthDescription, `wake_from: [0] "10.0.0.0/33"`) {
					t.Fatalf("health description %q does not name the field", d.HealthDescription)
				}
				t.Logf("node status: %s", d.HealthDescription)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the driver never reported the invalid config")
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// jobFrom writes a copy of an example with some text replaced.
func jobFrom(t *testing.T, example string, replace ...string) string {
	t.Helper()
	b, err := os.ReadFile(harness.Example(t, example))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for i := 0; i+1 < len(replace); i += 2 {
		if !strings.Contains(s, replace[i]) {
			t.Fatalf("%s has no %q", example, replace[i])
		}
		s = strings.ReplaceAll(s, replace[i], replace[i+1])
	}
	path := filepath.Join(t.TempDir(), example)
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestInvalidPolicyIsAnErrorScalingEvent(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	job := jobFrom(t, "http.nomad.hcl", "wake_timeout = \"2m\"", "wake_timeout = \"two minutes\"")
	port := harness.FreePort(t, c.Net.HostAddr)
	c.Run(t, job, map[string]string{"node": c.Node, "port": fmt.Sprint(port), "idle_timeout": "3s"})
	c.WaitHealthy(t, "http", 90*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, e := range c.ScaleEvents(t, "http", "http") {
			if e.Error && strings.Contains(e.Message, "scaling.policy.zeroscale.wake_timeout") {
				t.Logf("error event: %s", e.Message)
				// Ignored until fixed: it does not sleep.
				time.Sleep(8 * time.Second)
				st, _, _ := c.API.Jobs().ScaleStatus("http", nil)
				if st.TaskGroups["http"].Desired != 1 {
					t.Fatal("a group with an invalid policy was scaled")
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no error scaling event naming the field\n%s", c.Diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func TestDryRunDecidesButScalesNothing(t *testing.T) {
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", harness.FreePorts(t, 1)[0])
	c := harness.NewCluster(t, harness.ClusterOptions{PluginConfig: fmt.Sprintf("dry_run = true\nmetrics_address = %q\n", metricsAddr)})
	port := c.RunExample(t, "http.nomad.hcl", "http", "2s")
	deadline := time.Now().Add(30 * time.Second)
	for harness.Metric(t, metricsAddr, `zeroscale_dry_run_decisions_total{action="sleep"}`) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("dry run recorded no decision")
		}
		time.Sleep(250 * time.Millisecond)
	}
	st, _, _ := c.API.Jobs().ScaleStatus("http", nil)
	if st.TaskGroups["http"].Desired != 1 || harness.CountScaleTo(c.ScaleEvents(t, "http", "http"), 0) != 0 {
		t.Fatal("dry run scaled the group")
	}
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", c.Net.HostAddr, port), 2*time.Second)
	if err != nil {
		t.Fatalf("dry run gated the service: %v", err)
	}
	conn.Close()
}

// Package e2e runs zeroscale the way users do: real Consul and Nomad agents,
// the plugin built from this checkout, real servers (Python, nginx,
// PostgreSQL), and clients in a network namespace reaching the node over a
// veth pair.
package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

func TestHTTPExampleRunsAndServes(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})

	out, err := c.Nomad.CLI(t, "node", "status", "-self", "-verbose")
	if err != nil {
		t.Fatalf("node status: %v\n%s", err, out)
	}
	d := c.Nomad.Node(t).Drivers["zeroscale"]
	if d == nil || !d.Healthy || d.Attributes["driver.zeroscale.gate"] != "true" || d.Attributes["driver.zeroscale.version"] == "" {
		t.Fatalf("zeroscale driver on the node: %+v\n%s", d, out)
	}
	if !strings.Contains(out, "driver.zeroscale.gate ") || d.Attributes["driver.zeroscale.gate.reason"] != "" {
		t.Fatalf("node status shows the wrong gate attributes (reason %q):\n%s", d.Attributes["driver.zeroscale.gate.reason"], out)
	}

	port := c.RunExample(t, "http.nomad.hcl", "http", "1h")
	code, body, err := c.HTTPGet(c.URL(port), 5*time.Second)
	if err != nil || code != 200 || !strings.Contains(body, "hello from a service that was asleep") {
		t.Fatalf("GET from the client namespace: %d %q %v", code, body, err)
	}

	if out, err := c.Nomad.CLI(t, "job", "stop", "-purge", "http"); err != nil {
		t.Fatalf("job stop: %v\n%s", err, out)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		entries, _, _ := c.Consul.Client(t, "").Health().Service("http", "", false, nil)
		_, _, err := c.HTTPGet(c.URL(port), time.Second)
		if len(entries) == 0 && err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after stop -purge: %d instances in Consul, server answering: %v", len(entries), err == nil)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if jobs, _, _ := c.API.Jobs().List(nil); len(jobs) != 0 {
		t.Fatalf("jobs after purge: %+v", jobs)
	}
}

func TestExamplesValidate(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{})
	for _, name := range []string{"http.nomad.hcl", "nginx.nomad.hcl", "postgres.nomad.hcl", "raw_exec.nomad.hcl",
		"docker.nomad.hcl", "bridge.nomad.hcl", "ipv6.nomad.hcl"} {
		out, err := c.Nomad.CLI(t, "job", "validate", "-var", "node=x", harness.Example(t, name))
		if err != nil {
			t.Errorf("%s: %v\n%s", name, err, out)
		}
	}
}

func logEvents(t *testing.T, c *harness.Cluster, job string) {
	for _, e := range c.ScaleEvents(t, job, job) {
		count := "-"
		if e.Count != nil {
			count = fmt.Sprint(*e.Count)
		}
		t.Logf("scaling event: count=%s error=%v %s", count, e.Error, e.Message)
	}
}

func TestSleepAndWakeWithoutReplayWaitsForTheRetransmit(t *testing.T) {
	c := harness.NewCluster(t, harness.ClusterOptions{PluginConfig: "syn_replay = false\n"})
	port := c.RunExample(t, "http.nomad.hcl", "http", "5s")
	c.WaitDesired(t, "http", "http", 0, 60*time.Second)
	began := time.Now()
	code, _, err := c.HTTPGet(c.URL(port), 30*time.Second)
	took := time.Since(began)
	if err != nil || code != 200 {
		t.Fatalf("GET that wakes: %d %v\n%s", code, err, c.Diagnose(t))
	}
	logEvents(t, c, "http")
	// Nothing replays the first SYN: the client's own retransmit (1 s
	// later at the earliest) connects.
	if took < 900*time.Millisecond {
		t.Fatalf("woke in %v without replay: faster than the client's first retransmit", took)
	}
	for _, e := range c.ScaleEvents(t, "http", "http") {
		if strings.Contains(e.Message, "replayed") {
			t.Fatalf("replay is off but the event says %q", e.Message)
		}
	}
	t.Logf("without replay the GET took %v", took)
}

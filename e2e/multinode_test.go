package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// The multi-node suite: three Nomad clients, each in a namespace of its own
// with its own Consul agent and plugin, on one switched subnet with a
// Consul and a Nomad server; test traffic comes from a fourth namespace.

const multiNodeIdle = 10 * time.Second

func TestMultiNode(t *testing.T) {
	t.Parallel()
	m := harness.NewMultiNode(t, harness.MultiNodeOptions{Nodes: 3})
	spread := harness.RepoRoot(t) + "/e2e/testdata/spread.nomad.hcl"

	t.Run("a storm to every node is served by each node's own replay", func(t *testing.T) {
		g := runSpread(t, m, spread, "storm", m.Nodes)
		g.waitAsleep(t, 90*time.Second)

		const clients = 80
		began := time.Now()
		results := harness.Storm(m.Client, g.addrs(), clients, 30*time.Second)
		var lat []time.Duration
		served := map[netip.AddrPort]int{}
		for _, r := range results {
			if r.Err != nil {
				t.Errorf("client to %s: %v", r.Target, r.Err)
				continue
			}
			served[r.Target]++
			lat = append(lat, r.Connect)
		}
		t.Logf("%d/%d served in %v; connect %s; per address %v", len(lat), clients, time.Since(began).Round(time.Millisecond), percentiles(lat), served)
		if len(lat) != clients {
			t.Fatalf("%d of %d clients were not served\n%s", clients-len(lat), clients, m.Diagnose(t))
		}
		awake := time.Now()
		if n := harness.CountScaleTo(m.ScaleEvents(t, g.job, "web"), int64(len(m.Nodes))); n != 1 {
			t.Fatalf("%d scale-ups for one storm, want 1\n%s", n, m.Diagnose(t))
		}
		time.Sleep(time.Second) // replays finish off the agents' loops
		for _, n := range m.Nodes {
			passed := n.Metric(t, `zeroscale_syn_replays_total{result="passed"}`)
			t.Logf("%s replayed %v SYNs", n.Name, passed)
			if passed == 0 {
				t.Errorf("%s replayed no SYN: its clients waited for their retransmits\n%s", n.Name, m.Diagnose(t))
			}
		}

		// The next sleep comes at idle_timeout, not after a retry the
		// wake's own deployment forced.
		g.waitAsleep(t, multiNodeIdle+30*time.Second)
		after := time.Since(awake)
		t.Logf("asleep again %v after the storm was served (idle_timeout %v)", after.Round(100*time.Millisecond), multiNodeIdle)
		for _, e := range m.ScaleEvents(t, g.job, "web") {
			if e.Error && strings.Contains(e.Message, "deployment") {
				t.Errorf("a scale-down was refused by a deployment: %s", e.Message)
			}
		}
		if after > multiNodeIdle+15*time.Second {
			t.Errorf("asleep %v after the wake: more than idle_timeout (%v) + 15 s", after, multiNodeIdle)
		}
	})
}

// spreadGroup is a running spread job: one instance per node.
type spreadGroup struct {
	m     *harness.MultiNode
	job   string
	port  int
	nodes []*harness.ClusterNode
}

// runSpread runs the spread job as job on nodes, on one static port, and
// waits until an instance is healthy on each.
func runSpread(t *testing.T, m *harness.MultiNode, file, job string, nodes []*harness.ClusterNode) *spreadGroup {
	t.Helper()
	port := harness.FreePorts(t, 1)[0]
	names := make([]string, len(nodes))
	for i, n := range nodes {
		names[i] = n.Name
	}
	list, _ := json.Marshal(names)
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	named := filepath.Join(t.TempDir(), job+".nomad.hcl")
	if err := os.WriteFile(named, []byte(strings.Replace(string(src), `job "spread"`, fmt.Sprintf("job %q", job), 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	m.Run(t, named, map[string]string{"nodes": string(list), "port": fmt.Sprint(port),
		"idle_timeout": multiNodeIdle.String()})
	m.WaitHealthyOn(t, job, nodes, 120*time.Second)
	return &spreadGroup{m: m, job: job, port: port, nodes: nodes}
}

// addrs are the group's addresses, one per node.
func (g *spreadGroup) addrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, n := range g.nodes {
		out = append(out, netip.AddrPortFrom(n.Addr, uint16(g.port)))
	}
	return out
}

// waitAsleep waits until the group's count is 0, nothing of it runs and
// Consul holds a placeholder at each of its addresses.
func (g *spreadGroup) waitAsleep(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := g.m.ScaleStatus(t, g.job, "web")
		held := g.m.Placeholders(t, g.job)
		all := st.Desired == 0 && st.Running == 0
		for _, a := range g.addrs() {
			all = all && slices.Contains(held, a)
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not asleep within %v (desired %d, running %d, placeholders %v)\n%s",
				g.job, timeout, st.Desired, st.Running, held, g.m.Diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// percentiles formats p50/p90/max of ds.
func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return fmt.Sprintf("p50 %v p90 %v max %v", at(0.5).Round(time.Millisecond), at(0.9).Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}

package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/nat"
)

// The multi-node suite: three Nomad clients, each in a namespace of its own
// with its own Consul agent and plugin, on one switched subnet with a
// Consul and a Nomad server; test traffic comes from a fourth namespace.

const multiNodeIdle = 10 * time.Second

func TestMultiNode(t *testing.T) {
	t.Parallel()
	m := harness.NewMultiNode(t, harness.MultiNodeOptions{Nodes: 3,
		PluginConfig: fmt.Sprintf("forward_grace = %q\n", anywhereGrace)})

	t.Run("a storm to every node is served by each node's own replay", func(t *testing.T) {
		g := m.RunSpread(t, "storm", m.Nodes, multiNodeIdle)
		g.WaitAsleep(t, 90*time.Second)

		const clients = 80
		began := time.Now()
		results := harness.Storm(m.Client, g.Addrs(), clients, 30*time.Second)
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
		if n := harness.CountScaleTo(m.ScaleEvents(t, g.Job, "web"), int64(len(m.Nodes))); n != 1 {
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
		g.WaitAsleep(t, multiNodeIdle+30*time.Second)
		after := time.Since(awake)
		t.Logf("asleep again %v after the storm was served (idle_timeout %v)", after.Round(100*time.Millisecond), multiNodeIdle)
		for _, e := range m.ScaleEvents(t, g.Job, "web") {
			if e.Error && strings.Contains(e.Message, "deployment") {
				t.Errorf("a scale-down was refused by a deployment: %s", e.Message)
			}
		}
		if after > multiNodeIdle+15*time.Second {
			t.Errorf("asleep %v after the wake: more than idle_timeout (%v) + 15 s", after, multiNodeIdle)
		}
	})

	t.Run("a group that wakes on another node is served through the node it slept on", func(t *testing.T) {
		nodes := m.Alive()[:2]
		m.Run(t, harness.TestdataJob(t, "dynamic", "anywhere"), map[string]string{
			"nodes": harness.NodeList(nodes), "idle_timeout": multiNodeIdle.String()})
		old := waitCatalogMoved(t, m.Consul.Health(), "anywhere", netip.AddrPort{}, 120*time.Second)
		var slept, other *harness.ClusterNode
		for _, n := range nodes {
			if n.Addr == old.Addr() {
				slept = n
			} else {
				other = n
			}
		}
		m.WaitAsleep(t, "anywhere", []netip.AddrPort{old}, 90*time.Second)
		// The node it slept on takes no new allocation: it wakes on the
		// other one.
		if out, err := m.CLI(t, "node", "eligibility", "-disable", nodeID(t, m, slept.Name)); err != nil {
			t.Fatalf("node eligibility: %v\n%s", err, out)
		}
		t.Cleanup(func() { _, _ = m.CLI(t, "node", "eligibility", "-enable", nodeID(t, m, slept.Name)) })

		results := harness.Storm(m.Client, []netip.AddrPort{old}, 1, 30*time.Second)
		if r := results[0]; r.Err != nil || !strings.Contains(r.Body, other.Name) {
			t.Fatalf("first request to %s (where it slept, on %s): %q %v, want it served by %s\n%s",
				old, slept.Name, r.Body, r.Err, other.Name, m.Diagnose(t))
		}
		woke := time.Now()
		t.Logf("first request to %s on %s answered by %s: connect %v", old, slept.Name, other.Name, results[0].Connect.Round(time.Millisecond))
		moved := waitCatalogMoved(t, m.Consul.Health(), "anywhere", old, 30*time.Second)
		if moved.Addr() != other.Addr {
			t.Fatalf("the catalog shows %s, want an instance on %s", moved, other.Name)
		}
		if r := harness.Storm(m.Client, []netip.AddrPort{moved}, 1, 10*time.Second)[0]; r.Err != nil {
			t.Fatalf("request to the new catalog address %s: %v", moved, r.Err)
		}
		keepAwake(t, m.Client.Dial, moved)

		// After forward_grace nothing is left on the node it slept on,
		// and its old address refuses at once.
		var gone error
		err := slept.Net.Do(func() error {
			table, err := nat.Open("zeroscale-" + filepath.Base(slept.PinPath))
			if err != nil {
				return err
			}
			defer table.Close()
			deadline := woke.Add(anywhereGrace + 15*time.Second)
			for {
				fwds, err := table.Forwards()
				if err != nil {
					return err
				}
				if _, ok := fwds[old]; !ok {
					return nil
				}
				if time.Now().After(deadline) {
					gone = fmt.Errorf("%s still forwards to %v after forward_grace", old, fwds[old].To)
					return nil
				}
				time.Sleep(500 * time.Millisecond)
			}
		})
		if err != nil || gone != nil {
			t.Fatalf("the forward on %s: %v %v", slept.Name, err, gone)
		}
		t.Logf("forward gone %v after the wake (forward_grace %v)", time.Since(woke).Round(time.Second), anywhereGrace)
		if err := refusedAt(m.Client.Dial, old); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the leader's node killed while a group is parking", func(t *testing.T) {
		leader := m.NodeNamed(t, m.Leader(t))
		var others []*harness.ClusterNode
		for _, n := range m.Alive() {
			if n != leader {
				others = append(others, n)
			}
		}
		g := m.RunSpread(t, "parking", others, multiNodeIdle)
		m.WaitRecord(t, g.Job, "web", 60*time.Second, "parking")
		leader.Kill()
		rec := m.WaitRecord(t, g.Job, "web", time.Second, "parking", "asleep", "awake")
		t.Logf("killed the leader %s; the record then said %s (%s)", leader.Name, rec.Phase, rec.Reason)

		// Another node leads, and the group sleeps, wakes and is served on
		// every node left.
		g.WaitAsleep(t, 90*time.Second)
		if now := m.Leader(t); now == "" || now == leader.Name {
			t.Errorf("leader after the kill: %q", now)
		}
		served := 0
		for _, r := range harness.Storm(m.Client, g.Addrs(), 4, 30*time.Second) {
			if r.Err != nil {
				t.Errorf("client to %s: %v", r.Target, r.Err)
				continue
			}
			served++
		}
		if served != 4 {
			t.Fatalf("%d of 4 clients served after the leader died\n%s", served, m.Diagnose(t))
		}
	})

	t.Run("the waking node killed mid-wake", func(t *testing.T) {
		alive := m.Alive()
		if len(alive) < 2 {
			t.Fatalf("%d nodes left, want 2", len(alive))
		}
		g := m.RunSpread(t, "midwake", alive[:2], multiNodeIdle)
		waker, other := g.Nodes[0], g.Nodes[1]
		g.WaitAsleep(t, 90*time.Second)
		began := time.Now()
		// A client of the waker alone starts the wake there.
		go harness.Storm(m.Client, g.Addrs()[:1], 1, 5*time.Second)
		rec := m.WaitRecord(t, g.Job, "web", 30*time.Second, "waking")
		waker.Kill()
		scaled := m.ScaleStatus(t, g.Job, "web").Desired > 0
		t.Logf("killed %s %v after its client's connect; record by %s; count already raised: %v",
			waker.Name, time.Since(began).Round(time.Millisecond), rec.By, scaled)

		// The other node's clients are served: by its own instance if the
		// Scale landed, after it takes the wake over if not.
		results := harness.Storm(m.Client, g.Addrs()[1:], 3, 60*time.Second)
		for _, r := range results {
			if r.Err != nil {
				t.Fatalf("client of %s: %v\n%s", other.Name, r.Err, m.Diagnose(t))
			}
		}
		t.Logf("%s's clients served; connect %s", other.Name, percentiles([]time.Duration{results[0].Connect, results[1].Connect, results[2].Connect}))
		if n := harness.CountScaleTo(m.ScaleEvents(t, g.Job, "web"), 2); n != 1 {
			t.Errorf("%d scale-ups, want 1\n%s", n, m.Diagnose(t))
		}
	})
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

// nodeID is the Nomad node ID of the node called name.
func nodeID(t *testing.T, m *harness.MultiNode, name string) string {
	t.Helper()
	nodes, _, err := m.API.Nodes().List(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Name == name {
			return n.ID
		}
	}
	t.Fatalf("no Nomad node %s", name)
	return ""
}

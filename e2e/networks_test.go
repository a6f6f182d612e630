package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// The network suite: the same three behaviours on every network a Nomad
// service can sit on, each on one cluster its sub-tests share. The client
// is the testnet namespace: a remote host as far as the node can tell.

// networkIdle is the groups' idle_timeout: short, but several times the
// checks' interval (1 s) and the traffic's (2 s).
const networkIdle = 10 * time.Second

// mappedPort is the port the docker and bridge examples' servers listen on
// inside their namespaces (the port's `to`).
const mappedPort = 8080

// network describes one network setup and the example that runs on it.
type network struct {
	cluster harness.ClusterOptions
	example string
	// job is also the group's and the service's name.
	job  string
	body string // what the server answers
	// addr is the address the service is registered at, on the node.
	addr func(c *harness.Cluster) netip.Addr
	vars map[string]string
	// netns is the path of the network namespace the allocation's server
	// listens in; nil for the host's.
	netns func(t *testing.T, c *harness.Cluster, allocID string) string
}

func TestNetworksDocker(t *testing.T) {
	t.Parallel()
	testNetwork(t, network{
		cluster: harness.ClusterOptions{Docker: true},
		example: "docker.nomad.hcl",
		job:     "docker",
		body:    "hello from a container that was asleep",
		addr:    func(c *harness.Cluster) netip.Addr { return c.Net.HostAddr },
		vars:    map[string]string{"image": harness.BusyboxImage},
		netns: func(t *testing.T, c *harness.Cluster, allocID string) string {
			for _, ctr := range c.Docker.Containers(t) {
				if strings.Contains(strings.Join(ctr.Names, " "), allocID) {
					settings, _ := c.Docker.Inspect(t, ctr.ID)["NetworkSettings"].(map[string]any)
					key, _ := settings["SandboxKey"].(string)
					return key
				}
			}
			t.Fatalf("no container of allocation %s", allocID)
			return ""
		},
	})
}

func TestNetworksBridge(t *testing.T) {
	t.Parallel()
	testNetwork(t, network{
		cluster: harness.ClusterOptions{CNI: true},
		example: "bridge.nomad.hcl",
		job:     "bridge",
		body:    "hello from a bridge-mode group that was asleep",
		addr:    func(c *harness.Cluster) netip.Addr { return c.Net.HostAddr },
		// Nomad names a bridge-mode group's namespace after the allocation.
		netns: func(t *testing.T, c *harness.Cluster, allocID string) string { return "/var/run/netns/" + allocID },
	})
}

func TestNetworksIPv6(t *testing.T) {
	t.Parallel()
	testNetwork(t, network{
		cluster: harness.ClusterOptions{IPv6HostNetwork: "v6"},
		example: "ipv6.nomad.hcl",
		job:     "ipv6",
		body:    "hello from an IPv6 service that was asleep",
		addr:    func(c *harness.Cluster) netip.Addr { return c.Net.HostAddr6 },
		// The other two wake on a listener; this one on passing checks.
		vars: map[string]string{"host_network": "v6", "ready": "healthy"},
	})
}

func testNetwork(t *testing.T, nw network) {
	c := harness.NewCluster(t, nw.cluster)
	addr := nw.addr(c)
	port := harness.FreePort(t, addr)
	vars := map[string]string{"node": c.Node, "port": fmt.Sprint(port), "idle_timeout": networkIdle.String()}
	for k, v := range nw.vars {
		vars[k] = v
	}
	c.Run(t, harness.Example(t, nw.example), vars)
	c.WaitHealthy(t, nw.job, 120*time.Second)
	url := harness.URLFor(addr, port)
	if code, body, err := c.HTTPGet(url, 10*time.Second); err != nil || code != 200 || !strings.Contains(body, nw.body) {
		t.Fatalf("GET %s from the client namespace: %d %q %v\n%s", url, code, body, err, c.Diagnose(t))
	}
	logWhereTrafficLands(t, c, nw, port)

	t.Run("TrafficEvery2sKeepsItAwake", func(t *testing.T) {
		ensureAwake(t, c, nw.job)
		keptAwakeBy(t, c, nw, url, 2*time.Second, 3*networkIdle)
	})
	t.Run("OnlyHealthChecksLetItSleep", func(t *testing.T) {
		ensureAwake(t, c, nw.job)
		began := time.Now()
		c.WaitDesired(t, nw.job, nw.job, 0, networkIdle+30*time.Second)
		c.WaitPlaceholder(t, nw.job, addr, port, 10*time.Second)
		t.Logf("asleep with a placeholder in Consul %v after the sub-test began (idle_timeout %v)",
			time.Since(began).Round(100*time.Millisecond), networkIdle)
	})
	t.Run("AConnectWakesItOnceAndTheFirstRequestIsAnswered", func(t *testing.T) {
		ensureAsleep(t, c, nw.job, addr, port)
		began := time.Now()
		// curl: one request on one connection, from the client namespace.
		out, err := inNS(t, c, 45*time.Second, "curl", "-sS", "-g", "-m", "30", "-o", "-",
			"-w", "\n%{http_code} connect=%{time_connect}s total=%{time_total}s", url)
		took := time.Since(began)
		ups := harness.CountScaleTo(harness.EventsSince(c.ScaleEvents(t, nw.job, nw.job), began), 1)
		if err != nil || !strings.Contains(out, nw.body) || !strings.Contains(out, "\n200 ") {
			logEvents(t, c, nw.job)
			t.Fatalf("the first request after %v (%d scale-ups): %v\n%s\n%s", took, ups, err, out, c.Diagnose(t))
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		t.Logf("the first request woke it and was answered in %v (curl: %s)", took.Round(time.Millisecond), lines[len(lines)-1])
		for _, e := range harness.EventsSince(c.ScaleEvents(t, nw.job, nw.job), began) {
			t.Logf("scaling event: %s", e.Message)
		}
		if ups != 1 {
			t.Fatalf("%d scale-ups for one connect, want 1", ups)
		}
	})
}

// keptAwakeBy sends one request every interval for span and asserts that
// each is answered and that the group never goes to sleep meanwhile.
func keptAwakeBy(t *testing.T, c *harness.Cluster, nw network, url string, interval, span time.Duration) {
	t.Helper()
	before := groupRecord(t, c, nw.job)
	began := time.Now()
	var failed, sleptAt []string
	requests, most := 0, int(span/interval)+1
	for ; requests < most && time.Since(began) < span; requests++ {
		sent := time.Now()
		code, body, err := c.HTTPGet(url, 5*time.Second)
		if err != nil || code != 200 || !strings.Contains(body, nw.body) {
			failed = append(failed, fmt.Sprintf("+%v: %d %v", sent.Sub(began).Round(time.Millisecond), code, err))
		}
		if st, _, err := c.API.Jobs().ScaleStatus(nw.job, nil); err == nil && st.TaskGroups[nw.job].Desired == 0 {
			sleptAt = append(sleptAt, fmt.Sprintf("+%v", time.Since(began).Round(time.Millisecond)))
		}
		time.Sleep(time.Until(sent.Add(interval)))
	}
	var sleeps []string
	for _, e := range harness.EventsSince(c.ScaleEvents(t, nw.job, nw.job), began) {
		if e.Count != nil && *e.Count == 0 {
			sleeps = append(sleeps, e.Message)
		}
	}
	// A parking attempt that a request undid is no scale-down, but it
	// closed the gate on a group in use: the plugin took it for idle.
	after := groupRecord(t, c, nw.job)
	parkings := after.Epoch - before.Epoch
	if len(failed) > 0 || len(sleptAt) > 0 || len(sleeps) > 0 || parkings > 0 {
		logEvents(t, c, nw.job)
		t.Fatalf("with a request every %v for %v: %d of %d requests failed %v; count 0 seen at %v; scale-downs: %q; "+
			"parking attempts: %d (the group's record now: %s, %q)",
			interval, span, len(failed), requests, failed, sleptAt, sleeps, parkings, after.Phase, after.Reason)
	}
	t.Logf("%d requests every %v for %v, all answered, no scale-down", requests, interval, span)
}

// ensureAwake scales the group back to 1 if it is asleep (as an operator,
// not through a wake) and waits until it is healthy.
func ensureAwake(t *testing.T, c *harness.Cluster, job string) {
	t.Helper()
	st, _, err := c.API.Jobs().ScaleStatus(job, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.TaskGroups[job].Desired == 0 {
		t.Logf("the group is asleep after the previous sub-test: scaling it to 1")
		c.Scale(t, job, job, 1, "e2e: awake for the next sub-test")
	}
	c.WaitHealthy(t, job, 60*time.Second)
}

// ensureAsleep scales the group to 0 as an operator would if it is not
// asleep already (so that a wake is tested even when sleeping is broken),
// and waits for the placeholder (the address is parked) and for the last
// instance to be gone.
func ensureAsleep(t *testing.T, c *harness.Cluster, job string, addr netip.Addr, port int) {
	t.Helper()
	st, _, err := c.API.Jobs().ScaleStatus(job, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.TaskGroups[job].Desired != 0 {
		t.Logf("the group is awake after the previous sub-test: scaling it to 0 as an operator would")
		c.Scale(t, job, job, 0, "e2e: asleep for the wake sub-test")
	}
	c.WaitDesired(t, job, job, 0, 60*time.Second)
	c.WaitPlaceholder(t, job, addr, port, 30*time.Second)
	// A wake while the last instance still stops would wait for its port.
	c.WaitNoneRunning(t, job, 30*time.Second)
}

// logWhereTrafficLands logs where the service's traffic ends up: the
// network namespace its server listens in, the TCP sockets there, and the
// flows to the port in conntrack (who connects from where, and where a DNAT
// sends it), which shows where the health checks come from.
func logWhereTrafficLands(t *testing.T, c *harness.Cluster, nw network, port int) {
	t.Helper()
	allocID := runningAlloc(t, c, nw.job)
	netns, serverPort := "", port
	if nw.netns != nil {
		netns, serverPort = nw.netns(t, c, allocID), mappedPort
	}
	// A few checks (1 s apart) run meanwhile.
	time.Sleep(2 * time.Second)
	args := []string{"ss", "-Htan", fmt.Sprintf("( sport = :%d or dport = :%d )", serverPort, serverPort)}
	if netns != "" {
		args = append([]string{"nsenter", "--net=" + netns}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	var sockets []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) >= 5 {
			peer := f[4]
			if ap, err := netip.ParseAddrPort(peer); err == nil {
				peer = ap.Addr().String() // one entry per peer, not per connection
			}
			if s := f[0] + " " + f[3] + " ↔ " + peer; !slices.Contains(sockets, s) {
				sockets = append(sockets, s)
			}
		}
	}
	t.Logf("allocation %s serves from the network namespace %q (empty: the host's); its TCP sockets on port %d: %s %v; "+
		"conntrack flows to port %d: %s", allocID, netns, serverPort, strings.Join(sockets, "; "), err, port,
		strings.Join(conntrackFlows(port), "; "))
}

// runningAlloc returns the ID of the job's running allocation. The server
// learns a client's allocation is running a moment after its service may
// already pass its checks in Consul.
func runningAlloc(t *testing.T, c *harness.Cluster, job string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		allocs, _, err := c.API.Jobs().Allocations(job, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range allocs {
			if a.ClientStatus == "running" {
				return a.ID
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no running allocation of %s\n%s", job, c.Diagnose(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// conntrackFlows summarises the kernel's tracked TCP flows to port as
// "src → dst (reply from rsrc to rdst)", one entry per distinct addresses.
func conntrackFlows(port int) []string {
	b, err := os.ReadFile("/proc/net/nf_conntrack")
	if err != nil {
		return []string{"no conntrack table: " + err.Error()}
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		var src, dst []string
		dport := ""
		for _, f := range strings.Fields(line) {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "src":
				src = append(src, v)
			case "dst":
				dst = append(dst, v)
			case "dport":
				if dport == "" {
					dport = v
				}
			}
		}
		if dport != fmt.Sprint(port) || len(src) < 2 || len(dst) < 2 {
			continue
		}
		flow := fmt.Sprintf("%s → %s (reply from %s to %s)", src[0], dst[0], src[1], dst[1])
		if !slices.Contains(out, flow) {
			out = append(out, flow)
		}
	}
	if len(out) == 0 {
		// IPv6 without ip6tables rules is not tracked at all.
		return []string{"none tracked"}
	}
	return out
}

// groupState is the part of the plugin's record of a group in Consul that
// the tests read.
type groupState struct {
	Phase  string `json:"phase"`
	Epoch  uint64 `json:"epoch"` // grows with every parking attempt
	Reason string `json:"reason"`
}

// groupRecord reads the plugin's record of the group job/job (zero before
// the plugin wrote one).
func groupRecord(t *testing.T, c *harness.Cluster, job string) groupState {
	t.Helper()
	pair, _, err := c.Consul.Client(t, "").KV().Get("zeroscale/groups/default/"+job+"/"+job, nil)
	if err != nil {
		t.Fatalf("read the group's record: %v", err)
	}
	var st groupState
	if pair != nil {
		if err := json.Unmarshal(pair.Value, &st); err != nil {
			t.Fatalf("the group's record %q: %v", pair.Value, err)
		}
	}
	return st
}

package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"
	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// MultiNode is a cluster as users run one: a Consul server and a Nomad
// server in the test's namespace, and nodes that are each a network
// namespace with its own Consul client agent, Nomad client and plugin, all
// on one switched subnet with a client namespace for traffic.
type MultiNode struct {
	LAN    *testnet.LAN
	Client *testnet.Net // where test traffic comes from
	Nodes  []*ClusterNode
	// ConsulAddr and NomadAddr are the servers' HTTP APIs.
	ConsulAddr string
	NomadAddr  string
	API        *napi.Client
	Consul     *capi.Client

	consulServer *process
	nomadServer  *process
	nomadRPC     string
	consulSerf   string
	pluginCfg    string
	ownCPU       bool
}

// ClusterNode is one Nomad client node: its namespace, address and agents.
type ClusterNode struct {
	Name    string
	Net     *testnet.Net // PeerAddr is the node's address
	Addr    netip.Addr
	PinPath string
	// MetricsPort is the plugin's /metrics port inside the node's
	// namespace, at 127.0.0.1.
	MetricsPort int

	consul  *process
	nomad   *process
	cpu     int // the CPU the node has alone; -1: all
	dir     string
	cfgPath string
	t       testing.TB
}

// MultiNodeOptions tunes NewMultiNode.
type MultiNodeOptions struct {
	Nodes int
	// PluginConfig is added to every node's plugin config block.
	PluginConfig string
	// OwnCPU runs node i's agents on CPU i (modulo the CPUs there are), as
	// if each node were its own machine: a wake on two nodes then does not
	// compete for the CPUs a wake on one has. (Tasks follow their cgroup's
	// cpuset: Nomad's own CPU partitioning cannot be split between clients
	// on cgroup v1.)
	OwnCPU bool
}

// NewMultiNode starts the servers and the nodes and waits until every node
// is ready with a healthy zeroscale driver whose gate runs.
func NewMultiNode(t testing.TB, opts MultiNodeOptions) *MultiNode {
	t.Helper()
	Binary(t, "nomad")
	Binary(t, "consul")
	BuildPlugin(t)
	lan := testnet.NewLAN(t, opts.Nodes+1)
	m := &MultiNode{LAN: lan, Client: lan.Members[opts.Nodes], pluginCfg: opts.PluginConfig, ownCPU: opts.OwnCPU}
	m.startConsulServer(t)
	m.startNomadServer(t)
	for i := range opts.Nodes {
		node := &ClusterNode{
			Name:        fmt.Sprintf("zs-node-%d", i+1),
			Net:         lan.Members[i],
			Addr:        lan.Members[i].PeerAddr,
			PinPath:     fmt.Sprintf("/sys/fs/bpf/zs-e2e-%d-%s-n%d", os.Getpid(), lan.Bridge, i+1),
			MetricsPort: 9464,
			cpu:         -1,
			dir:         t.TempDir(),
			t:           t,
		}
		if opts.OwnCPU {
			node.cpu = i % runtime.NumCPU()
		}
		m.Nodes = append(m.Nodes, node)
		m.startNode(t, node)
	}
	m.waitNodes(t, 120*time.Second)
	return m
}

func (m *MultiNode) startConsulServer(t testing.TB) {
	t.Helper()
	ports := FreePorts(t, 5)
	dir := t.TempDir()
	cfg := fmt.Sprintf(`
node_name      = "zs-consul-server"
bind_addr      = %q
advertise_addr = %q
client_addr    = "127.0.0.1"
log_level      = "INFO"
ports {
  http     = %d
  dns      = %d
  server   = %d
  serf_lan = %d
  serf_wan = %d
  grpc     = -1
  grpc_tls = -1
}
`, m.LAN.Addr, m.LAN.Addr, ports[0], ports[1], ports[2], ports[3], ports[4])
	path := filepath.Join(dir, "consul.hcl")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	m.ConsulAddr = fmt.Sprintf("127.0.0.1:%d", ports[0])
	m.consulSerf = fmt.Sprintf("%s:%d", m.LAN.Addr, ports[3])
	m.consulServer = startProcess(t, "consul server", cleanEnv(), Binary(t, "consul"), "agent", "-dev", "-config-file", path)
	t.Cleanup(func() { m.consulServer.stop(10 * time.Second) })
	client, err := capi.NewClient(&capi.Config{Address: m.ConsulAddr})
	if err != nil {
		t.Fatal(err)
	}
	m.Consul = client
	waitFor(t, "the Consul server's leadership", 60*time.Second, m.consulServer, func() bool {
		leader, err := client.Status().Leader()
		return err == nil && leader != ""
	})
}

func (m *MultiNode) startNomadServer(t testing.TB) {
	t.Helper()
	ports := FreePorts(t, 3)
	dir := t.TempDir()
	cfg := fmt.Sprintf(`
name      = "zs-nomad-server"
bind_addr = %q
data_dir  = %q
log_level = "INFO"
ports {
  http = %d
  rpc  = %d
  serf = %d
}
advertise {
  http = %q
  rpc  = %q
  serf = %q
}
server {
  enabled          = true
  bootstrap_expect = 1
}
client {
  enabled = false
}
consul {
  address = %q
}
`, m.LAN.Addr, filepath.Join(dir, "data"), ports[0], ports[1], ports[2], m.LAN.Addr, m.LAN.Addr, m.LAN.Addr, m.ConsulAddr)
	path := filepath.Join(dir, "nomad.hcl")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	m.NomadAddr = fmt.Sprintf("http://%s:%d", m.LAN.Addr, ports[0])
	m.nomadRPC = fmt.Sprintf("%s:%d", m.LAN.Addr, ports[1])
	// -dev keeps Raft in memory, as the single-node tests' dev agent
	// does: their wake times compare, not the disks' fsync.
	m.nomadServer = startProcess(t, "nomad server", cleanEnv(), Binary(t, "nomad"), "agent", "-dev", "-config", path)
	t.Cleanup(func() {
		m.stopAllJobs(60 * time.Second)
		m.nomadServer.stop(30 * time.Second)
	})
	api, err := napi.NewClient(&napi.Config{Address: m.NomadAddr})
	if err != nil {
		t.Fatal(err)
	}
	m.API = api
	waitFor(t, "the Nomad server's leadership", 60*time.Second, m.nomadServer, func() bool {
		leader, err := api.Status().Leader()
		return err == nil && leader != ""
	})
}

// startNode writes the node's configs and starts its Consul client agent
// and Nomad client (which starts the plugin) inside its namespace.
func (m *MultiNode) startNode(t testing.TB, n *ClusterNode) {
	t.Helper()
	consulDir := filepath.Join(n.dir, "consul")
	dataDir := filepath.Join(n.dir, "data")
	pluginDir := filepath.Join(n.dir, "plugins")
	for _, d := range []string{consulDir, dataDir, pluginDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{n.dir, filepath.Dir(n.dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	plugin := BuildPlugin(t)
	if err := os.Link(plugin, filepath.Join(pluginDir, "nomad-driver-zeroscale")); err != nil {
		copyFile(t, plugin, filepath.Join(pluginDir, "nomad-driver-zeroscale"))
	}
	// Ports are the defaults: every node has a namespace of its own.
	consulCfg := fmt.Sprintf(`
node_name      = %q
data_dir       = %q
bind_addr      = %q
advertise_addr = %q
client_addr    = "127.0.0.1"
retry_join     = [%q]
log_level      = "INFO"
ports {
  grpc = -1
}
`, n.Name, consulDir, n.Addr, n.Addr, m.consulSerf)
	consulCfgPath := filepath.Join(n.dir, "consul.hcl")
	if err := os.WriteFile(consulCfgPath, []byte(consulCfg), 0o600); err != nil {
		t.Fatal(err)
	}
	nomadCfg := fmt.Sprintf(`
name       = %q
bind_addr  = "0.0.0.0"
data_dir   = %q
plugin_dir = %q
log_level  = "DEBUG"
advertise {
  http = %q
  rpc  = %q
  serf = %q
}
consul {
  address = "127.0.0.1:8500"
}
client {
  enabled           = true
  servers           = [%q]
  network_interface = %q
  cgroup_parent     = %q
  gc_interval       = "1h"
  options = {
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}
plugin "raw_exec" {
  config {
    enabled = true
  }
}
plugin "nomad-driver-zeroscale" {
  config {
    bpf_pin_path    = %q
    interfaces      = [%q, "lo"]
    metrics_address = "127.0.0.1:%d"
    nomad {
      address = "http://127.0.0.1:4646"
    }
    consul {
      address   = "127.0.0.1:8500"
      kv_prefix = "zeroscale"
    }
%s
  }
}
`, n.Name, dataDir, pluginDir, n.Addr, n.Addr, n.Addr, m.nomadRPC, n.Net.PeerIf, cgroupParent(fmt.Sprintf("zs-e2e-%d-%s", os.Getpid(), n.Name)),
		n.PinPath, n.Net.PeerIf, n.MetricsPort, m.pluginCfg)
	n.cfgPath = filepath.Join(n.dir, "nomad.hcl")
	if err := os.WriteFile(n.cfgPath, []byte(nomadCfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// nsenter, not `ip netns exec`: that remounts /sys, and the Nomad
	// client would not find its cgroups.
	n.consul = startProcess(t, n.Name+" consul", cleanEnv(), "nsenter", n.onCPU("--net="+n.Net.Path(),
		Binary(t, "consul"), "agent", "-config-file", consulCfgPath)...)
	n.startNomad()
	t.Cleanup(func() {
		n.Kill()
		if dir := os.Getenv("ZS_E2E_LOGDIR"); dir != "" {
			// For a look at a run that passed, too.
			_ = os.WriteFile(filepath.Join(dir, n.Name+".log"), []byte(n.nomad.Output()), 0o644)
		}
		killUnder(n.dir)
		uninstall(plugin, n.PinPath)
		unmountUnder(n.dir)
	})
}

func (n *ClusterNode) startNomad() {
	n.nomad = startProcess(n.t, n.Name+" nomad", cleanEnv(), "nsenter", n.onCPU("--net="+n.Net.Path(),
		Binary(n.t, "nomad"), "agent", "-config", n.cfgPath)...)
}

// onCPU prefixes a command line run under nsenter with taskset when the
// node has a CPU of its own.
func (n *ClusterNode) onCPU(args ...string) []string {
	if n.cpu < 0 {
		return args
	}
	return append([]string{args[0], "taskset", "-c", strconv.Itoa(n.cpu)}, args[1:]...)
}

// Kill ends the node at once, as a power cut would: its Nomad client, the
// plugin, its Consul agent and the tasks it ran.
func (n *ClusterNode) Kill() {
	for _, p := range []*process{n.nomad, n.consul} {
		if p != nil && !p.exited() {
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
	killUnder(n.dir)
}

// Alive tells whether the node's agents still run.
func (n *ClusterNode) Alive() bool { return !n.nomad.exited() && !n.consul.exited() }

// PluginLog is the node's plugin lines.
func (n *ClusterNode) PluginLog() string {
	var lines []string
	for _, l := range strings.Split(n.nomad.Output(), "\n") {
		if strings.Contains(l, "client.driver_mgr.nomad-driver-zeroscale:") && !strings.Contains(l, "plugin address") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// Metric reads one series of the node's plugin metrics (0 when absent).
func (n *ClusterNode) Metric(t testing.TB, series string) float64 {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return n.Net.Dial(ctx, network, addr)
		},
	}}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", n.MetricsPort))
	if err != nil {
		t.Fatalf("metrics of %s: %v", n.Name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return metricValue(string(b), series)
}

// waitNodes waits until every node is ready with a healthy zeroscale
// driver whose gate runs.
func (m *MultiNode) waitNodes(t testing.TB, timeout time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d ready nodes with a healthy zeroscale driver and gate", len(m.Nodes)), timeout, m.nomadServer, func() bool {
		for _, n := range m.Nodes {
			if n.nomad.exited() {
				t.Fatalf("%s exited:\n%s", n.Name, Tail(n.nomad.Output(), 60))
			}
		}
		nodes, _, err := m.API.Nodes().List(nil)
		if err != nil {
			return false
		}
		ready := 0
		for _, stub := range nodes {
			if stub.Status != "ready" {
				continue
			}
			node, _, err := m.API.Nodes().Info(stub.ID, nil)
			if err != nil {
				return false
			}
			d, ok := node.Drivers["zeroscale"]
			if ok && d.Healthy && d.Attributes["driver.zeroscale.gate"] == "true" {
				ready++
			}
		}
		return ready == len(m.Nodes)
	})
}

// Run submits a job file with variables.
func (m *MultiNode) Run(t testing.TB, file string, vars map[string]string) {
	t.Helper()
	args := []string{"job", "run", "-detach"}
	for k, v := range vars {
		args = append(args, "-var", k+"="+v)
	}
	if out, err := m.CLI(t, append(args, file)...); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
}

// CLI runs the nomad CLI against the server.
func (m *MultiNode) CLI(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(Binary(t, "nomad"), args...)
	cmd.Env = cleanEnv("NOMAD_ADDR=" + m.NomadAddr)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// WaitHealthyOn waits until service has a passing Nomad-registered instance
// on each of the nodes.
func (m *MultiNode) WaitHealthyOn(t testing.TB, service string, nodes []*ClusterNode, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := m.Consul.Health().Service(service, "", true, nil)
		on := map[string]bool{}
		if err == nil {
			for _, e := range entries {
				if e.Service.Meta["external-source"] == "nomad" {
					on[e.Node.Node] = true
				}
			}
		}
		all := true
		for _, n := range nodes {
			all = all && on[n.Name]
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("service %s not healthy on every node within %s (healthy on %v)\n%s", service, timeout, on, m.Diagnose(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Placeholders lists the addresses Consul holds placeholders of service at.
func (m *MultiNode) Placeholders(t testing.TB, service string) []netip.AddrPort {
	t.Helper()
	entries, _, err := m.Consul.Health().Service(service, "zeroscale-asleep", false, nil)
	if err != nil {
		t.Fatalf("placeholders of %s: %v", service, err)
	}
	var out []netip.AddrPort
	for _, e := range entries {
		if a, err := netip.ParseAddr(e.Service.Address); err == nil {
			out = append(out, netip.AddrPortFrom(a, uint16(e.Service.Port)))
		}
	}
	return out
}

// Leader is the node whose plugin holds the scale-down lock ("" if none).
func (m *MultiNode) Leader(t testing.TB) string {
	t.Helper()
	kv, _, err := m.Consul.KV().Get("zeroscale/leader", nil)
	if err != nil {
		t.Fatalf("read the leader key: %v", err)
	}
	if kv == nil || kv.Session == "" {
		return ""
	}
	return string(kv.Value)
}

// NodeNamed returns the node called name.
func (m *MultiNode) NodeNamed(t testing.TB, name string) *ClusterNode {
	t.Helper()
	for _, n := range m.Nodes {
		if n.Name == name {
			return n
		}
	}
	t.Fatalf("no node %q", name)
	return nil
}

// ScaleStatus is the group's count as Nomad reports it.
func (m *MultiNode) ScaleStatus(t testing.TB, job, group string) *napi.TaskGroupScaleStatus {
	t.Helper()
	st, _, err := m.API.Jobs().ScaleStatus(job, nil)
	if err != nil {
		t.Fatalf("scale status of %s: %v", job, err)
	}
	tg := st.TaskGroups[group]
	return &tg
}

// ScaleEvents returns the group's scaling events, oldest first.
func (m *MultiNode) ScaleEvents(t testing.TB, job, group string) []napi.ScalingEvent {
	t.Helper()
	evs := m.ScaleStatus(t, job, group).Events
	out := make([]napi.ScalingEvent, len(evs))
	for i, e := range evs {
		out[len(evs)-1-i] = e
	}
	return out
}

// Diagnose describes the jobs, their allocations and each node's plugin.
func (m *MultiNode) Diagnose(t testing.TB) string {
	var b strings.Builder
	jobs, _, _ := m.API.Jobs().List(nil)
	for _, j := range jobs {
		out, _ := m.CLI(t, "job", "status", j.ID)
		b.WriteString(out)
		out, _ = m.CLI(t, "job", "scaling-events", "-verbose", j.ID)
		b.WriteString(out)
	}
	for _, n := range m.Nodes {
		fmt.Fprintf(&b, "\n--- plugin on %s (alive %v):\n%s\n", n.Name, n.Alive(), Tail(n.PluginLog(), 60))
	}
	return b.String()
}

// stopAllJobs deregisters every job and waits for the allocations on live
// nodes to stop.
func (m *MultiNode) stopAllJobs(timeout time.Duration) {
	if m.nomadServer.exited() {
		return
	}
	jobs, _, err := m.API.Jobs().List(nil)
	if err != nil {
		return
	}
	for _, j := range jobs {
		_, _, _ = m.API.Jobs().Deregister(j.ID, false, nil)
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		allocs, _, err := m.API.Allocations().List(nil)
		if err != nil {
			return
		}
		busy := 0
		for _, a := range allocs {
			if (a.ClientStatus == "running" || a.ClientStatus == "pending") && m.nodeAlive(a.NodeName) {
				busy++
			}
		}
		if busy == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (m *MultiNode) nodeAlive(name string) bool {
	for _, n := range m.Nodes {
		if n.Name == name {
			return n.Alive()
		}
	}
	return false
}

// ConnectResult is one client of a Storm.
type ConnectResult struct {
	Target  netip.AddrPort
	Connect time.Duration // until connect() returned
	Body    string        // the HTTP answer's body
	Err     error
}

// Storm opens n connections at once from the client namespace, spread over
// targets in turn, each sending an HTTP GET and reading the answer; every
// client gives up after timeout.
func Storm(client *testnet.Net, targets []netip.AddrPort, n int, timeout time.Duration) []ConnectResult {
	results := make([]ConnectResult, n)
	done := make(chan struct{})
	for i := range n {
		go func() {
			defer func() { done <- struct{}{} }()
			r := &results[i]
			r.Target = targets[i%len(targets)]
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			began := time.Now()
			conn, err := client.Dial(ctx, "tcp", r.Target.String())
			r.Connect = time.Since(began)
			if err != nil {
				r.Err = err
				return
			}
			defer conn.Close()
			_ = conn.SetDeadline(began.Add(timeout))
			if _, err := fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", r.Target); err != nil {
				r.Err = fmt.Errorf("send the request: %w", err)
				return
			}
			b, err := io.ReadAll(conn)
			if err != nil {
				r.Err = fmt.Errorf("read the answer: %w", err)
				return
			}
			head, body, _ := strings.Cut(string(b), "\r\n\r\n")
			if !strings.HasPrefix(head, "HTTP/1.0 200") && !strings.HasPrefix(head, "HTTP/1.1 200") {
				r.Err = fmt.Errorf("answer %q", strings.SplitN(head, "\r\n", 2)[0])
				return
			}
			r.Body = body
		}()
	}
	for range n {
		<-done
	}
	return results
}

// GroupRecord is the plugin's record of a group, as far as tests read it.
type GroupRecord struct {
	Phase  string `json:"phase"`
	By     string `json:"by"`
	Reason string `json:"reason"`
}

// WaitRecord waits, with blocking queries, until the record of
// job/group says one of phases, and returns it.
func (m *MultiNode) WaitRecord(t testing.TB, job, group string, timeout time.Duration, phases ...string) GroupRecord {
	t.Helper()
	key := "zeroscale/groups/default/" + job + "/" + group
	deadline := time.Now().Add(timeout)
	var index uint64
	var last GroupRecord
	for time.Now().Before(deadline) {
		pair, meta, err := m.Consul.KV().Get(key, &capi.QueryOptions{WaitIndex: index, WaitTime: time.Until(deadline)})
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		index = meta.LastIndex
		if pair == nil {
			continue
		}
		if err := json.Unmarshal(pair.Value, &last); err != nil {
			t.Fatalf("the record of %s/%s: %v", job, group, err)
		}
		if slices.Contains(phases, last.Phase) {
			return last
		}
	}
	t.Fatalf("the record of %s/%s did not say %v within %v (last: %+v)\n%s", job, group, phases, timeout, last, m.Diagnose(t))
	return last
}

// Alive lists the nodes still running.
func (m *MultiNode) Alive() []*ClusterNode {
	var out []*ClusterNode
	for _, n := range m.Nodes {
		if n.Alive() {
			out = append(out, n)
		}
	}
	return out
}

// Spread is a running job of e2e/testdata/policy.nomad.hcl: one instance
// per node, at one static port on each node's address.
type Spread struct {
	m     *MultiNode
	Job   string // also its service's name; its group is "web"
	Port  int
	Nodes []*ClusterNode
}

// RunSpread runs the spread job as job on nodes, on a free port, with an
// idle_timeout, and waits until an instance is healthy on each node.
func (m *MultiNode) RunSpread(t testing.TB, job string, nodes []*ClusterNode, idle time.Duration) *Spread {
	t.Helper()
	port := FreePorts(t, 1)[0]
	m.Run(t, TestdataJob(t, "policy", job), map[string]string{"nodes": NodeList(nodes), "port": strconv.Itoa(port),
		"idle_timeout": idle.String(), "max": strconv.Itoa(len(nodes))})
	m.WaitHealthyOn(t, job, nodes, 120*time.Second)
	return &Spread{m: m, Job: job, Port: port, Nodes: nodes}
}

// TestdataJob writes e2e/testdata/<name>.nomad.hcl under the job ID job (a
// job's ID is its label) and returns the file's path.
func TestdataJob(t testing.TB, name, job string) string {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(RepoRoot(t), "e2e", "testdata", name+".nomad.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	label := fmt.Sprintf("job %q", name)
	if !strings.Contains(string(src), label) {
		t.Fatalf("%s.nomad.hcl has no %s", name, label)
	}
	path := filepath.Join(t.TempDir(), job+".nomad.hcl")
	if err := os.WriteFile(path, []byte(strings.Replace(string(src), label, fmt.Sprintf("job %q", job), 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// NodeList is the nodes' names as an HCL list of strings.
func NodeList(nodes []*ClusterNode) string {
	names := make([]string, len(nodes))
	for i, n := range nodes {
		names[i] = n.Name
	}
	list, _ := json.Marshal(names)
	return string(list)
}

// Addrs are the group's addresses, one per node.
func (g *Spread) Addrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, n := range g.Nodes {
		out = append(out, netip.AddrPortFrom(n.Addr, uint16(g.Port)))
	}
	return out
}

// WaitAsleep waits until the group's count is 0, nothing of it runs and
// Consul holds a placeholder at each of its addresses.
func (g *Spread) WaitAsleep(t testing.TB, timeout time.Duration) {
	t.Helper()
	g.m.WaitAsleep(t, g.Job, g.Addrs(), timeout)
}

// WaitAsleep waits until the group "web" of job (whose service is named
// after the job) is at count 0 with nothing running, and Consul holds a
// placeholder at each of addrs.
func (m *MultiNode) WaitAsleep(t testing.TB, job string, addrs []netip.AddrPort, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := m.ScaleStatus(t, job, "web")
		held := m.Placeholders(t, job)
		all := st.Desired == 0 && st.Running == 0
		for _, a := range addrs {
			all = all && slices.Contains(held, a)
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not asleep within %v (desired %d, running %d, placeholders %v)\n%s",
				job, timeout, st.Desired, st.Running, held, m.Diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// cgroupParent names a Nomad client's own cgroup parent: a slice on cgroup
// v2, a path on v1 (clients sharing one would fight over its cpuset).
func cgroupParent(name string) string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return name + ".slice"
	}
	return "/" + name
}

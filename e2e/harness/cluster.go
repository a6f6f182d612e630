package harness

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// Cluster is one node as users run it: Consul, Nomad with the plugin, and a
// client namespace reaching the node over a veth pair.
type Cluster struct {
	Net    *testnet.Net
	Consul *Consul
	Nomad  *Nomad
	API    *napi.Client
	Node   string // Nomad node name, for the examples' pin
	// Docker is the cluster's own dockerd (ClusterOptions.Docker).
	Docker *Dockerd
}

// ClusterOptions tunes NewCluster.
type ClusterOptions struct {
	// PluginConfig is added to the plugin's config block.
	PluginConfig string
	Persistent   bool
	DataDir      string
	// Interfaces replaces the gated interfaces (default: the veth and lo).
	Interfaces []string
	// NomadProxy and ConsulProxy, when set, stand between the plugin and
	// the agents (the agents' own traffic is unaffected).
	NomadProxy  *FaultProxy
	ConsulProxy *FaultProxy
	// GateDown: the node is expected to report its gate as down.
	GateDown bool
	// Docker starts a dockerd of the cluster's own with BusyboxImage
	// imported, and points Nomad's docker driver at it.
	Docker bool
	// CNI sets the client's cni_path to Debian's CNI plugins and waits
	// until the node can place bridge-mode groups.
	CNI bool
	// IPv6HostNetwork, when set, makes the client namespace dual-stack and
	// declares a host_network of this name holding the veth's IPv6 /64.
	IPv6HostNetwork string
	// ACL, when set, runs Consul over HTTPS with ACLs and Nomad with ACLs,
	// and gives the plugin tokens of the policies it names.
	ACL *ACLOptions
}

// CNIPath is where Debian's containernetworking-plugins installs the CNI
// plugins.
const CNIPath = "/usr/lib/cni"

// bridgeCNIPlugins are the plugins Nomad's bridge mode runs; Nomad adds a
// constraint on each one's fingerprint to bridge-mode jobs.
var bridgeCNIPlugins = []string{"bridge", "firewall", "host-local", "loopback", "portmap"}

// nomadBridge is the bridge Nomad creates for bridge-mode allocations.
const nomadBridge = "nomad"

// NewCluster starts everything; the node's network interface is the veth's
// host end (IPv4 only unless IPv6HostNetwork is set), so static ports bind
// there.
func NewCluster(t testing.TB, opts ClusterOptions) *Cluster {
	t.Helper()
	var docker *Dockerd
	if opts.Docker {
		// Before Nomad: its cleanup (which stops the containers) runs
		// first.
		docker = StartDockerd(t)
		docker.ImportBusybox(t)
	}
	if opts.CNI {
		requireCNI(t)
	}
	var n *testnet.Net
	if opts.IPv6HostNetwork != "" {
		n = testnet.New(t)
	} else {
		n = testnet.NewIPv4(t)
	}
	var c *Consul
	var acl *NomadACL
	if opts.ACL != nil {
		c, acl = startACLConsul(t, *opts.ACL)
	} else {
		c = StartConsul(t, ConsulOptions{})
	}
	ifaces := opts.Interfaces
	if len(ifaces) == 0 {
		ifaces = []string{n.HostIf, "lo"}
	}
	quoted := make([]string, len(ifaces))
	for i, name := range ifaces {
		quoted[i] = strconv.Quote(name)
	}
	cfg := fmt.Sprintf("interfaces = [%s]\n", strings.Join(quoted, ", ")) + opts.PluginConfig
	if !strings.Contains(opts.PluginConfig, "metrics_address") {
		cfg += "metrics_address = \"\"\n"
	}
	nopts := NomadOptions{Consul: c, NetworkInterface: n.HostIf, PluginConfig: cfg,
		DataDir: opts.DataDir, Persistent: opts.Persistent, GateDown: opts.GateDown, ACL: acl}
	if docker != nil {
		nopts.DockerEndpoint = docker.Endpoint
	}
	if opts.CNI {
		nopts.CNIPath = CNIPath
	}
	if opts.IPv6HostNetwork != "" {
		prefix := netip.PrefixFrom(n.HostAddr6, 64).Masked()
		nopts.HostNetworks = append(nopts.HostNetworks, HostNetwork{Name: opts.IPv6HostNetwork, CIDR: prefix.String()})
	}
	if opts.NomadProxy != nil {
		nopts.PluginNomadAddr = "http://" + opts.NomadProxy.Addr
	}
	if opts.ConsulProxy != nil {
		opts.ConsulProxy.SetTarget(c.HTTPAddr)
		nopts.PluginConsulAddr = opts.ConsulProxy.Addr
	}
	nomad := StartNomad(t, nopts)
	if opts.NomadProxy != nil {
		opts.NomadProxy.SetTarget(strings.TrimPrefix(nomad.Addr, "http://"))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log:\n%s", Tail(nomad.PluginLog(), 150))
		}
	})
	cl := &Cluster{Net: n, Consul: c, Nomad: nomad, API: nomad.Client(t), Docker: docker}
	cl.Node = nomad.Node(t).Name
	if docker != nil {
		nomad.WaitDriverHealthy(t, "docker", 60*time.Second)
	}
	if opts.CNI {
		cl.waitBridgeNetworking(t, 120*time.Second)
	}
	return cl
}

// requireCNI fails the test when bridge-mode networking cannot work here,
// and deletes Nomad's bridge when the test ends if it was not there before.
func requireCNI(t testing.TB) {
	t.Helper()
	for _, p := range bridgeCNIPlugins {
		if _, err := os.Stat(filepath.Join(CNIPath, p)); err != nil {
			t.Fatalf("CNI plugin %s not found in %s: install Debian's containernetworking-plugins (make system-deps)", p, CNIPath)
		}
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Fatal("iptables not found: the CNI portmap and firewall plugins need it (install Debian's iptables: make system-deps)")
	}
	if _, err := os.Stat("/sys/module/bridge"); err != nil {
		t.Fatal("/sys/module/bridge is missing: Nomad's bridge networking needs the kernel's bridge support")
	}
	if _, err := net.InterfaceByName(nomadBridge); err != nil {
		// Registered before Nomad's cleanup, so it runs after the
		// allocations are gone.
		t.Cleanup(func() { _ = exec.Command("ip", "link", "del", nomadBridge).Run() })
	}
}

// waitBridgeNetworking waits until the node's fingerprint holds every CNI
// plugin Nomad's bridge mode needs (the scheduler places no bridge-mode
// group before: it constrains on them).
func (c *Cluster) waitBridgeNetworking(t testing.TB, timeout time.Duration) {
	t.Helper()
	began := time.Now()
	id := c.Nomad.Node(t).ID
	waitFor(t, "the node's CNI plugin fingerprint (bridge networking)", timeout, c.Nomad.process, func() bool {
		node, _, err := c.API.Nodes().Info(id, nil)
		if err != nil {
			return false
		}
		for _, p := range bridgeCNIPlugins {
			if node.Attributes["plugins.cni.version."+p] == "" {
				return false
			}
		}
		return true
	})
	t.Logf("bridge networking usable %v after the node was ready", time.Since(began).Round(100*time.Millisecond))
}

// Tail returns the last lines of s.
func Tail(s string, lines int) string {
	all := strings.Split(s, "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// Example is the path of an example job.
func Example(t testing.TB, name string) string {
	return filepath.Join(RepoRoot(t), "examples", "jobs", name)
}

// Run submits a job file with variables.
func (c *Cluster) Run(t testing.TB, file string, vars map[string]string) {
	t.Helper()
	args := []string{"job", "run", "-detach"}
	for k, v := range vars {
		args = append(args, "-var", k+"="+v)
	}
	args = append(args, file)
	if out, err := c.Nomad.CLI(t, args...); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
}

// RunExample runs an example on a free port of the node with a short
// idle_timeout and waits until its service is healthy. It returns the port.
func (c *Cluster) RunExample(t testing.TB, file, service, idle string) int {
	t.Helper()
	return c.RunExampleWith(t, file, service, idle, nil)
}

// RunExampleWith is RunExample with more job variables.
func (c *Cluster) RunExampleWith(t testing.TB, file, service, idle string, vars map[string]string) int {
	t.Helper()
	port := FreePort(t, c.Net.HostAddr)
	all := map[string]string{"node": c.Node, "port": strconv.Itoa(port), "idle_timeout": idle}
	for k, v := range vars {
		all[k] = v
	}
	c.Run(t, Example(t, file), all)
	c.WaitHealthy(t, service, 120*time.Second)
	return port
}

// WaitHealthy waits for a passing Nomad-registered instance of service.
func (c *Cluster) WaitHealthy(t testing.TB, service string, timeout time.Duration) {
	t.Helper()
	api := c.Consul.Client(t, c.Consul.Token)
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := api.Health().Service(service, "", true, nil)
		if err == nil {
			for _, e := range entries {
				if e.Service.Meta["external-source"] == "nomad" {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("service %s not healthy within %s\n%s", service, timeout, c.Diagnose(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// WaitDesired waits until the group's count is want (and, for 0, nothing
// runs any more).
func (c *Cluster) WaitDesired(t testing.TB, job, group string, want int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, _, err := c.API.Jobs().ScaleStatus(job, nil)
		if err == nil && st.TaskGroups[group].Desired == want && (want > 0 || st.TaskGroups[group].Running == 0) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s not at %d within %s\n%s", group, want, timeout, c.Diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// ScaleEvents returns the group's scaling events, oldest first.
func (c *Cluster) ScaleEvents(t testing.TB, job, group string) []napi.ScalingEvent {
	t.Helper()
	st, _, err := c.API.Jobs().ScaleStatus(job, nil)
	if err != nil {
		t.Fatalf("scale status: %v", err)
	}
	evs := st.TaskGroups[group].Events
	out := make([]napi.ScalingEvent, len(evs))
	for i, e := range evs {
		out[len(evs)-1-i] = e
	}
	return out
}

// WaitNoneRunning waits until no allocation of job runs any more. Nomad's
// scale status stops counting an allocation as running once it is told to
// stop, while its task may still be shutting down and holding its port.
func (c *Cluster) WaitNoneRunning(t testing.TB, job string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		allocs, _, err := c.API.Jobs().Allocations(job, false, nil)
		running := 0
		for _, a := range allocs {
			if a.ClientStatus == "running" || a.ClientStatus == "pending" {
				running++
			}
		}
		if err == nil && running == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d allocations of %s still running after %s (%v)\n%s", running, job, timeout, err, c.Diagnose(t))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// EventsSince keeps the events recorded at or after since.
func EventsSince(evs []napi.ScalingEvent, since time.Time) []napi.ScalingEvent {
	var out []napi.ScalingEvent
	for _, e := range evs {
		if int64(e.Time) >= since.UnixNano() {
			out = append(out, e)
		}
	}
	return out
}

// CountScaleTo counts successful scaling events that set the count to n.
func CountScaleTo(evs []napi.ScalingEvent, n int64) int {
	count := 0
	for _, e := range evs {
		if e.Count != nil && *e.Count == n && !e.Error {
			count++
		}
	}
	return count
}

// HTTPGet fetches url from inside the client namespace on a new connection.
func (c *Cluster) HTTPGet(url string, timeout time.Duration) (int, string, error) {
	client := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return c.Net.Dial(ctx, network, addr)
			},
		},
	}
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

// URL is http://<node address>:port/.
func (c *Cluster) URL(port int) string { return URLFor(c.Net.HostAddr, port) }

// URLFor is http://addr:port/, with IPv6 addresses in brackets.
func URLFor(addr netip.Addr, port int) string {
	return "http://" + netip.AddrPortFrom(addr, uint16(port)).String() + "/"
}

// Diagnose describes the jobs and their latest allocations.
func (c *Cluster) Diagnose(t testing.TB) string {
	var b strings.Builder
	jobs, _, _ := c.API.Jobs().List(nil)
	for _, j := range jobs {
		out, _ := c.Nomad.CLI(t, "job", "status", "-evals", j.ID)
		b.WriteString(out)
		out, _ = c.Nomad.CLI(t, "job", "scaling-events", "-verbose", j.ID)
		b.WriteString(out)
		allocs, _, _ := c.API.Jobs().Allocations(j.ID, true, nil)
		if len(allocs) > 0 {
			out, _ := c.Nomad.CLI(t, "alloc", "status", "-verbose", allocs[0].ID)
			b.WriteString(out)
			for task := range allocs[0].TaskStates {
				if logs, err := c.Nomad.CLI(t, "alloc", "logs", "-stderr", allocs[0].ID, task); err == nil {
					b.WriteString("stderr of " + task + ":\n" + Tail(logs, 30) + "\n")
				}
			}
		}
	}
	return b.String()
}

// FreePort returns a free TCP port on addr.
func FreePort(t testing.TB, addr netip.Addr) int {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Metric reads one series from a /metrics endpoint (0 when absent).
func Metric(t testing.TB, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return metricValue(string(b), series)
}

// metricValue finds one series in a Prometheus text exposition (0 when
// absent).
func metricValue(exposition, series string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` ([0-9.e+-]+)$`).FindStringSubmatch(exposition)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// Scale sets the group's count as an operator would, waiting out the job's
// running deployment (Nomad refuses scaling during one).
func (c *Cluster) Scale(t testing.TB, job, group string, count int, message string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, _, err := c.API.Jobs().Scale(job, group, &count, message, false, nil, nil)
		if err == nil {
			return
		}
		if !strings.Contains(err.Error(), "active deployment") || time.Now().After(deadline) {
			t.Fatalf("scale %s/%s to %d: %v", job, group, count, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// WaitPlaceholder waits until Consul holds the plugin's placeholder for
// service at addr:port (tagged zeroscale-asleep).
func (c *Cluster) WaitPlaceholder(t testing.TB, service string, addr netip.Addr, port int, timeout time.Duration) {
	t.Helper()
	api := c.Consul.Client(t, c.Consul.Token)
	deadline := time.Now().Add(timeout)
	for {
		entries, _, err := api.Health().Service(service, "zeroscale-asleep", false, nil)
		if err == nil {
			for _, e := range entries {
				if a, perr := netip.ParseAddr(e.Service.Address); perr == nil && a == addr && e.Service.Port == port {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no placeholder for %s at %s in Consul within %s (instances tagged zeroscale-asleep: %d, %v)\n%s",
				service, netip.AddrPortFrom(addr, uint16(port)), timeout, len(entries), err, c.Diagnose(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

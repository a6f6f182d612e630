package harness

import (
	"bytes"
	"cmp"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
)

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// BuildPlugin builds the plugin binary from this checkout once per test
// process and returns its path.
func BuildPlugin(t testing.TB) string {
	t.Helper()
	root := RepoRoot(t)
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "zeroscale-plugin-")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "nomad-driver-zeroscale")
		cmd := exec.Command("go", "build", "-o", buildPath, ".")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build plugin: %v", buildErr)
	}
	return buildPath
}

// NomadOptions tunes a test Nomad agent.
type NomadOptions struct {
	Consul *Consul
	// NetworkInterface is the client's network interface: static ports are
	// bound on its address (the veth host side in e2e tests).
	NetworkInterface string
	// PluginConfig is the body of the zeroscale plugin's config block;
	// Nomad/Consul addresses and a private pin path are added.
	PluginConfig string
	// Persistent runs a regular server+client agent on DataDir (a dev agent
	// keeps its server state in memory and would forget jobs on restart).
	Persistent bool
	DataDir    string
	// NoWait skips waiting for a healthy driver (for broken configs).
	NoWait bool
	// GateDown waits for a healthy driver that reports the gate as down
	// and says why (a test of a gate that cannot attach).
	GateDown bool
	// PluginNomadAddr and PluginConsulAddr replace the addresses the plugin
	// uses (a FaultProxy's, say); the agents themselves are unaffected.
	PluginNomadAddr  string
	PluginConsulAddr string
	// DockerEndpoint points Nomad's docker driver at a daemon (a
	// Dockerd's Endpoint); empty leaves the docker plugin unconfigured.
	DockerEndpoint string
	// CNIPath is the client's cni_path, for bridge-mode networking.
	CNIPath string
	// HostNetworks are the client's host_network blocks.
	HostNetworks []HostNetwork
	// ACL turns Nomad's ACLs on and gives the agent and the plugin their
	// tokens. (Over a Consul agent's TLS, Consul.Certs, the agent and the
	// plugin trust its CA in any case.)
	ACL *NomadACL
}

// NomadACL: the harness bootstraps Nomad's ACLs (Nomad.Token is then the
// management token, which its clients and CLI use) and creates the plugin's
// Nomad token.
type NomadACL struct {
	// AgentConsulToken is the Nomad agent's own Consul token.
	AgentConsulToken string
	// PluginConsulToken is the plugin's Consul token, given through
	// consul.token_file.
	PluginConsulToken string
	// PluginPolicy holds the rules of the plugin's Nomad token, given
	// through nomad.token_file.
	PluginPolicy string
}

// HostNetwork is a client host_network block: the addresses of the node
// within CIDR, by name, for ports that ask for it.
type HostNetwork struct {
	Name string
	CIDR string
}

// clientExtras is the HCL the options add to the client block and as
// plugin blocks.
func (opts NomadOptions) clientExtras() (client, plugins string) {
	var c, p strings.Builder
	if opts.CNIPath != "" {
		fmt.Fprintf(&c, "  cni_path = %q\n", opts.CNIPath)
	}
	for _, hn := range opts.HostNetworks {
		fmt.Fprintf(&c, "  host_network %q {\n    cidr = %q\n  }\n", hn.Name, hn.CIDR)
	}
	if opts.DockerEndpoint != "" {
		// No image garbage collection: the tests' image is imported
		// locally and could not be pulled again after a sleep.
		fmt.Fprintf(&p, `plugin "docker" {
  config {
    endpoint = %q
    gc {
      image = false
    }
  }
}
`, opts.DockerEndpoint)
	}
	return c.String(), p.String()
}

// Nomad is a running dev agent with the zeroscale plugin.
type Nomad struct {
	*process
	Addr    string // http://127.0.0.1:port
	PinPath string
	// Token is the management token when NomadOptions.ACL is set.
	Token           string
	pluginTokenFile string
	opts            NomadOptions
	cfgPath         string
	t               testing.TB
}

// StartNomad starts `nomad agent -dev` with the freshly built plugin and
// waits until the zeroscale driver is healthy on the node.
func StartNomad(t testing.TB, opts NomadOptions) *Nomad {
	t.Helper()
	Binary(t, "nomad") // fail early when deps are missing
	plugin := BuildPlugin(t)
	ports := FreePorts(t, 3)
	dir := t.TempDir()
	// Like a real data dir, traversable by the users tasks run as.
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pluginDir := filepath.Join(dir, "plugins")
	if err := os.MkdirAll(pluginDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(plugin, filepath.Join(pluginDir, "nomad-driver-zeroscale")); err != nil {
		copyFile(t, plugin, filepath.Join(pluginDir, "nomad-driver-zeroscale"))
	}
	dataDir := opts.DataDir
	if dataDir == "" {
		dataDir = filepath.Join(dir, "data")
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	n := &Nomad{
		Addr:    fmt.Sprintf("http://127.0.0.1:%d", ports[0]),
		PinPath: fmt.Sprintf("/sys/fs/bpf/zs-e2e-%d-%d", os.Getpid(), ports[0]),
		opts:    opts,
		t:       t,
	}
	iface := ""
	if opts.NetworkInterface != "" {
		iface = fmt.Sprintf("network_interface = %q", opts.NetworkInterface)
	}
	consulAddr := ""
	if opts.Consul != nil {
		consulAddr = opts.Consul.HTTPAddr
	}
	mode := ""
	if opts.Persistent {
		mode = `
server {
  enabled          = true
  bootstrap_expect = 1
}`
	}
	clientExtra, pluginsExtra := opts.clientExtras()
	aclExtra, consulExtra, pluginNomadExtra, pluginConsulExtra := n.aclConfig(t, dir)
	cfg := fmt.Sprintf(`%s
%sbind_addr  = "127.0.0.1"
data_dir   = %q
plugin_dir = %q
log_level  = "DEBUG"
ports {
  http = %d
  rpc  = %d
  serf = %d
}
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
consul {
  address = %q
%s}
client {
  enabled = true
  %s
  options = {
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
  gc_interval = "1h"
%s}
%splugin "raw_exec" {
  config {
    enabled = true
  }
}
plugin "nomad-driver-zeroscale" {
  config {
    bpf_pin_path = %q
    nomad {
      address = %q
%s    }
    consul {
      address   = %q
      kv_prefix = "zeroscale"
%s    }
%s
  }
}
`, mode, aclExtra, dataDir, pluginDir, ports[0], ports[1], ports[2], consulAddr, consulExtra, iface, clientExtra, pluginsExtra,
		n.PinPath, cmp.Or(opts.PluginNomadAddr, n.Addr), pluginNomadExtra, cmp.Or(opts.PluginConsulAddr, consulAddr),
		pluginConsulExtra, opts.PluginConfig)
	n.cfgPath = filepath.Join(dir, "nomad.hcl")
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	n.start()
	t.Cleanup(func() {
		// Agents leave tasks running when they stop; stop the jobs first.
		n.stopAllJobs(30 * time.Second)
		n.Stop()
		// Whatever still runs from this agent's directories (executors,
		// tasks) goes too, so no test leaves servers behind.
		killUnder(dir, dataDir)
		uninstall(plugin, n.PinPath)
		unmountUnder(dir)
		unmountUnder(dataDir)
	})
	if opts.ACL != nil {
		n.bootstrapACL(t)
	}
	if !opts.NoWait {
		n.WaitForDriver(90 * time.Second)
	}
	return n
}

func (n *Nomad) start() {
	args := []string{"agent", "-config", n.cfgPath}
	if !n.opts.Persistent {
		args = append(args, "-dev")
	}
	n.process = startProcess(n.t, "nomad", cleanEnv(), Binary(n.t, "nomad"), args...)
}

// Restart stops the agent (tasks keep running) and starts it again with the
// same data directory, so it recovers its tasks.
func (n *Nomad) Restart(t testing.TB) {
	t.Helper()
	if !n.opts.Persistent {
		t.Fatal("restart needs NomadOptions.Persistent (dev agents forget their jobs)")
	}
	n.process.stop(30 * time.Second)
	n.start()
	n.WaitForDriver(90 * time.Second)
}

// WhileDown stops the agent (and so the plugin), runs f, and starts the
// agent again: for faults that must be in place before the plugin starts.
// A dev agent forgets its jobs; use it before any job runs.
func (n *Nomad) WhileDown(t testing.TB, f func()) {
	t.Helper()
	n.process.stop(30 * time.Second)
	f()
	n.start()
	n.WaitForDriver(90 * time.Second)
}

// stopAllJobs stops every job and waits for their allocations to end.
func (n *Nomad) stopAllJobs(timeout time.Duration) {
	if n.process.exited() {
		return
	}
	c, err := napi.NewClient(&napi.Config{Address: n.Addr, SecretID: n.Token})
	if err != nil {
		return
	}
	jobs, _, err := c.Jobs().List(nil)
	if err != nil {
		return
	}
	for _, j := range jobs {
		// Not purged: a purged job's allocations vanish from the list at
		// once, before the client has stopped them.
		_, _, _ = c.Jobs().Deregister(j.ID, false, &napi.WriteOptions{Namespace: j.Namespace})
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		allocs, _, err := c.Allocations().List(nil)
		if err != nil {
			return
		}
		busy := 0
		for _, a := range allocs {
			// A bridge-mode allocation's namespace goes after its CNI
			// teardown: stopping the agent before that leaves iptables
			// chains behind.
			_, netnsErr := os.Stat("/var/run/netns/" + a.ID)
			if a.ClientStatus == "running" || a.ClientStatus == "pending" || netnsErr == nil {
				busy++
			}
		}
		if busy == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Stop stops the agent.
func (n *Nomad) Stop() { n.process.stop(30 * time.Second) }

// Client returns an API client (with the management token under ACLs).
func (n *Nomad) Client(t testing.TB) *napi.Client {
	t.Helper()
	c, err := napi.NewClient(&napi.Config{Address: n.Addr, SecretID: n.Token})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// WaitForDriver waits until the node is ready with a healthy zeroscale
// driver whose gate runs.
func (n *Nomad) WaitForDriver(timeout time.Duration) {
	n.t.Helper()
	c := n.Client(n.t)
	gate, what := "true", "a ready node with a healthy zeroscale driver and gate"
	if n.opts.GateDown {
		gate, what = "false", "a ready node with a healthy zeroscale driver whose gate is down with a reason"
	}
	waitFor(n.t, what, timeout, n.process, func() bool {
		nodes, _, err := c.Nodes().List(nil)
		if err != nil || len(nodes) == 0 || nodes[0].Status != "ready" {
			return false
		}
		// The list stub carries the driver attributes only partly; read
		// the node.
		node, _, err := c.Nodes().Info(nodes[0].ID, nil)
		if err != nil {
			return false
		}
		d, ok := node.Drivers["zeroscale"]
		return ok && d.Detected && d.Healthy && d.Attributes["driver.zeroscale.gate"] == gate &&
			(gate == "true" || d.Attributes["driver.zeroscale.gate.reason"] != "" &&
				!strings.Contains(d.Attributes["driver.zeroscale.gate.reason"], "waiting"))
	})
}

// WaitDriverHealthy waits until the node reports driver as detected and
// healthy.
func (n *Nomad) WaitDriverHealthy(t testing.TB, driver string, timeout time.Duration) {
	t.Helper()
	c := n.Client(t)
	waitFor(t, "a healthy "+driver+" driver on the node", timeout, n.process, func() bool {
		nodes, _, err := c.Nodes().List(nil)
		if err != nil || len(nodes) == 0 {
			return false
		}
		node, _, err := c.Nodes().Info(nodes[0].ID, nil)
		if err != nil {
			return false
		}
		d := node.Drivers[driver]
		return d != nil && d.Detected && d.Healthy
	})
}

// Node returns the node's full record.
func (n *Nomad) Node(t testing.TB) *napi.Node {
	t.Helper()
	c := n.Client(t)
	nodes, _, err := c.Nodes().List(nil)
	if err != nil || len(nodes) == 0 {
		t.Fatalf("list nodes: %v", err)
	}
	node, _, err := c.Nodes().Info(nodes[0].ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	return node
}

// CLI runs the nomad CLI against this agent.
func (n *Nomad) CLI(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(Binary(t, "nomad"), args...)
	cmd.Env = cleanEnv("NOMAD_ADDR="+n.Addr, "NOMAD_TOKEN="+n.Token)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// PluginLog returns the plugin's lines from the agent's output.
func (n *Nomad) PluginLog() string {
	var lines []string
	for _, l := range strings.Split(n.Output(), "\n") {
		if strings.Contains(l, "nomad-driver-zeroscale") || strings.Contains(l, "zeroscale") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// Processes lists the pids whose argument list matches.
func Processes(match func(args []string) bool) []int {
	var out []int
	paths, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil || len(b) == 0 {
			continue
		}
		if match(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")) {
			if pid, err := strconv.Atoi(strings.Split(path, "/")[2]); err == nil {
				out = append(out, pid)
			}
		}
	}
	return out
}

// killUnder kills processes whose command line names a path under dirs,
// with their process groups (nginx's workers name no path).
// holdingFilesUnder lists processes with an open file below one of dirs.
func holdingFilesUnder(dirs ...string) []int {
	var out []int
	fdDirs, _ := filepath.Glob("/proc/[0-9]*/fd")
	for _, fdDir := range fdDirs {
		pid, err := strconv.Atoi(strings.Split(fdDir, "/")[2])
		if err != nil || pid == os.Getpid() {
			continue
		}
		fds, _ := os.ReadDir(fdDir)
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err == nil && slices.ContainsFunc(dirs, func(d string) bool { return strings.HasPrefix(target, d+"/") }) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

func killUnder(dirs ...string) {
	pids := Processes(func(args []string) bool {
		cmd := strings.Join(args, " ")
		for _, d := range dirs {
			if strings.Contains(cmd, d+"/") {
				return true
			}
		}
		return false
	})
	// Helpers like logmon name no directory on their command line but hold
	// the allocation's log files open.
	pids = append(pids, holdingFilesUnder(dirs...)...)
	for _, pid := range pids {
		if pid == os.Getpid() {
			continue
		}
		if pgid, err := syscall.Getpgid(pid); err == nil && pgid != syscall.Getpgrp() {
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// unmountUnder lazily unmounts what Nomad left mounted under dir (secrets
// tmpfs of allocations not yet collected), so the directory can be removed.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return
	}
	var targets []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			targets = append(targets, f[1])
		}
	}
	for i := len(targets) - 1; i >= 0; i-- {
		_ = syscall.Unmount(targets[i], syscall.MNT_DETACH)
	}
}

func uninstall(plugin, pinPath string) {
	_ = exec.Command(plugin, "uninstall", pinPath).Run()
}

// PluginPID is the pid of the plugin process this Nomad agent runs (0:
// none runs).
func (n *Nomad) PluginPID() int {
	for _, pid := range Processes(func(args []string) bool {
		return len(args) == 1 && strings.HasSuffix(args[0], "/plugins/nomad-driver-zeroscale")
	}) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// The parent's pid is the second field after the command's ")".
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(n.cmd.Process.Pid) {
			return pid
		}
	}
	return 0
}

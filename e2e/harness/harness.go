// Package harness starts real Consul and Nomad dev agents (built into .bin/
// by `make deps`) on free ports for tests, and tears them down afterwards.
package harness

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RepoRoot finds the module root from the working directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("cannot find the module root (go.mod)")
		}
		dir = parent
	}
}

// Binary returns the path of a dependency built by `make deps`.
func Binary(t testing.TB, name string) string {
	t.Helper()
	path := filepath.Join(RepoRoot(t), ".bin", name)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s not found at %s: run `make deps` (make test does it)", name, path)
	}
	return path
}

var (
	portMu     sync.Mutex
	portsGiven = map[int]bool{} // never handed out twice in one test binary
)

// FreePorts reserves n distinct free TCP ports on 127.0.0.1 (also free for
// UDP, for DNS and serf). They are picked below the kernel's ephemeral range:
// a port from that range, free when picked, could be taken as the local port
// of any outgoing connection before the agent binds it (a Consul agent then
// failed to start with "address already in use"); and below Nomad's dynamic
// ports (20000 and up), which it hands to allocations without asking.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	lo, hi := 10000, min(ephemeralStart(), 20000)-1
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 100000 {
			t.Fatalf("no %d free ports between %d and %d", n, lo, hi)
		}
		port := lo + rand.IntN(hi-lo+1)
		if portsGiven[port] || !portFree(port) {
			continue
		}
		portsGiven[port] = true
		ports = append(ports, port)
	}
	return ports
}

// ephemeralStart is the first port of the kernel's ephemeral range.
func ephemeralStart() int {
	if raw, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(raw)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 11000 {
				return v
			}
		}
	}
	return 32768
}

// portFree tells whether port can be bound on 127.0.0.1 for TCP and UDP.
func portFree(port int) bool {
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return false
	}
	defer l.Close()
	u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return false
	}
	u.Close()
	return true
}

// process is a started agent whose output is kept for failure reports.
type process struct {
	name   string
	cmd    *exec.Cmd
	output *syncBuffer
	done   chan struct{}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func startProcess(t testing.TB, name string, env []string, bin string, args ...string) *process {
	t.Helper()
	p := &process{name: name, output: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = env
	p.cmd.Stdout = p.output
	p.cmd.Stderr = p.output
	// Own process group, so stopping the agent also stops what it started.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	return p
}

// stop sends SIGINT (agents leave gracefully), then SIGKILL.
func (p *process) stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Output returns what the process printed so far.
func (p *process) Output() string { return p.output.String() }

// cleanEnv is the environment for agents: without variables that make them
// misbehave here (AWS_CA_BUNDLE breaks Nomad's env_aws fingerprinter) or
// point them at other agents.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name := kv
		if i := bytes.IndexByte([]byte(kv), '='); i >= 0 {
			name = kv[:i]
		}
		switch name {
		case "AWS_CA_BUNDLE", "NOMAD_ADDR", "NOMAD_TOKEN", "CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN",
			"VAULT_ADDR", "VAULT_TOKEN":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

func waitFor(t testing.TB, what string, timeout time.Duration, p *process, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if p != nil && p.exited() {
			t.Fatalf("%s exited while waiting for %s:\n%s", p.name, what, p.Output())
		}
		if time.Now().After(deadline) {
			out := ""
			if p != nil {
				out = p.Output()
			}
			t.Fatalf("timed out after %s waiting for %s:\n%s", timeout, what, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

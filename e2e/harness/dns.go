package harness

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// UDP services for the tests of gated UDP: dnsmasq (Debian's dnsmasq-base)
// answering one name on TCP and UDP at once, or any command binding only
// UDP, and dig (dnsutils) in the client namespace.

// DNSName is a name the DNS job's dnsmasq answers, with DNSAnswer.
const (
	DNSName   = "a.zs.test"
	DNSAnswer = "10.9.8.7"
)

// Dnsmasq is Debian's dnsmasq (dnsmasq-base).
const Dnsmasq = "/usr/sbin/dnsmasq"

// UDPJob describes a job of one group that serves on one static port; job,
// group and service are all named Name.
type UDPJob struct {
	Name string
	Addr netip.Addr // the node's address the service is registered at
	Port int
	// HostNetwork is the port's host_network ("" for Nomad's default).
	HostNetwork string
	Idle        string // idle_timeout
	// Protocols is the policy's protocols list; nil leaves the field out
	// (the default, TCP only).
	Protocols []string
	// Command and Args run as the task, under the zeroscale driver; empty
	// Command runs DnsmasqArgs.
	Command string
	Args    []string
	// TCPCheck gives the service a Consul TCP check every second.
	TCPCheck bool
}

// DnsmasqArgs runs dnsmasq in the foreground as the task's user, bound to
// the service's address and port alone (UDP and TCP), answering DNSName and
// anything else under its domain with DNSAnswer and nothing more.
func DnsmasqArgs() []string {
	return []string{"--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--pid-file=",
		"--no-resolv", "--no-hosts", "--log-facility=-",
		"--address=/zs.test/" + DNSAnswer, "--port=${NOMAD_PORT_dns}", "--listen-address=${NOMAD_IP_dns}",
		"--bind-interfaces"}
}

// hclList renders strings as an HCL list of quoted strings.
func hclList(items []string) string {
	quoted := make([]string, len(items))
	for i, s := range items {
		quoted[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(quoted, ", ") + "]"
}

// HCL is the job's specification, pinned to node.
func (j UDPJob) HCL(node string) string {
	command, args := j.Command, j.Args
	if command == "" {
		command, args = Dnsmasq, DnsmasqArgs()
	}
	hostNetwork := ""
	if j.HostNetwork != "" {
		hostNetwork = fmt.Sprintf("host_network = %q", j.HostNetwork)
	}
	protocols := ""
	if j.Protocols != nil {
		protocols = "protocols = " + hclList(j.Protocols)
	}
	check := ""
	if j.TCPCheck {
		check = `check {
        type     = "tcp"
        interval = "1s"
        timeout  = "1s"
      }`
	}
	return fmt.Sprintf(`
job %[1]q {
  datacenters = ["*"]
  constraint {
    attribute = "${node.unique.name}"
    value     = %[2]q
  }
  group %[1]q {
    count = 1
    network {
      port "dns" {
        static = %[3]d
        %[4]s
      }
    }
    service {
      name = %[1]q
      port = "dns"
      %[5]s
    }
    update {
      min_healthy_time = "1s"
    }
    scaling {
      enabled = true
      min     = 0
      max     = 1
      policy {
        zeroscale {
          idle_timeout = %[6]q
          wake_count   = 1
          wake_timeout = "2m"
          ready        = "listen"
          %[7]s
        }
      }
    }
    task "server" {
      driver = "zeroscale"
      config {
        command = %[8]q
        args    = %[9]s
      }
      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
`, j.Name, node, j.Port, hostNetwork, check, j.Idle, protocols, command, hclList(args))
}

// RunUDPJob registers the job and waits until its service is healthy in
// Consul.
func (c *Cluster) RunUDPJob(t testing.TB, j UDPJob) {
	t.Helper()
	job, err := c.API.Jobs().ParseHCL(j.HCL(c.Node), true)
	if err != nil {
		t.Fatalf("parse the job %s: %v\n%s", j.Name, err, j.HCL(c.Node))
	}
	if _, _, err := c.API.Jobs().Register(job, nil); err != nil {
		t.Fatalf("register the job %s: %v", j.Name, err)
	}
	c.WaitHealthy(t, j.Name, 120*time.Second)
}

// FreeTCPUDPPort returns a port free for both TCP and UDP on addr.
func FreeTCPUDPPort(t testing.TB, addr netip.Addr) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", netip.AddrPortFrom(addr, uint16(port)).String())
		ln.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatalf("no port free for TCP and UDP on %s", addr)
	return 0
}

// Dig runs dig from inside the client namespace (through nsenter, not `ip
// netns exec`, which remounts /sys) against addr:port, with the options
// given (as "+tries=1"), for DNSName; it returns dig's output, how long dig
// ran, and its error. The whole command is bounded by timeout.
func (c *Cluster) Dig(addr netip.Addr, port int, timeout time.Duration, opts ...string) (string, time.Duration, error) {
	if _, err := exec.LookPath("dig"); err != nil {
		return "", 0, fmt.Errorf("dig not found: install Debian's dnsutils (make system-deps)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	args := append([]string{"--net=" + c.Net.Path(), "dig", "-p", strconv.Itoa(port), "@" + addr.String()}, opts...)
	args = append(args, DNSName, "A")
	began := time.Now()
	out, err := exec.CommandContext(ctx, "nsenter", args...).CombinedOutput()
	return string(out), time.Since(began), err
}

// DigShort is Dig with +short: nil error only when the one answer is
// DNSAnswer. dig's notes of tries that timed out (";;" lines, with
// +tries above 1) are left out of the answer and returned.
func (c *Cluster) DigShort(addr netip.Addr, port int, timeout time.Duration, opts ...string) (time.Duration, []string, error) {
	out, took, err := c.Dig(addr, port, timeout, append([]string{"+short"}, opts...)...)
	if err != nil {
		return took, nil, fmt.Errorf("dig %v: %v: %s", opts, err, strings.TrimSpace(out))
	}
	var answers, notes []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(line, ";;") {
			notes = append(notes, line)
		} else {
			answers = append(answers, line)
		}
	}
	if len(answers) != 1 || answers[0] != DNSAnswer {
		return took, notes, fmt.Errorf("dig %v answered %q, want %s", opts, out, DNSAnswer)
	}
	return took, notes, nil
}

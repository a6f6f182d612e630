package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	napi "github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// Gated UDP: a DNS server (dnsmasq, on TCP and UDP at one port) whose group
// sleeps and wakes on a dig from the client namespace, and a UDP-only
// server whose policy forgot to gate UDP.

// udpIdle is the DNS groups' idle_timeout: short, but several times the
// TCP check's interval (1 s) and the queries' (2 s).
const udpIdle = 8 * time.Second

// bothProtocols gates the DNS port's TCP and UDP.
var bothProtocols = []string{"tcp", "udp"}

// udpCluster is a node whose plugin serves /metrics at the address it
// returns, with more plugin config.
func udpCluster(t *testing.T, opts harness.ClusterOptions) (*harness.Cluster, string) {
	t.Helper()
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePorts(t, 1)[0])
	opts.PluginConfig += fmt.Sprintf("metrics_address = %q\n", metrics)
	return harness.NewCluster(t, opts), metrics
}

// runDNS runs dnsmasq as the group `job` on a free port of addr, gating
// TCP and UDP, with a TCP check every second, and checks that it answers
// over both. It returns the port.
func runDNS(t *testing.T, c *harness.Cluster, job string, addr netip.Addr, hostNetwork string) int {
	t.Helper()
	port := harness.FreeTCPUDPPort(t, addr)
	c.RunUDPJob(t, harness.UDPJob{Name: job, Addr: addr, Port: port, HostNetwork: hostNetwork, Idle: udpIdle.String(),
		Protocols: bothProtocols, TCPCheck: true})
	for _, proto := range []string{"+notcp", "+tcp"} {
		if _, _, err := c.DigShort(addr, port, 15*time.Second, proto, "+tries=3", "+timeout=2"); err != nil {
			t.Fatalf("the awake DNS server: %v\n%s", err, c.Diagnose(t))
		}
	}
	return port
}

// replaysPassed sums every replay counter of the plugin's /metrics (SYN and
// datagram replays alike, whatever labels besides result they carry) with
// result="passed", and lists the series it summed.
func replaysPassed(t *testing.T, metrics string) (float64, []string) {
	t.Helper()
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	re := regexp.MustCompile(`(?m)^(zeroscale_[a-z_]*replays_total\{[^}]*result="passed"[^}]*\}) ([0-9.e+-]+)$`)
	var sum float64
	var series []string
	for _, m := range re.FindAllStringSubmatch(string(b), -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		sum += v
		series = append(series, m[1]+" "+m[2])
	}
	return sum, series
}

// digWakes sends one query from the client namespace to the sleeping DNS
// server, with dig's options (its only try: "+tries=1"), and asserts that
// it is answered and that the wake made exactly one scale-up to wake_count
// (1). It returns how long dig took and its notes of tries that timed out.
func digWakes(t *testing.T, c *harness.Cluster, job string, addr netip.Addr, port int, opts ...string) (time.Duration, []string) {
	t.Helper()
	began := time.Now()
	took, notes, err := c.DigShort(addr, port, 40*time.Second, opts...)
	evs := harness.EventsSince(c.ScaleEvents(t, job, job), began)
	ups := harness.CountScaleTo(evs, 1)
	if err != nil {
		logEvents(t, c, job)
		t.Fatalf("the query that wakes, after %v (%d scale-ups): %v\n%s", took, ups, err, c.Diagnose(t))
	}
	t.Logf("dig %v woke it and was answered %s in %v %q", opts, harness.DNSAnswer, took.Round(time.Millisecond), notes)
	for _, e := range evs {
		t.Logf("scaling event: %s", e.Message)
	}
	if ups != 1 {
		t.Fatalf("%d scale-ups for one wake, want 1", ups)
	}
	return took, notes
}

// waitAsleepByItself waits for the group to go to sleep on its own (no
// operator scale), its placeholder registered and its last instance gone.
func waitAsleepByItself(t *testing.T, c *harness.Cluster, job string, addr netip.Addr, port int) {
	t.Helper()
	began := time.Now()
	c.WaitDesired(t, job, job, 0, udpIdle+45*time.Second)
	c.WaitPlaceholder(t, job, addr, port, 30*time.Second)
	c.WaitNoneRunning(t, job, 30*time.Second)
	t.Logf("asleep with a placeholder %v after waiting began (idle_timeout %v)", time.Since(began).Round(100*time.Millisecond), udpIdle)
}

func TestUDPDNSSleepsAndWakes(t *testing.T) {
	t.Parallel()
	c, metrics := udpCluster(t, harness.ClusterOptions{})
	const job = "dns"
	addr := c.Net.HostAddr
	port := runDNS(t, c, job, addr, "")

	t.Run("ADigEvery2sKeepsItAwake", func(t *testing.T) {
		ensureAwake(t, c, job)
		digKeepsAwake(t, c, job, addr, port, 2*time.Second, 3*udpIdle)
	})
	t.Run("WithoutQueriesItSleeps", func(t *testing.T) {
		ensureAwake(t, c, job)
		waitAsleepByItself(t, c, job, addr, port)
	})
	t.Run("ADigWakesItOnceAndItsOnlyQueryIsAnswered", func(t *testing.T) {
		ensureAsleep(t, c, job, addr, port)
		before, _ := replaysPassed(t, metrics)
		digWakes(t, c, job, addr, port, "+tries=1", "+timeout=20")
		// Replays are counted off the agent's loop, a moment later.
		deadline := time.Now().Add(5 * time.Second)
		for {
			after, series := replaysPassed(t, metrics)
			if after > before {
				t.Logf("replays passed: %v → %v (%s)", before, after, strings.Join(series, "; "))
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no replay counted as passed after the query was answered (before %v, now %v: %s)",
					before, after, strings.Join(series, "; "))
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	t.Run("AfterItSleepsAgainATCPDigWakesIt", func(t *testing.T) {
		ensureAwake(t, c, job)
		waitAsleepByItself(t, c, job, addr, port)
		digWakes(t, c, job, addr, port, "+tcp", "+tries=1", "+timeout=20")
	})
}

// digKeepsAwake sends one query every interval for span and asserts that
// each is answered and that the group never sleeps, nor tries to, meanwhile.
func digKeepsAwake(t *testing.T, c *harness.Cluster, job string, addr netip.Addr, port int, interval, span time.Duration) {
	t.Helper()
	requireGated(t, c, job)
	before := groupRecord(t, c, job)
	began := time.Now()
	var failed, sleptAt []string
	queries, most := 0, int(span/interval)+1
	for ; queries < most && time.Since(began) < span; queries++ {
		sent := time.Now()
		if _, _, err := c.DigShort(addr, port, 10*time.Second, "+tries=1", "+timeout=3"); err != nil {
			failed = append(failed, fmt.Sprintf("+%v: %v", sent.Sub(began).Round(time.Millisecond), err))
		}
		if st, _, err := c.API.Jobs().ScaleStatus(job, nil); err == nil && st.TaskGroups[job].Desired == 0 {
			sleptAt = append(sleptAt, fmt.Sprintf("+%v", time.Since(began).Round(time.Millisecond)))
		}
		time.Sleep(time.Until(sent.Add(interval)))
	}
	var sleeps []string
	for _, e := range harness.EventsSince(c.ScaleEvents(t, job, job), began) {
		if e.Count != nil && *e.Count == 0 {
			sleeps = append(sleeps, e.Message)
		}
	}
	// A parking attempt that a query undid is no scale-down, but the plugin
	// took a group in use for idle: its queries were not activity.
	after := groupRecord(t, c, job)
	parkings := after.Epoch - before.Epoch
	if len(failed) > 0 || len(sleptAt) > 0 || len(sleeps) > 0 || parkings > 0 {
		logEvents(t, c, job)
		t.Fatalf("with a UDP query every %v for %v: %d of %d queries failed %v; count 0 seen at %v; scale-downs: %q; "+
			"parking attempts: %d (the group's record now: %s, %q)",
			interval, span, len(failed), queries, failed, sleptAt, sleeps, parkings, after.Phase, after.Reason)
	}
	t.Logf("%d UDP queries every %v for %v, all answered, no scale-down", queries, interval, span)
}

// requireGated fails unless the plugin took the group's policy (no error
// scaling event: an invalid policy is ignored, and its group stays awake for
// nothing) and holds it awake (the record it keeps of the group is written
// at the first parking).
func requireGated(t *testing.T, c *harness.Cluster, job string) {
	t.Helper()
	for _, e := range c.ScaleEvents(t, job, job) {
		if e.Error {
			logEvents(t, c, job)
			t.Fatalf("an error scaling event: %s", e.Message)
		}
	}
	if rec := groupRecord(t, c, job); rec.Phase != "" && rec.Phase != "awake" {
		t.Fatalf("the plugin's record of the group is %q (%q), not awake", rec.Phase, rec.Reason)
	}
}

func TestUDPDNSWakesOverIPv6(t *testing.T) {
	t.Parallel()
	c, metrics := udpCluster(t, harness.ClusterOptions{IPv6HostNetwork: "v6"})
	const job = "dns6"
	addr := c.Net.HostAddr6
	port := runDNS(t, c, job, addr, "v6")
	waitAsleepByItself(t, c, job, addr, port)
	before, _ := replaysPassed(t, metrics)
	digWakes(t, c, job, addr, port, "+tries=1", "+timeout=20")
	time.Sleep(time.Second) // replays are counted off the agent's loop
	if after, series := replaysPassed(t, metrics); after <= before {
		t.Fatalf("no replay counted as passed (before %v, now %v: %s)", before, after, strings.Join(series, "; "))
	}
}

func TestUDPWakeWithoutReplayIsServedOnTheClientsRetry(t *testing.T) {
	t.Parallel()
	c, metrics := udpCluster(t, harness.ClusterOptions{PluginConfig: "syn_replay = false\n"})
	const job = "dnsnoreplay"
	addr := c.Net.HostAddr
	port := runDNS(t, c, job, addr, "")
	waitAsleepByItself(t, c, job, addr, port)
	before, _ := replaysPassed(t, metrics)
	// dig tries again every 2 s: the first query is held and dropped, a
	// later one is answered.
	const retry = 2 * time.Second
	took, notes := digWakes(t, c, job, addr, port, "+tries=5", fmt.Sprintf("+timeout=%d", int(retry.Seconds())))
	if took < retry-100*time.Millisecond || len(notes) == 0 {
		t.Fatalf("answered in %v with replay off, with %d tries timed out: the first query was answered (dig retries after %v)",
			took, len(notes), retry)
	}
	time.Sleep(time.Second)
	if after, series := replaysPassed(t, metrics); after != before {
		t.Fatalf("replay is off but replays passed went %v → %v (%s)", before, after, strings.Join(series, "; "))
	}
	for _, e := range c.ScaleEvents(t, job, job) {
		if strings.Contains(e.Message, "replayed") {
			t.Fatalf("replay is off but the event says %q", e.Message)
		}
	}
}

// udpEcho is a UDP-only server: it binds the service's address and port for
// UDP alone and sends every datagram back.
const udpEcho = `import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((os.environ["NOMAD_IP_dns"], int(os.environ["NOMAD_PORT_dns"])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
`

// udpEchoes sends one datagram from the client namespace and waits for it
// to come back.
func udpEchoes(c *harness.Cluster, addr netip.Addr, port int, timeout time.Duration) error {
	// Until the deadline: a server still starting refuses ("port
	// unreachable") at once, and a lost datagram is not retried by UDP.
	deadline := time.Now().Add(timeout)
	for {
		err := udpEchoOnce(c, addr, port, min(time.Until(deadline), time.Second))
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func udpEchoOnce(c *harness.Cluster, addr netip.Addr, port int, wait time.Duration) error {
	return c.Net.Do(func() error {
		conn, err := net.Dial("udp", netip.AddrPortFrom(addr, uint16(port)).String())
		if err != nil {
			return err
		}
		defer conn.Close()
		want := fmt.Sprintf("zeroscale %d", time.Now().UnixNano())
		if _, err := conn.Write([]byte(want)); err != nil {
			return err
		}
		_ = conn.SetReadDeadline(time.Now().Add(max(wait, 100*time.Millisecond)))
		buf := make([]byte, 2048)
		n, err := conn.Read(buf)
		if err != nil {
			return err
		}
		if string(buf[:n]) != want {
			return fmt.Errorf("echoed %q, want %q", buf[:n], want)
		}
		return nil
	})
}

// protocolsField is the policy field an error must name when a group
// serves UDP but its policy does not gate it.
const protocolsField = "scaling.policy.zeroscale.protocols"

func TestUDPOnlyServiceUnderTCPPolicyIsAnErrorAndNeverSleeps(t *testing.T) {
	t.Parallel()
	c := harness.NewCluster(t, harness.ClusterOptions{})
	const job = "udponly"
	addr := c.Net.HostAddr
	port := harness.FreeTCPUDPPort(t, addr)
	// Default protocols (TCP alone); no check: Nomad has no UDP check.
	c.RunUDPJob(t, harness.UDPJob{Name: job, Addr: addr, Port: port, Idle: udpIdle.String(),
		Command: "/usr/bin/python3", Args: []string{"-c", udpEcho}})
	if err := udpEchoes(c, addr, port, 20*time.Second); err != nil {
		t.Fatalf("the UDP server does not echo: %v\n%s", err, c.Diagnose(t))
	}
	running := time.Now()
	before := groupRecord(t, c, job)

	// The error event: the group serves UDP that its policy does not gate.
	var found *napi.ScalingEvent
	deadline := time.Now().Add(udpIdle + 30*time.Second)
	for found == nil {
		for _, e := range c.ScaleEvents(t, job, job) {
			if e.Error && strings.Contains(e.Message, protocolsField) {
				found = &e
				break
			}
		}
		if found == nil && time.Now().After(deadline) {
			logEvents(t, c, job)
			t.Fatalf("no error scaling event naming %s within %v of the group running\n%s",
				protocolsField, udpIdle+30*time.Second, c.Diagnose(t))
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("error event %v after the group ran: %s", time.Unix(0, int64(found.Time)).Sub(running).Round(100*time.Millisecond), found.Message)

	// Never parked: with no traffic at all it stays at 1 well past
	// idle_timeout.
	const margin = 12 * time.Second
	for time.Since(running) < udpIdle+margin {
		st, _, err := c.API.Jobs().ScaleStatus(job, nil)
		if err == nil && st.TaskGroups[job].Desired != 1 {
			logEvents(t, c, job)
			t.Fatalf("the group went to count %d %v after it ran (idle_timeout %v)", st.TaskGroups[job].Desired,
				time.Since(running).Round(100*time.Millisecond), udpIdle)
		}
		time.Sleep(500 * time.Millisecond)
	}
	for _, e := range c.ScaleEvents(t, job, job) {
		if e.Count != nil && *e.Count == 0 {
			t.Fatalf("a scale-down was recorded: %s", e.Message)
		}
	}
	if after := groupRecord(t, c, job); after.Epoch != before.Epoch {
		t.Fatalf("%d parking attempts (the group's record now: %s, %q)", after.Epoch-before.Epoch, after.Phase, after.Reason)
	}
	// And its UDP is served, not held by a gate.
	if err := udpEchoes(c, addr, port, 5*time.Second); err != nil {
		t.Fatalf("the UDP server does not echo %v after it ran: %v", time.Since(running).Round(time.Second), err)
	}
	t.Logf("still at count 1, serving UDP, %v after it ran (idle_timeout %v)", time.Since(running).Round(100*time.Millisecond), udpIdle)
}

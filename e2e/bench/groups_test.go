package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// manyGroups grows one node to 10, 100 and 1,000 sleeping groups of one
// service each and measures at each size:
// the plugin's memory and CPU while every group sleeps, the requests it
// sends to Nomad and Consul, and the wake of one group among them.
//
// The groups are real Nomad jobs with zeroscale policies, registered at
// count 0, and their placeholders are registered straight in Consul, as a
// group that went to sleep leaves them: a thousand tasks cannot start and
// idle first on this machine. Each wake below starts a real task.
func manyGroups(b *testing.B, t *table) {
	// One service each: a Consul agent's registrations slow down with the
	// number of services it holds (3,000 took it a minute here), which
	// bounds a node before zeroscale does.
	const services, wakes = 1, 3
	const idleWindow = 30 * time.Second
	metricsPort := harness.FreePort(b, netip.MustParseAddr("127.0.0.1"))
	metrics := fmt.Sprintf("127.0.0.1:%d", metricsPort)
	c := harness.NewCluster(b, harness.ClusterOptions{
		PluginConfig: fmt.Sprintf("metrics_address = %q\n", metrics),
	})
	pid := c.Nomad.PluginPID()
	if pid == 0 {
		b.Fatal("no plugin process found")
	}
	rows := []string{fmt.Sprintf("%-7s %-9s %-9s %-10s %-11s %-13s %-13s %-13s %s",
		"groups", "addresses", "gated in", "plugin RSS", "plugin CPU", "Nomad req", "Consul req", "Consul block", "wake of one: p50 / max")}
	var groups []harness.SleepingGroup
	sizes := []int{10, 100, 1000}
	if env := os.Getenv("ZS_BENCH_GROUPS"); env != "" { // fewer, while working on it
		sizes = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("ZS_BENCH_GROUPS: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, size := range sizes {
		added := size - len(groups)
		began := time.Now()
		groups = append(groups, c.SleepingGroups(b, "many"+strconv.Itoa(size), added, services, 20000+len(groups)*services, "10s")...)
		waitParked(b, c, metrics, size*services, 10*time.Minute)
		gatedIn := time.Since(began)
		// Idle means settled: a group found asleep is followed in Consul
		// for its first minute.
		waitMetric(b, c, metrics, "zeroscale_followed_services", 0, 3*time.Minute)

		// Idle: every group asleep, nothing connecting.
		before := sampleLoad(b, pid, metrics)
		time.Sleep(idleWindow)
		after := sampleLoad(b, pid, metrics)
		perMin := func(d float64) float64 { return d / idleWindow.Minutes() }

		var took []time.Duration
		var woken []string
		for _, i := range rand.Perm(len(groups))[:wakes] {
			g := groups[i]
			took = append(took, wakeOne(b, c, g.Addrs[0]))
			woken = append(woken, g.Job)
		}
		for _, job := range woken {
			c.WaitDesired(b, job, "web", 0, 3*time.Minute)
		}
		waitParked(b, c, metrics, size*services, 3*time.Minute)
		waitMetric(b, c, metrics, "zeroscale_followed_services", 0, 3*time.Minute)
		rows = append(rows, fmt.Sprintf("%-7d %-9d %-9s %-10s %-11s %-13s %-13s %-13s %s / %s",
			size, size*services, gatedIn.Round(time.Second),
			fmt.Sprintf("%.0f MiB", float64(after.rss)/(1<<20)),
			fmt.Sprintf("%.2f s/min", perMin((after.cpu-before.cpu).Seconds())),
			fmt.Sprintf("%.0f /min", perMin(after.nomad-before.nomad)),
			fmt.Sprintf("%.0f /min", perMin(after.consul-before.consul)),
			fmt.Sprintf("%.0f /min", perMin(after.consulBlocking-before.consulBlocking)),
			ms(percentile(took, 50)), ms(percentile(took, 100))))
	}
	t.section(fmt.Sprintf("Many groups on one node: sleeping groups of %d service each, plugin measured over %s of idle at each size, then %d wakes of a random group",
		services, idleWindow, wakes), rows...)
}

// load is a sample of the plugin's resource use and API requests.
type load struct {
	rss                           int64
	cpu                           time.Duration
	nomad, consul, consulBlocking float64
}

func sampleLoad(b *testing.B, pid int, metrics string) load {
	b.Helper()
	var l load
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatalf("plugin process: %v", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			l.rss = kb << 10
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatalf("plugin process: %v", err)
	}
	// utime and stime are fields 14 and 15, in clock ticks (100 Hz).
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	l.cpu = time.Duration(utime+stime) * 10 * time.Millisecond
	l.nomad = harness.Metric(b, metrics, `zeroscale_api_requests_total{api="nomad",kind="once"}`) +
		harness.Metric(b, metrics, `zeroscale_api_requests_total{api="nomad",kind="blocking"}`)
	l.consulBlocking = harness.Metric(b, metrics, `zeroscale_api_requests_total{api="consul",kind="blocking"}`)
	l.consul = harness.Metric(b, metrics, `zeroscale_api_requests_total{api="consul",kind="once"}`) + l.consulBlocking
	return l
}

// waitParked waits until the plugin parks at least n addresses.
func waitParked(b *testing.B, c *harness.Cluster, metrics string, n int, timeout time.Duration) {
	b.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := harness.Metric(b, metrics, "zeroscale_parked_addresses")
		if int(got) >= n {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%v of %d addresses parked after %s\n%s", got, n, timeout, c.Diagnose(b))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitMetric waits until a gauge of the plugin reads want.
func waitMetric(b *testing.B, c *harness.Cluster, metrics, series string, want float64, timeout time.Duration) {
	b.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := harness.Metric(b, metrics, series)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s is %v after %s, want %v\n%s", series, got, timeout, want, c.Diagnose(b))
		}
		time.Sleep(time.Second)
	}
}

// wakeOne connects to a sleeping group's address from the client namespace
// and times it until the first bytes of the answer arrive.
func wakeOne(b *testing.B, c *harness.Cluster, addr netip.AddrPort) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	began := time.Now()
	conn, err := c.Net.Dial(ctx, "tcp", addr.String())
	if err != nil {
		b.Fatalf("wake %s: %v\n%s", addr, err, c.Diagnose(b))
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	if _, err := io.ReadAtLeast(conn, buf, 1); err != nil {
		b.Fatalf("wake %s: read: %v", addr, err)
	}
	return time.Since(began)
}

// Package bench measures zeroscale side by side in one run and prints one
// table: the gate's per-packet cost, the warm path gated vs ungated and vs
// an L7 proxy, and wake latency with and without SYN replay. Run it with
// `make bench` (root). The machines here are small and shared: compare the
// ratios within a run, not absolute numbers across runs.
package bench

import (
	"context"
	"encoding/binary"
	"errors"
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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

type table struct {
	sections [][]string
}

func (t *table) section(title string, rows ...string) {
	t.sections = append(t.sections, append([]string{title}, rows...))
}

func (t *table) print() {
	host, _ := os.Hostname()
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fmt.Printf("\nzeroscale bench — %s, %s, %d CPUs, kernel %s\n", time.Now().Format("2006-01-02 15:04"), host,
		runtime.NumCPU(), strings.TrimSpace(string(kernel)))
	fmt.Println("(one run, side by side; shared 2-core machine: read the ratios, not the absolute figures)")
	for _, s := range t.sections {
		fmt.Println()
		fmt.Println(s[0])
		for _, r := range s[1:] {
			fmt.Println("  " + r)
		}
	}
	fmt.Println()
}

func BenchmarkZeroscale(b *testing.B) {
	if b.N > 1 {
		b.Skip("run with -benchtime 1x: each measurement sets its own repetitions")
	}
	var t table
	sections := []struct {
		name string
		run  func()
	}{
		{"xdp", func() { xdpCost(b, &t) }},
		{"warm", func() { warmPath(b, &t) }},
		{"wake", func() { wakeLatency(b, &t) }},
		{"cycles", func() { wakeCycles(b, &t, 50) }},
		{"multinode", func() { multiNodeStorm(b, &t) }},
		{"groups", func() { manyGroups(b, &t) }},
		{"storm", func() { synStorm(b, &t) }},
	}
	// ZS_BENCH_ONLY=name[,name] runs some sections (while working on one).
	only := os.Getenv("ZS_BENCH_ONLY")
	for _, s := range sections {
		if only == "" || slices.Contains(strings.Split(only, ","), s.name) {
			s.run()
		}
	}
	t.print()
}

// wakeCycles drives n consecutive sleep → wake cycles of one group (1 s
// HTTP check, replay on) and counts how each first connection fared.
func wakeCycles(b *testing.B, t *table, n int) {
	c := harness.NewCluster(b, harness.ClusterOptions{})
	port := c.RunExample(b, "http.nomad.hcl", "http", "3s")
	target := fmt.Sprintf("%s:%d", c.Net.HostAddr, port)
	var served, refused, retransmit, failed int
	var latencies []time.Duration
	began := time.Now()
	for i := 0; i < n; i++ {
		c.WaitDesired(b, "http", "http", 0, 120*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		conn, err := c.Net.Dial(ctx, "tcp", target)
		took := time.Since(start)
		cancel()
		switch {
		case err == nil && took >= 900*time.Millisecond:
			retransmit++ // served by the client's own SYN retransmit, not the replay
		case err == nil:
			served++
		case errors.Is(err, syscall.ECONNREFUSED):
			refused++
		default:
			failed++
		}
		if err == nil {
			conn.Close()
			latencies = append(latencies, took)
		}
		c.WaitDesired(b, "http", "http", 1, 60*time.Second)
	}
	t.section(fmt.Sprintf("Many wakes in a row: %d sleep → wake cycles of the http example (1 s HTTP check, replay on), %s in all", n,
		time.Since(began).Round(time.Second)),
		fmt.Sprintf("served by replay %d   served by the client's retransmit %d   refused %d   held or failed %d", served, retransmit, refused, failed),
		fmt.Sprintf("connect p50 %s  p90 %s  max %s", ms(percentile(latencies, 50)), ms(percentile(latencies, 90)), ms(percentile(latencies, 100))))
}

// ---------------------------------------------------------------- XDP cost

// tcpFrame is an Ethernet/IPv4/TCP frame; the gate reads headers only.
func tcpFrame(src, dst netip.Addr, dport uint16, flags byte, payload int) []byte {
	f := make([]byte, 14+20+20+payload)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(ip[2:], uint16(40+payload))
	copy(ip[12:], src.AsSlice())
	copy(ip[16:], dst.AsSlice())
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12], tcp[13] = 0x50, flags
	return f
}

func xdpCost(b *testing.B, t *table) {
	pin := fmt.Sprintf("/sys/fs/bpf/zs-bench-%d", os.Getpid())
	g, err := bpf.Load(bpf.Options{PinPath: pin, ReportInterval: time.Hour, CaptureSYNs: true})
	if err != nil {
		b.Fatal(err)
	}
	defer bpf.Uninstall(pin)
	defer g.Close()
	const keys = 10000
	empty := mapMemory(b, g)
	for i := 0; i < keys; i++ {
		if err := g.Open(bpf.Key{Addr: netip.AddrFrom4([4]byte{10, 50, byte(i >> 8), byte(i)}), Port: 8080}); err != nil {
			b.Fatal(err)
		}
	}
	full := mapMemory(b, g)
	cpus := runtime.NumCPU()
	t.section("Kernel memory of the gate's maps (memlock, as the kernel charges it)",
		fmt.Sprintf("no address gated: %.1f MiB (fixed: ring buffer, LRU flow tables, hash buckets)", float64(empty[""])/(1<<20)),
		fmt.Sprintf("%d addresses gated: %.1f MiB; %.0f KiB per 1,000 addresses on %d CPUs, of which the per-CPU stats take %.0f KiB per 1,000 addresses per CPU",
			keys, float64(full[""])/(1<<20), float64(full[""]-empty[""])/keys*1000/1024, cpus,
			float64(full["stats"]-empty["stats"])/keys*1000/1024/float64(cpus)))
	parked := netip.AddrFrom4([4]byte{10, 50, 0, 9})
	if err := g.Park(bpf.Key{Addr: parked, Port: 8080}); err != nil {
		b.Fatal(err)
	}
	ifindex := 0
	ifaces, _ := net.Interfaces()
	for _, i := range ifaces {
		if i.Flags&net.FlagLoopback == 0 {
			ifindex = i.Index
			break
		}
	}
	client := netip.MustParseAddr("192.0.2.7")
	cases := []struct {
		name  string
		frame []byte
	}{
		{"miss (address not gated)", tcpFrame(client, netip.MustParseAddr("10.60.0.1"), 8080, 0x18, 1400)},
		{"open key (warm path)", tcpFrame(client, netip.AddrFrom4([4]byte{10, 50, 0, 7}), 8080, 0x18, 1400)},
		{"parked key, data packet", tcpFrame(client, parked, 8080, 0x18, 1400)},
		{"parked key, SYN (dropped)", tcpFrame(client, parked, 8080, 0x02, 0)},
	}
	const repeat = 2_000_000
	base := medianOf(5, func() time.Duration {
		d, err := bpf.MeasureEmptyXDP(cases[0].frame, repeat, ifindex)
		if err != nil {
			b.Fatal(err)
		}
		return d
	})
	rows := []string{fmt.Sprintf("%-28s %8s %12s", "", "total", "gate's own")}
	for _, c := range cases {
		d := medianOf(5, func() time.Duration {
			_, d, err := g.MeasureGate(c.frame, repeat, ifindex)
			if err != nil {
				b.Fatal(err)
			}
			return d
		})
		rows = append(rows, fmt.Sprintf("%-28s %6d ns %9d ns", c.name, d.Nanoseconds(), (d-base).Nanoseconds()))
	}
	rows = append(rows, fmt.Sprintf("%-28s %6d ns   (test-run overhead, subtracted above)", "empty XDP program", base.Nanoseconds()))
	t.section(fmt.Sprintf("XDP gate per packet (BPF_PROG_TEST_RUN, %d keys in the map, median of 5 × %d runs)", keys, repeat), rows...)
}

func medianOf(n int, f func() time.Duration) time.Duration {
	var ds []time.Duration
	for i := 0; i < n; i++ {
		ds = append(ds, f())
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// ---------------------------------------------------------------- warm path

func warmPath(b *testing.B, t *table) {
	n := testnet.NewIPv4(b)
	pin := fmt.Sprintf("/sys/fs/bpf/zs-bench-warm-%d", os.Getpid())
	g, err := bpf.Load(bpf.Options{PinPath: pin})
	if err != nil {
		b.Fatal(err)
	}
	defer bpf.Uninstall(pin)
	defer g.Close()

	sinkPort := harness.FreePort(b, n.HostAddr)
	httpPort := harness.FreePort(b, n.HostAddr)
	proxyPort := harness.FreePort(b, n.HostAddr)
	sink := netip.AddrPortFrom(n.HostAddr, uint16(sinkPort))
	backend := netip.AddrPortFrom(n.HostAddr, uint16(httpPort))
	for _, ap := range []netip.AddrPort{sink, backend, netip.AddrPortFrom(n.HostAddr, uint16(proxyPort))} {
		if err := g.Open(bpf.KeyFrom(ap)); err != nil {
			b.Fatal(err)
		}
	}
	startSink(b, sink.String())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})}
	ln, err := net.Listen("tcp", backend.String())
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	startHAProxy(b, fmt.Sprintf("%s:%d", n.HostAddr, proxyPort), backend.String())

	gate := func(on bool) {
		if on {
			if _, err := g.Attach(n.HostIf, bpf.ModeAuto); err != nil {
				b.Fatal(err)
			}
		} else if err := g.Detach(n.HostIf); err != nil {
			b.Fatal(err)
		}
	}

	// Alternate so that drift in machine load hits both sides alike.
	var tput = map[bool][]float64{}
	var lat = map[bool][]time.Duration{}
	var proxyLat []time.Duration
	for round := 0; round < 5; round++ {
		for _, on := range []bool{false, true} {
			gate(on)
			tput[on] = append(tput[on], throughput(b, n, sink.String(), 2*time.Second))
			lat[on] = append(lat[on], requestLatencies(b, n, fmt.Sprintf("http://%s/", backend), 1000)...)
		}
		gate(false)
		proxyLat = append(proxyLat, requestLatencies(b, n, fmt.Sprintf("http://%s:%d/", n.HostAddr, proxyPort), 1000)...)
	}
	mode, _ := g.Attach(n.HostIf, bpf.ModeAuto)
	_ = g.Detach(n.HostIf)
	tOff, tOn := medianF(tput[false]), medianF(tput[true])
	pOff, pOn, pProxy := percentile(lat[false], 50), percentile(lat[true], 50), percentile(proxyLat, 50)
	ours := pOn - pOff
	proxyAdds := pProxy - pOff
	floor := time.Microsecond
	ratio := fmt.Sprintf("%.0f×", float64(proxyAdds)/float64(max(ours, floor)))
	if ours < floor {
		ratio = "≥ " + ratio + " (the gate's delta is below 1 µs, the floor used)"
	}
	t.section(fmt.Sprintf("Warm path over a veth pair (gate in %s mode, as auto picks for a veth), client in a namespace, 5 alternating rounds, medians", mode),
		fmt.Sprintf("bulk TCP throughput     ungated %6.2f Gbit/s   gated %6.2f Gbit/s   ratio %.3f", tOff, tOn, tOn/tOff),
		fmt.Sprintf("HTTP request p50        ungated %7s        gated %7s        delta %+v", us(pOff), us(pOn), ours.Round(100*time.Nanosecond)),
		"HTTP request p50 via an L7 proxy (haproxy, stand-in for the activator/interceptor",
		fmt.Sprintf("  proxies of Knative, KEDA HTTP, Sablier)  %7s  adds %v", us(pProxy), proxyAdds.Round(time.Microsecond)),
		fmt.Sprintf("added p50 latency: proxy / zeroscale gate = %s", ratio),
	)
}

func us(d time.Duration) string { return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond)) }

func medianF(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func percentile(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, len(s)*p/100)]
}

func startSink(b *testing.B, addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
}

// throughput sends for d from the namespace and returns Gbit/s.
func throughput(b *testing.B, n *testnet.Net, addr string, d time.Duration) float64 {
	c, err := n.Dial(context.Background(), "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	var sent int64
	began := time.Now()
	for time.Since(began) < d {
		w, err := c.Write(buf)
		if err != nil {
			b.Fatal(err)
		}
		sent += int64(w)
	}
	return float64(sent) * 8 / time.Since(began).Seconds() / 1e9
}

// requestLatencies times n keep-alive GETs from the namespace.
func requestLatencies(b *testing.B, ns *testnet.Net, url string, n int) []time.Duration {
	client := &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: 1,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, network, addr)
		},
	}}
	defer client.CloseIdleConnections()
	get := func() {
		resp, err := client.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for i := 0; i < 50; i++ { // warm up the connection and caches
		get()
	}
	out := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		began := time.Now()
		get()
		out = append(out, time.Since(began))
	}
	return out
}

func startHAProxy(b *testing.B, listen, backend string) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		b.Fatal("haproxy not installed (make bench installs Debian's haproxy)")
	}
	cfg := fmt.Sprintf(`global
  maxconn 1000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend in
  bind %s
  default_backend out
backend out
  server s1 %s
`, listen, backend)
	path := filepath.Join(b.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", path)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("tcp", listen); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("haproxy did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---------------------------------------------------------------- wakes

func wakeLatency(b *testing.B, t *table) {
	const wakes = 10
	examples := []struct {
		name, file, job string
		vars            map[string]string
	}{
		{"python (http example)", "http.nomad.hcl", "http", nil},
		{"nginx (nginx example)", "nginx.nomad.hcl", "nginx", nil},
		// busybox httpd in a container, behind docker's port mapping.
		{"docker (docker example)", "docker.nomad.hcl", "docker", map[string]string{"image": harness.BusyboxImage}},
		// python in a Nomad bridge-mode group, behind the CNI portmap.
		{"bridge (bridge example)", "bridge.nomad.hcl", "bridge", nil},
	}
	results := map[string]map[bool][]time.Duration{}
	for _, ex := range examples {
		results[ex.name] = map[bool][]time.Duration{}
	}
	for _, replay := range []bool{true, false} {
		c := harness.NewCluster(b, harness.ClusterOptions{PluginConfig: fmt.Sprintf("syn_replay = %v\n", replay), Docker: true, CNI: true})
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, ex := range examples {
			port := c.RunExampleWith(b, ex.file, ex.job, "3s", ex.vars)
			wg.Add(1)
			go func() {
				defer wg.Done()
				samples := measureWakes(b, c, ex.job, port, wakes)
				mu.Lock()
				results[ex.name][replay] = samples
				mu.Unlock()
			}()
		}
		wg.Wait()
	}
	rows := []string{fmt.Sprintf("%-24s %-22s %-22s %s", "", "replay on  p50 / p90", "replay off p50 / p90", "off/on (p50)")}
	for _, ex := range examples {
		name := ex.name
		on, off := results[name][true], results[name][false]
		rows = append(rows, fmt.Sprintf("%-24s %8s / %-11s %8s / %-11s %.1f×", name,
			ms(percentile(on, 50)), ms(percentile(on, 90)), ms(percentile(off, 50)), ms(percentile(off, 90)),
			float64(percentile(off, 50))/float64(percentile(on, 50))))
	}
	t.section(fmt.Sprintf("Wake: client connect() → established on a sleeping service, %d wakes each (Nomad + Consul dev agents)", wakes), rows...)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0fms", float64(d)/float64(time.Millisecond)) }

// measureWakes lets the group sleep, then times one connect() from the
// client namespace, n times.
func measureWakes(b *testing.B, c *harness.Cluster, job string, port, n int) []time.Duration {
	var out []time.Duration
	target := fmt.Sprintf("%s:%d", c.Net.HostAddr, port)
	for i := 0; i < n; i++ {
		c.WaitDesired(b, job, job, 0, 120*time.Second)
		// The sleep is committed before Nomad stops the allocation; let the
		// placeholder and gate settle like a real idle period would.
		time.Sleep(500 * time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		began := time.Now()
		conn, err := c.Net.Dial(ctx, "tcp", target)
		took := time.Since(began)
		cancel()
		if err != nil {
			b.Fatalf("%s wake %d: %v", job, i, err)
		}
		conn.Close()
		out = append(out, took)
		c.WaitDesired(b, job, job, 1, 60*time.Second)
	}
	return out
}

// ---------------------------------------------------------------- many nodes

// multiNodeStorm times storms of connects to a sleeping group in a
// two-node cluster (each node its own namespace, Consul agent, Nomad client
// and plugin): the group on one node, and the group on both nodes with the
// storm spread over their addresses, in alternating rounds.
func multiNodeStorm(b *testing.B, t *table) {
	const rounds, clients = 10, 80
	m := harness.NewMultiNode(b, harness.MultiNodeOptions{Nodes: 2, OwnCPU: true})
	groups := []*harness.Spread{
		m.RunSpread(b, "single", m.Nodes[:1], 3*time.Second),
		m.RunSpread(b, "double", m.Nodes, 3*time.Second),
	}
	latencies := make([][]time.Duration, len(groups))
	// roundP50s: each round's median; their median resists the odd slow
	// round on a shared machine better than the pooled one.
	roundP50s := make([][]time.Duration, len(groups))
	served := make([]int, len(groups))
	replayed := make([][]float64, len(groups))
	for i := range groups {
		replayed[i] = make([]float64, len(m.Nodes))
	}
	for range rounds {
		for i, g := range groups {
			for _, other := range groups {
				other.WaitAsleep(b, 120*time.Second)
			}
			time.Sleep(500 * time.Millisecond)
			before := make([]float64, len(m.Nodes))
			for j, n := range m.Nodes {
				before[j] = n.Metric(b, `zeroscale_syn_replays_total{result="passed"}`)
			}
			var round []time.Duration
			for _, r := range harness.Storm(m.Client, g.Addrs(), clients, 30*time.Second) {
				if r.Err == nil {
					served[i]++
					round = append(round, r.Connect)
				}
			}
			latencies[i] = append(latencies[i], round...)
			roundP50s[i] = append(roundP50s[i], percentile(round, 50))
			time.Sleep(time.Second) // replays finish off the agents' loops
			for j, n := range m.Nodes {
				replayed[i][j] += n.Metric(b, `zeroscale_syn_replays_total{result="passed"}`) - before[j]
			}
		}
	}
	rows := []string{fmt.Sprintf("%-26s %-9s %-7s %-7s %-7s %s", "", "served", "p50", "p90", "max", "SYNs replayed per node")}
	names := []string{"one node (group on node 1)", "two nodes (one each)"}
	for i := range groups {
		var perNode []string
		for j, n := range m.Nodes {
			perNode = append(perNode, fmt.Sprintf("%s %.0f", n.Name, replayed[i][j]))
		}
		rows = append(rows, fmt.Sprintf("%-26s %4d/%-4d %-7s %-7s %-7s %s", names[i], served[i], rounds*clients,
			ms(percentile(latencies[i], 50)), ms(percentile(latencies[i], 90)), ms(percentile(latencies[i], 100)),
			strings.Join(perNode, ", ")))
	}
	rows = append(rows, fmt.Sprintf("median of the rounds' p50: one node %s, two nodes %s; two-node / one-node: %.2f× (pooled p50: %.2f×)",
		ms(percentile(roundP50s[0], 50)), ms(percentile(roundP50s[1], 50)),
		float64(percentile(roundP50s[1], 50))/float64(percentile(roundP50s[0], 50)),
		float64(percentile(latencies[1], 50))/float64(percentile(latencies[0], 50))))
	t.section(fmt.Sprintf("Storm on many nodes: %d rounds of %d concurrent connects to a sleeping group, two Nomad clients in one cluster (python, replay on)", rounds, clients), rows...)
	forwardedWakes(b, t, m)
}

// forwardedWakes times one client's connect to the address a sleeping group
// is known at: a group that wakes where it slept (static port, pinned), one
// on a dynamic port that wakes at another port of the same node, and one
// that wakes on the other node (the node it slept on is made ineligible).
// The last two are served through the old address's forward.
func forwardedWakes(b *testing.B, t *table, m *harness.MultiNode) {
	const rounds = 5
	direct := m.RunSpread(b, "direct", m.Nodes[:1], 3*time.Second)
	m.Run(b, harness.TestdataJob(b, "dynamic", "sameport"), map[string]string{"nodes": harness.NodeList(m.Nodes[:1]), "idle_timeout": "3s"})
	m.Run(b, harness.TestdataJob(b, "dynamic", "othernode"), map[string]string{"nodes": harness.NodeList(m.Nodes), "idle_timeout": "3s"})
	kinds := []string{"direct (where it slept)", "forwarded, same node, other port", "forwarded, other node"}
	samples := make([][]time.Duration, len(kinds))
	nodeNamed := func(addr netip.Addr) *harness.ClusterNode {
		for _, n := range m.Nodes {
			if n.Addr == addr {
				return n
			}
		}
		b.Fatalf("no node at %s", addr)
		return nil
	}
	for range rounds {
		for i, job := range []string{"direct", "sameport", "othernode"} {
			var old netip.AddrPort
			if job == "direct" {
				direct.WaitAsleep(b, 120*time.Second)
				old = direct.Addrs()[0]
			} else {
				old = waitAsleepAt(b, m, job, 120*time.Second)
			}
			time.Sleep(500 * time.Millisecond)
			var slept *harness.ClusterNode
			if job == "othernode" {
				slept = nodeNamed(old.Addr())
				setEligible(b, m, slept.Name, false)
			}
			r := harness.Storm(m.Client, []netip.AddrPort{old}, 1, 30*time.Second)[0]
			if slept != nil {
				setEligible(b, m, slept.Name, true)
			}
			if r.Err != nil {
				b.Fatalf("%s: first connect to %s: %v\n%s", job, old, r.Err, m.Diagnose(b))
			}
			samples[i] = append(samples[i], r.Connect)
			if slept != nil && strings.Contains(r.Body, "served by "+slept.Name) {
				b.Fatalf("othernode woke on %s, where it slept", slept.Name)
			}
		}
	}
	rows := []string{fmt.Sprintf("%-34s %-7s %-7s %s", "", "p50", "max", "vs direct (p50)")}
	for i, kind := range kinds {
		rows = append(rows, fmt.Sprintf("%-34s %-7s %-7s %.2f×", kind, ms(percentile(samples[i], 50)), ms(percentile(samples[i], 100)),
			float64(percentile(samples[i], 50))/float64(percentile(samples[0], 50))))
	}
	var forwarded float64
	for _, n := range m.Nodes {
		forwarded += n.Metric(b, "zeroscale_forwarded_connections_total")
	}
	rows = append(rows, fmt.Sprintf("connections forwarded by the nodes' NAT: %.0f (of %d forwarded wakes)", forwarded, 2*rounds))
	t.section(fmt.Sprintf("Wake anywhere: %d wakes each, one client connecting to the address the sleeping group is known at", rounds), rows...)
}

// waitAsleepAt waits until job's group sleeps and returns the address its
// placeholder keeps in Consul.
func waitAsleepAt(b *testing.B, m *harness.MultiNode, job string, timeout time.Duration) netip.AddrPort {
	deadline := time.Now().Add(timeout)
	for {
		st := m.ScaleStatus(b, job, "web")
		if held := m.Placeholders(b, job); st.Desired == 0 && st.Running == 0 && len(held) == 1 {
			return held[0]
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s not asleep within %v\n%s", job, timeout, m.Diagnose(b))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// setEligible turns scheduling eligibility of a node on or off.
func setEligible(b *testing.B, m *harness.MultiNode, name string, on bool) {
	nodes, _, err := m.API.Nodes().List(nil)
	if err != nil {
		b.Fatal(err)
	}
	for _, n := range nodes {
		if n.Name == name {
			if _, err := m.API.Nodes().ToggleEligibility(n.ID, on, nil); err != nil {
				b.Fatalf("eligibility of %s: %v", name, err)
			}
			return
		}
	}
	b.Fatalf("no node %s", name)
}

// mapMemory is the gate's map memory by map, and in all under "".
func mapMemory(b *testing.B, g *bpf.Gate) map[string]uint64 {
	m, err := g.MapMemory()
	if err != nil {
		b.Fatal(err)
	}
	var total uint64
	for _, n := range m {
		total += n
	}
	m[""] = total
	return m
}

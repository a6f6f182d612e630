// Package bench measures zeroscale side by side in one run and prints one
// table: the gate's per-packet cost, the warm path gated vs ungated and vs
// L4 and L7 proxies (nginx stream, haproxy), and wake latency with and
// without SYN replay beside Nomad's own start time. Run it with
// `make bench` (root). The machines here are small and shared: compare the
// ratios within a run, not absolute numbers across runs.
package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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

// The warm path's rounds (the measurement is in warm_test.go). Many short
// slices rather than a few long runs: each round's ratio of a route to the
// ungated one comes from samples interleaved within milliseconds, and
// ranking the rounds' ratios gives an interval for their median.
const (
	warmRounds = 40
	// warmCycles per round; a cycle has warmDirectShare pairs of the
	// direct routes (gated and ungated side by side in time) and one slice
	// of each proxied route.
	warmCycles      = 5
	warmDirectShare = 5
	warmSlice       = 30 * time.Millisecond
	// warmRamp: a slice streams this long before it counts, for the
	// pipeline (and a proxy's buffers) to fill.
	warmRamp = 3 * time.Millisecond
	// warmDrainTimeout bounds the wait for a slice's bytes to reach the
	// sink (tens of MB may be queued in the socket buffers).
	warmDrainTimeout = 10 * time.Second
	warmRequests     = 400 // cycles of requests per round, shares as for the slices
	// warmBudget stops the rounds early on a machine too loaded to finish
	// them in reasonable time; the title says how many ran.
	warmBudget = 4 * time.Minute
)

// The warm routes in the order warmRows expects.
const ungatedRoute, gatedRoute = 0, 1

func warmPath(b *testing.B, t *table) {
	began := time.Now()
	nets := [2]*testnet.Net{testnet.NewIPv4(b), testnet.NewIPv4(b)}
	pin := fmt.Sprintf("/sys/fs/bpf/zs-bench-warm-%d", os.Getpid())
	g, err := bpf.Load(bpf.Options{PinPath: pin})
	if err != nil {
		b.Fatal(err)
	}
	defer bpf.Uninstall(pin)
	defer g.Close()
	routes := startWarmRoutes(b, []netip.Addr{nets[0].HostAddr, nets[1].HostAddr})
	for _, n := range nets {
		for _, port := range []int{routes[ungatedRoute].bulkPort, routes[gatedRoute].bulkPort, routes[gatedRoute].httpPort} {
			if err := g.Open(bpf.KeyFrom(netip.AddrPortFrom(n.HostAddr, uint16(port)))); err != nil {
				b.Fatal(err)
			}
		}
	}

	var mode bpf.AttachMode
	// gateOn attaches the gate to one client veth and takes it off the
	// other; the roles swap every round so that any difference between
	// the two veth pairs cancels.
	gateOn := func(gatedNet, plainNet *testnet.Net) {
		if err := g.Detach(plainNet.HostIf); err != nil {
			b.Fatal(err)
		}
		m, err := g.Attach(gatedNet.HostIf, bpf.ModeAuto)
		if err != nil {
			b.Fatal(err)
		}
		mode = m
	}
	defer func() {
		for _, n := range nets {
			_ = g.Detach(n.HostIf)
		}
	}()
	gateOn(nets[0], nets[1])
	measureWarmRound(b, routes, nets[0], nets[1]) // warm-up: first connections, proxies' first buffers
	var rounds []warmRound
	for r := 0; r < warmRounds && time.Since(began) < warmBudget; r++ {
		gatedNet, plainNet := nets[r%2], nets[1-r%2]
		gateOn(gatedNet, plainNet)
		rounds = append(rounds, measureWarmRound(b, routes, gatedNet, plainNet))
	}
	t.section(fmt.Sprintf("Warm path: client in a namespace, service and proxies on the host across a veth pair (two pairs, the gate on one, swapped every round; "+
		"gate in %s mode, as auto picks for a veth; proxies with one worker each): %d rounds, each cycling through the routes in random order; "+
		"per round a direct route has %d × %v bulk slices and %d keep-alive GETs, a proxied one %d and %d; %s in all",
		mode, len(rounds), warmDirectShare*warmCycles, warmSlice, warmDirectShare*warmRequests, warmCycles, warmRequests, time.Since(began).Round(time.Second)),
		warmRows(routes, rounds)...)
}

// startWarmRoutes starts the service (a bulk sink and an HTTP backend) and
// the proxies in front of it, listening on every one of hosts, and returns
// the routes: ungated and gated direct first.
func startWarmRoutes(b *testing.B, hosts []netip.Addr) []warmRoute {
	taken := map[int]bool{}
	httpPort := portOnAll(b, hosts, taken)
	startHTTPBackend(b, hosts, httpPort)
	// Every route has a sink of its own, so that its bytes are counted
	// apart from any other route's still in flight.
	sink := func(upload bool) (int, *atomic.Int64) {
		port := portOnAll(b, hosts, taken)
		return port, startCountingSink(b, hosts, port, upload)
	}
	direct := func(name string, gatedSide bool) warmRoute {
		port, received := sink(false)
		return warmRoute{name: name, direct: true, gatedSide: gatedSide, bulkPort: port, httpPort: httpPort, received: received}
	}
	proxied := func(name, mode, uploadHeader string) (warmRoute, []proxyForward) {
		port, received := sink(uploadHeader != "")
		r := warmRoute{name: name, bulkPort: portOnAll(b, hosts, taken), httpPort: portOnAll(b, hosts, taken),
			uploadHeader: uploadHeader, received: received}
		return r, []proxyForward{{Port: r.bulkPort, To: hostPort(hosts[0], port), Mode: mode},
			{Port: r.httpPort, To: hostPort(hosts[0], httpPort), Mode: mode}}
	}
	// A body far longer than any round sends: the proxy forwards it as it
	// comes and the sink discards it.
	upload := "POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: 1099511627776\r\n\r\n"
	nginx, nginxForwards := proxied("nginx stream (L4)", "tcp", "")
	haproxyL4, haproxyL4Forwards := proxied("haproxy mode tcp (L4)", "tcp", "")
	haproxyL7, haproxyL7Forwards := proxied("haproxy mode http (L7)", "http", upload)
	startNginxStream(b, hosts, nginxForwards)
	startHAProxy(b, hosts, append(haproxyL4Forwards, haproxyL7Forwards...))
	return []warmRoute{direct("direct, ungated", false), direct("direct, gated (zeroscale)", true), nginx, haproxyL4, haproxyL7}
}

// warmRows are the warm path's figures: each route's own, then its
// per-round ratios to the ungated route with a confidence interval for
// their median.
func warmRows(routes []warmRoute, rounds []warmRound) []string {
	gbps := make([][]float64, len(routes))
	latencies := make([][]time.Duration, len(routes))
	tputRatio, p50Ratio := make([]medianInterval, len(routes)), make([]medianInterval, len(routes))
	var ungatedSlices []float64
	for i := range routes {
		var tr, lr []float64
		for _, r := range rounds {
			gbps[i] = append(gbps[i], r.gbps[i])
			latencies[i] = append(latencies[i], r.latencies[i]...)
			tr = append(tr, r.gbps[i]/r.gbps[ungatedRoute])
			lr = append(lr, float64(percentile(r.latencies[i], 50))/float64(percentile(r.latencies[ungatedRoute], 50)))
			if i == ungatedRoute {
				ungatedSlices = append(ungatedSlices, r.sliceGbps[i]...)
			}
		}
		tputRatio[i], p50Ratio[i] = medianCI(tr, 0.95), medianCI(lr, 0.95)
	}
	baseP50, baseP99 := percentile(latencies[ungatedRoute], 50), percentile(latencies[ungatedRoute], 99)
	rows := []string{fmt.Sprintf("%-27s %11s %9s %9s   %s", "", "bulk Gbit/s", "HTTP p50", "p99", "adds p50 / p99")}
	for i, r := range routes {
		p50, p99 := percentile(latencies[i], 50), percentile(latencies[i], 99)
		adds := "—"
		if i != ungatedRoute {
			adds = usDelta(p50-baseP50) + " / " + usDelta(p99-baseP99)
		}
		rows = append(rows, fmt.Sprintf("%-27s %11.2f %9s %9s   %s", r.name, medianF(gbps[i]), us(p50), us(p99), adds))
	}
	ci := tputRatio[gatedRoute]
	rows = append(rows, fmt.Sprintf("ratio to direct ungated, per round: median [95%% CI for the median, distribution-free from order statistics: ranks %d and %d of %d, coverage %.1f%%]",
		ci.LowRank, ci.HighRank, len(rounds), 100*ci.Coverage),
		fmt.Sprintf("  %-25s %-26s %s", "", "bulk throughput", "HTTP p50"))
	for i, r := range routes {
		if i != ungatedRoute {
			rows = append(rows, fmt.Sprintf("  %-25s %-26s %s", r.name, tputRatio[i].ratioCI(), p50Ratio[i].ratioCI()))
		}
	}
	if tg, lg := tputRatio[gatedRoute], p50Ratio[gatedRoute]; tg.OK && lg.OK {
		pct := func(ratio float64) string { return fmt.Sprintf("%+.1f%%", 100*(ratio-1)) }
		rows = append(rows, fmt.Sprintf("the gate changes bulk throughput by %s (95%% CI %s to %s) and request p50 by %s (%s to %s)",
			pct(tg.Median), pct(tg.Low), pct(tg.High), pct(lg.Median), pct(lg.Low), pct(lg.High)))
	}
	// How noisy the machine was: the intervals narrow as this does.
	slices.Sort(ungatedSlices)
	if n := len(ungatedSlices); n > 0 {
		spread := (ungatedSlices[n*84/100] - ungatedSlices[n*16/100]) / 2 / ungatedSlices[n/2]
		rows = append(rows, fmt.Sprintf("machine noise: one %v slice of the ungated route is off its median by ±%.0f%% (half its 16–84%% range)", warmSlice, 100*spread))
	}
	return rows
}

func us(d time.Duration) string { return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond)) }

func usDelta(d time.Duration) string {
	return fmt.Sprintf("%+.1fµs", float64(d)/float64(time.Microsecond))
}

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

// ---------------------------------------------------------------- wakes

// wakeSettle separates a wake or a floor start from the other job's stop.
const wakeSettle = time.Second

// dockerBridge is the bridge of the cluster's dockerd (docker's default).
const dockerBridge = "docker0"

// wakeSamples are one example's samples in one cluster: its wakes, and the
// floor (floor_test.go) measured between them.
type wakeSamples struct {
	wakes, floors []time.Duration
	// started is, for each floor sample, when Nomad recorded the task as
	// started; only logged.
	started []time.Duration
}

func wakeLatency(b *testing.B, t *table) {
	const wakes = 10
	began := time.Now()
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
	results := map[string]map[bool]wakeSamples{}
	for _, ex := range examples {
		results[ex.name] = map[bool]wakeSamples{}
	}
	for _, replay := range []bool{true, false} {
		// A sub-benchmark each, so that one cluster is gone before the
		// next starts: two dockerds at once share docker0 and the nat
		// table, and the second one's port mapping then accepted
		// connections before its container had started.
		measured := b.Run(fmt.Sprintf("wake_replay_%v", replay), func(b *testing.B) {
			c := harness.NewCluster(b, harness.ClusterOptions{PluginConfig: fmt.Sprintf("syn_replay = %v\n", replay), Docker: true, CNI: true})
			quickNeighbourRetries(b, dockerBridge)
			var wg sync.WaitGroup
			var mu sync.Mutex
			for _, ex := range examples {
				port := c.RunExampleWith(b, ex.file, ex.job, "3s", ex.vars)
				floor := runFloorJob(b, c, ex.file, ex.vars)
				wg.Add(1)
				go func() {
					defer wg.Done()
					samples := measureWakes(b, c, ex.job, port, floor, wakes)
					mu.Lock()
					results[ex.name][replay] = samples
					mu.Unlock()
				}()
			}
			wg.Wait()
		})
		if !measured {
			b.Fatalf("wakes with syn_replay = %v not measured", replay)
		}
	}
	rows := []string{fmt.Sprintf("%-24s %-22s %-22s %-13s %-22s %s", "", "replay on  p50 / p90", "replay off p50 / p90", "off/on (p50)",
		"floor p50, on / off", "wake p50 ÷ floor p50, on / off")}
	for _, ex := range examples {
		on, off := results[ex.name][true], results[ex.name][false]
		floorOn, floorOff := percentile(on.floors, 50), percentile(off.floors, 50)
		rows = append(rows, fmt.Sprintf("%-24s %8s / %-11s %8s / %-11s %-13s %8s / %-11s %.1f× / %.1f×", ex.name,
			ms(percentile(on.wakes, 50)), ms(percentile(on.wakes, 90)), ms(percentile(off.wakes, 50)), ms(percentile(off.wakes, 90)),
			fmt.Sprintf("%.1f×", float64(percentile(off.wakes, 50))/float64(percentile(on.wakes, 50))),
			ms(floorOn), ms(floorOff),
			float64(percentile(on.wakes, 50))/float64(floorOn), float64(percentile(off.wakes, 50))/float64(floorOff)))
	}
	rows = append(rows, fmt.Sprintf("floor: Nomad alone starting the group, no gate: an ungated copy of the job scaled 0 → 1 through the API until its task accepts "+
		"a connection (tried every %v from the client namespace), in the same cluster, between the wakes", floorPoll))
	t.section(fmt.Sprintf("Wake: client connect() → established on a sleeping service, %d wakes and %d floor starts each per cluster (Nomad + Consul dev agents), %s in all",
		wakes, wakes, time.Since(began).Round(time.Second)), rows...)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0fms", float64(d)/float64(time.Millisecond)) }

// measureWakes lets the group sleep, then times one connect() from the
// client namespace, n times; before each wake, while the group sleeps, it
// times one start of the ungated copy.
func measureWakes(b *testing.B, c *harness.Cluster, job string, port int, floor *floorJob, n int) wakeSamples {
	var out wakeSamples
	target := fmt.Sprintf("%s:%d", c.Net.HostAddr, port)
	for i := 0; i < n; i++ {
		c.WaitDesired(b, job, job, 0, 120*time.Second)
		// The sleep is committed before Nomad stops the allocation; let the
		// allocation stop and the placeholder and gate settle like a real
		// idle period would. The wake follows the copy's stop alike.
		c.WaitNoneRunning(b, job, 60*time.Second)
		time.Sleep(wakeSettle)
		s := floor.start(b, c)
		out.floors, out.started = append(out.floors, s.accepting), append(out.started, s.started)
		time.Sleep(wakeSettle)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		began := time.Now()
		conn, err := c.Net.Dial(ctx, "tcp", target)
		took := time.Since(began)
		cancel()
		if err != nil {
			b.Fatalf("%s wake %d: %v", job, i, err)
		}
		conn.Close()
		out.wakes = append(out.wakes, took)
		c.WaitDesired(b, job, job, 1, 60*time.Second)
	}
	b.Logf("%s: wakes %v; floor %v; floor, until Nomad recorded the task started %v", job,
		roundAll(out.wakes, time.Millisecond), roundAll(out.floors, time.Millisecond), roundAll(out.started, time.Millisecond))
	return out
}

func roundAll(ds []time.Duration, unit time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(unit)
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

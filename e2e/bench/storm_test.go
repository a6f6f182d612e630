package bench

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
	"github.com/zeroscale/nomad-driver-zeroscale/internal/testnet"
)

// synStorm floods 100 sleeping groups (one service each) with 10,000
// SYNs/s for 10 s, every SYN from a source address and port of its own,
// and shows what the node makes of it: one scale-up per group, the ring
// buffer's and the event channel's drops, a real client's wake amid the
// flood, and the gate's cost per packet under that load.
//
// The storm hits every address within its first 10 ms, so all 100 groups
// wake at once: on this machine 100 tasks then start together. Real
// clients connect at the storm's start (each times its group's wake among
// the 100) and halfway through (groups woken or still starting, serving
// through the flood: SYN cookies by then).
func synStorm(b *testing.B, t *table) {
	const groupCount, rate, stormFor, clients = 100, 10_000, 10 * time.Second, 10
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b, netip.MustParseAddr("127.0.0.1")))
	c := harness.NewCluster(b, harness.ClusterOptions{
		PluginConfig: fmt.Sprintf("metrics_address = %q\n", metrics),
	})
	pid := c.Nomad.PluginPID()
	if pid == 0 {
		b.Fatal("no plugin process found")
	}
	// Idle far beyond the storm and the wakes: a group that went back to
	// sleep and woke again would be a second scale-up of another cycle.
	const idle = "5m"
	calm := c.SleepingGroups(b, "calm", 1, 1, 21000, idle)[0]
	groups := c.SleepingGroups(b, "storm", groupCount, 1, 21100, idle)
	waitParked(b, c, metrics, groupCount+1, 5*time.Minute)
	quiet := wakeOne(b, c, calm.Addrs[0])

	var targets []netip.AddrPort
	for _, g := range groups {
		targets = append(targets, g.Addrs[0])
	}
	stats, err := bpf.EnableRunStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	gateRuns := func() bpf.RunStats {
		s, err := bpf.PinnedGateRunStats(c.Nomad.PinPath)
		if err != nil {
			b.Fatal(err)
		}
		return s
	}
	// The gate's program also runs on lo, for every local packet of the
	// machine: its rate before the storm is subtracted below.
	const quietFor = 3 * time.Second
	runsQuietFrom := gateRuns()
	time.Sleep(quietFor)
	countersBefore := scrape(b, metrics)
	loadBefore := sampleLoad(b, pid, metrics)
	runsBefore := gateRuns()
	background := runsBefore.Since(runsQuietFrom)

	storm := c.Net.StartSYNStorm(b, testnet.StormOptions{Targets: targets, Rate: rate, Duration: stormFor,
		Max: rate * int(stormFor/time.Second)})
	began := time.Now()
	// At the start: each client's group wakes among the 100. Halfway: ten
	// other groups, woken or still starting.
	atStart := connectAll(c, pick(groups, 0, clients), 0)
	halfway := connectAll(c, pick(groups, 5, clients), stormFor/2)
	time.Sleep(time.Second)
	runsFirstSecond := gateRuns().Since(runsBefore)
	sent := storm.Wait()
	runsStorm := gateRuns().Since(runsBefore)
	// Per SYN: the storm's runtime less what the same time would have
	// taken at the quiet rate.
	perSYN := time.Duration(float64(runsStorm.Runtime-background.Runtime*sent.Elapsed/quietFor) / float64(max(sent.Sent, 1)))
	loadStorm := sampleLoad(b, pid, metrics)
	if sent.Err != nil {
		b.Fatalf("storm: %v", sent.Err)
	}

	running, allRunning := waitRunning(b, c, groups, began, 5*time.Minute)
	startLat, startErrs := atStart()
	midLat, midErrs := halfway()
	// Late Scale calls (a retry, a second wake) would show up by now.
	time.Sleep(5 * time.Second)
	countersAfter := scrape(b, metrics)
	delta := func(series string) float64 { return countersAfter.value(series) - countersBefore.value(series) }
	gate := func(outcome string) float64 {
		return delta(fmt.Sprintf(`zeroscale_gate_packets_total{outcome=%q}`, outcome))
	}

	// Scale-ups per group, from Nomad's own record, and when each group's
	// Scale call and its gate's opening (the awake event) came.
	upsPerGroup := map[int]int{}
	var errored int
	var scaledAt, openedAt []time.Duration
	for _, g := range groups {
		evs := c.ScaleEvents(b, g.Job, "web")
		upsPerGroup[harness.CountScaleTo(evs, 1)]++
		var scaled, opened bool
		for _, e := range evs {
			at := time.Unix(0, int64(e.Time)).Sub(began)
			switch {
			case e.Error:
				errored++
			case e.Count != nil && *e.Count == 1 && !scaled:
				scaledAt, scaled = append(scaledAt, at), true
			case strings.HasPrefix(e.Message, "zeroscale: awake") && !opened:
				openedAt, opened = append(openedAt, at), true
			}
		}
	}
	var perGroup []string
	for _, n := range slices.Sorted(maps.Keys(upsPerGroup)) {
		perGroup = append(perGroup, fmt.Sprintf("%d group(s) × %d", upsPerGroup[n], n))
	}

	cpu := (loadStorm.cpu - loadBefore.cpu).Seconds()
	t.section(fmt.Sprintf("SYN storm: %d SYN/s for %s at %d sleeping groups (one service each), each SYN from its own address:port in %s; one node",
		rate, stormFor, groupCount, c.Net.StormSources()),
		fmt.Sprintf("sent %d SYNs in %s: %.0f/s achieved (%d send errors)", sent.Sent, sent.Elapsed.Round(10*time.Millisecond), sent.Rate(), sent.Failed),
		fmt.Sprintf("scale-ups per group (Nomad scaling events to count 1): %s; error events %d; zeroscale_wakes_total +%.0f",
			strings.Join(perGroup, ", "), errored, delta("zeroscale_wakes_total")),
		fmt.Sprintf("after the storm began: Scale calls %s, gates open %s (first / p50 / last, %d groups); tasks running %d/%d, the last at %s",
			spread(scaledAt), spread(openedAt), len(openedAt), running, groupCount, allRunning.Round(100*time.Millisecond)),
		fmt.Sprintf("gate: SYNs dropped at parked addresses %.0f, wake reports %.0f (suppressed %.0f), captured %.0f, over the capture limit %.0f",
			gate("parked_syn_dropped"), gate("wake_reported"), gate("wake_suppressed"), gate("syn_captured"), gate("syn_capture_limit")),
		fmt.Sprintf("drops: ring buffer full %.0f, events dropped in userspace (channel full) %.0f, captures dropped (per-address list full) %.0f",
			gate("ringbuf_full"), gate("events_dropped_userspace"), delta("zeroscale_syn_captures_dropped_total")),
		fmt.Sprintf("captured SYNs replayed: passed %.0f, already connected %.0f, fallback to retransmit %.0f, too old %.0f",
			delta(`zeroscale_syn_replays_total{result="passed"}`), delta(`zeroscale_syn_replays_total{result="already_connected"}`),
			delta(`zeroscale_syn_replays_total{result="fallback_retransmit"}`), delta(`zeroscale_syn_replays_total{result="too_old"}`)),
		fmt.Sprintf("real client, connect → first bytes: at the storm's start %s / %s (p50 / max, %d/%d served), halfway %s / %s (%d/%d served); with no storm %s",
			ms(percentile(startLat, 50)), ms(percentile(startLat, 100)), len(startLat), clients,
			ms(percentile(midLat, 50)), ms(percentile(midLat, 100)), len(midLat), clients, ms(quiet)),
		fmt.Sprintf("gate per packet under the storm (kernel run-time stats of the tc gate, which runs on the veth and on lo): %d ns mean over %d runs, of which the first second %d ns over %d runs",
			runsStorm.PerRun().Nanoseconds(), runsStorm.Runs, runsFirstSecond.PerRun().Nanoseconds(), runsFirstSecond.Runs),
		fmt.Sprintf("  per SYN, less lo's traffic at its rate before the storm (%.0f runs/s, %d ns each): %d ns",
			float64(background.Runs)/quietFor.Seconds(), background.PerRun().Nanoseconds(), perSYN.Nanoseconds()),
		fmt.Sprintf("plugin CPU during the storm: %.1f s in %s (%.0f%% of a core)", cpu, sent.Elapsed.Round(100*time.Millisecond),
			100*cpu/sent.Elapsed.Seconds()),
	)
	for _, err := range append(startErrs, midErrs...) {
		b.Logf("real client: %v", err)
	}
	for n, groups := range upsPerGroup {
		if n > 1 {
			b.Errorf("%d group(s) scaled up %d times in one storm: concurrent SYNs must cause one Scale call", groups, n)
		}
	}
}

// spread is the first, median and last of ds, in seconds.
func spread(ds []time.Duration) string {
	sec := func(d time.Duration) string { return fmt.Sprintf("%.1fs", d.Seconds()) }
	return fmt.Sprintf("%s / %s / %s", sec(percentile(ds, 0)), sec(percentile(ds, 50)), sec(percentile(ds, 100)))
}

// pick takes n groups spread over all, from the offset-th on.
func pick(groups []harness.SleepingGroup, offset, n int) []netip.AddrPort {
	var out []netip.AddrPort
	for i := range n {
		out = append(out, groups[(offset+i*len(groups)/n)%len(groups)].Addrs[0])
	}
	return out
}

// connectAll connects to each address after delay, all at once, from the
// client namespace, and returns a function that waits for them: the times
// from connect to the first bytes of the answer, and the failures.
func connectAll(c *harness.Cluster, addrs []netip.AddrPort, delay time.Duration) func() ([]time.Duration, []error) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var took []time.Duration
	var errs []error
	for _, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(delay)
			d, err := firstBytes(c, addr)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			took = append(took, d)
		}()
	}
	return func() ([]time.Duration, []error) {
		wg.Wait()
		return took, errs
	}
}

// firstBytes is wakeOne for a goroutine: it returns the error.
func firstBytes(c *harness.Cluster, addr netip.AddrPort) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	began := time.Now()
	conn, err := c.Net.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return 0, fmt.Errorf("connect to %s: %w", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	if _, err := io.ReadAtLeast(conn, buf, 1); err != nil {
		return 0, fmt.Errorf("read from %s: %w", addr, err)
	}
	return time.Since(began), nil
}

// waitRunning waits until every group runs its task, and returns how many
// do and when the last one was first seen running (polled every second).
func waitRunning(b *testing.B, c *harness.Cluster, groups []harness.SleepingGroup, since time.Time, timeout time.Duration) (int, time.Duration) {
	b.Helper()
	waiting := map[string]bool{}
	for _, g := range groups {
		waiting[g.Job] = true
	}
	var last time.Duration
	deadline := time.Now().Add(timeout)
	for len(waiting) > 0 && time.Now().Before(deadline) {
		for job := range waiting {
			st, _, err := c.API.Jobs().ScaleStatus(job, nil)
			if err != nil {
				b.Fatalf("scale status of %s: %v", job, err)
			}
			if st.TaskGroups["web"].Running >= 1 {
				delete(waiting, job)
				last = time.Since(since)
			}
		}
		time.Sleep(time.Second)
	}
	if len(waiting) > 0 {
		b.Logf("%d groups not running after %s\n%s", len(waiting), timeout, c.Diagnose(b))
	}
	return len(groups) - len(waiting), last
}

// exposition is one scrape of the plugin's /metrics.
type exposition string

func scrape(b *testing.B, addr string) exposition {
	b.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		b.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		b.Fatalf("metrics: %v", err)
	}
	return exposition(body)
}

// value is a series' value, or the sum over a metric's series when given
// a bare name; 0 when absent.
func (e exposition) value(series string) float64 {
	pattern := `(?m)^` + regexp.QuoteMeta(series) + ` ([0-9.e+-]+)$`
	if !strings.Contains(series, "{") {
		pattern = `(?m)^` + regexp.QuoteMeta(series) + `(?:\{[^}]*\})? ([0-9.e+-]+)$`
	}
	var total float64
	for _, m := range regexp.MustCompile(pattern).FindAllStringSubmatch(string(e), -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		total += v
	}
	return total
}

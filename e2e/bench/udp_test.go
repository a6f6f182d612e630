package bench

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/e2e/harness"
)

// UDP wakes beside TCP wakes: one dnsmasq serving DNS on TCP and UDP at one
// port, both gated, woken in turn by a dig over UDP and a dig over TCP, with
// replay on (the held datagram or SYN replayed once the server has bound
// its port) and off (the client's own retry: dig's after 1 s, the kernel's
// SYN retransmit after 1 s).

// BenchmarkZeroscaleUDP is the "udp" section: ZS_BENCH_ONLY selects it
// like BenchmarkZeroscale's sections, and it prints a table of its own.
func BenchmarkZeroscaleUDP(b *testing.B) {
	if b.N > 1 {
		b.Skip("run with -benchtime 1x: each measurement sets its own repetitions")
	}
	if only := os.Getenv("ZS_BENCH_ONLY"); only != "" && !slices.Contains(strings.Split(only, ","), "udp") {
		b.Skip("ZS_BENCH_ONLY leaves the udp section out")
	}
	var t table
	udpWakeLatency(b, &t)
	t.print()
}

// udpWakes is how many wakes of each kind a cluster times.
const udpWakes = 5

// udpRetry is dig's retry interval where replay is off: as long as the
// kernel's first SYN retransmit.
const udpRetry = time.Second

// udpSamples are one cluster's dig times: awake (dig's own cost), and wakes.
type udpSamples struct {
	awakeUDP, awakeTCP []time.Duration
	wakeUDP, wakeTCP   []time.Duration
}

func udpWakeLatency(b *testing.B, t *table) {
	began := time.Now()
	results := map[bool]udpSamples{}
	for _, replay := range []bool{true, false} {
		measured := b.Run(fmt.Sprintf("udp_wake_replay_%v", replay), func(b *testing.B) {
			c := harness.NewCluster(b, harness.ClusterOptions{PluginConfig: fmt.Sprintf("syn_replay = %v\n", replay)})
			addr := c.Net.HostAddr
			port := harness.FreeTCPUDPPort(b, addr)
			c.RunUDPJob(b, harness.UDPJob{Name: "dns", Addr: addr, Port: port, Idle: "3s",
				Protocols: []string{"tcp", "udp"}, TCPCheck: true})
			results[replay] = measureUDPWakes(b, c, addr, port, replay)
		})
		if !measured {
			b.Fatalf("UDP wakes with syn_replay = %v not measured", replay)
		}
	}
	on, off := results[true], results[false]
	base := percentile(on.wakeTCP, 50)
	row := func(name string, ds []time.Duration) string {
		return fmt.Sprintf("%-52s %8s %8s   %.2f×", name, ms(percentile(ds, 50)), ms(percentile(ds, 100)),
			float64(percentile(ds, 50))/float64(base))
	}
	rows := []string{fmt.Sprintf("%-52s %8s %8s   %s", "", "p50", "max", "p50 ÷ tcp replay on"),
		row("awake, no wake: dig (udp)", on.awakeUDP),
		row("awake, no wake: dig +tcp", on.awakeTCP),
		row("tcp (dig +tcp connect) replay on", on.wakeTCP),
		row("udp (dig, one try) replay on", on.wakeUDP),
		row("tcp (dig +tcp) replay off (SYN retransmit)", off.wakeTCP),
		row(fmt.Sprintf("udp (dig, retry every %v) replay off (client retry)", udpRetry), off.wakeUDP),
		"the awake rows are dig's own cost (process start-up, nsenter) that every row carries",
	}
	t.section(fmt.Sprintf("UDP wake: dig from the client namespace → answer from a sleeping dnsmasq (TCP and UDP gated on one port, idle_timeout 3s), "+
		"%d wakes over UDP and %d over TCP per cluster, alternating, one cluster with replay on and one off; %s in all",
		udpWakes, udpWakes, time.Since(began).Round(time.Second)), rows...)
}

// measureUDPWakes times dig against the awake server, then lets the group
// sleep and wakes it with a dig, udpWakes times over UDP and as many over
// TCP, alternating which comes first.
func measureUDPWakes(b *testing.B, c *harness.Cluster, addr netip.Addr, port int, replay bool) udpSamples {
	var out udpSamples
	udpOpts := []string{"+tries=1", "+timeout=20"}
	if !replay {
		udpOpts = []string{"+tries=5", fmt.Sprintf("+timeout=%d", int(udpRetry.Seconds()))}
	}
	tcpOpts := []string{"+tcp", "+tries=1", "+timeout=20"}
	for range udpWakes {
		for _, opts := range [][]string{udpOpts, tcpOpts} {
			took, _, err := c.DigShort(addr, port, 30*time.Second, opts...)
			if err != nil {
				b.Fatalf("dig the awake server: %v", err)
			}
			if slices.Contains(opts, "+tcp") {
				out.awakeTCP = append(out.awakeTCP, took)
			} else {
				out.awakeUDP = append(out.awakeUDP, took)
			}
		}
	}
	for i := range 2 * udpWakes {
		tcp := (i+i/2)%2 == 1 // udp tcp | tcp udp | udp tcp …
		opts := udpOpts
		if tcp {
			opts = tcpOpts
		}
		c.WaitDesired(b, "dns", "dns", 0, 120*time.Second)
		c.WaitNoneRunning(b, "dns", 60*time.Second)
		time.Sleep(wakeSettle)
		took, _, err := c.DigShort(addr, port, 60*time.Second, opts...)
		if err != nil {
			b.Fatalf("wake %d (%v): %v\n%s", i, opts, err, c.Diagnose(b))
		}
		if tcp {
			out.wakeTCP = append(out.wakeTCP, took)
		} else {
			out.wakeUDP = append(out.wakeUDP, took)
		}
		c.WaitDesired(b, "dns", "dns", 1, 60*time.Second)
	}
	b.Logf("replay %v: UDP wakes %v; TCP wakes %v; awake UDP %v, TCP %v", replay,
		roundAll(out.wakeUDP, time.Millisecond), roundAll(out.wakeTCP, time.Millisecond),
		roundAll(out.awakeUDP, time.Millisecond), roundAll(out.awakeTCP, time.Millisecond))
	return out
}

package bpf

import "fmt"

// counterNames follows enum counter in c/zeroscale.c.
var counterNames = []string{
	"packets",
	"not_tcp",
	"malformed",
	"fragments",
	"miss",
	"open",
	"parked_syn_dropped",
	"parked_passed",
	"wake_reported",
	"wake_suppressed",
	"wake_denied",
	"syn_captured",
	"syn_capture_limit",
	"ringbuf_full",
	"rst_sent",
	"rst_failed",
	"moved_passed",
	"listen_events",
	"check_connections",
	"counted_connections",
	"replay_passed",
	"replay_no_listener",
	"replay_connected",
	"replay_unparseable",
	"check_syn_passed",
	"datagrams_open",
	"datagrams_counted",
	"datagrams_ignored",
	"parked_datagrams_dropped",
	"datagrams_held",
	"datagram_hold_limit",
	"datagrams_too_long",
	"datagrams_read_in_netns",
}

// Counters sums the kernel's global counters over CPUs, by name.
func (g *Gate) Counters() (map[string]uint64, error) {
	out := make(map[string]uint64, len(counterNames))
	for i, name := range counterNames {
		var perCPU []uint64
		if err := g.objs.Counters.Lookup(uint32(i), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		var total uint64
		for _, v := range perCPU {
			total += v
		}
		out[name] = total
	}
	out["events_dropped_userspace"] = g.DroppedEvents()
	out["established_clamped"] = g.clampedReads.Load()
	return out, nil
}

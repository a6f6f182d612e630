package scaling

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

// SYN capture and replay.

// capture keeps the first SYN of each client connection attempt to a parked
// address, for replay once the service listens.
func (a *Agent) capture(g *group, ev bpf.Event) {
	if !a.cfg.SYNReplay || len(ev.Frame) == 0 {
		return
	}
	list := g.captures[ev.Key]
	if ev.Key.Proto == bpf.UDP {
		// Each held datagram is a message of its own (the kernel holds a
		// few per flow), replayed whole or not at all.
		if len(ev.Frame) < ev.FrameLen {
			return
		}
	} else {
		for _, c := range list {
			if c.source == ev.Source {
				return
			}
		}
	}
	if len(list) >= a.cfg.MaxCapturesPerKey {
		list = list[1:]
		a.cfg.Metrics.CapturesDropped.Inc()
	}
	g.captures[ev.Key] = append(list, capture{source: ev.Source, frame: ev.Frame, ifindex: ev.Ifindex, at: ev.Time})
}

type capture struct {
	source  netip.AddrPort
	frame   []byte
	ifindex int
	at      time.Time
}

func (a *Agent) expireCaptures(g *group, now time.Time) {
	for k, list := range g.captures {
		keep := list[:0]
		for _, c := range list {
			if now.Sub(c.at) <= a.cfg.SYNMaxAge {
				keep = append(keep, c)
			} else {
				a.cfg.Metrics.Replays.WithLabelValues("too_old").Inc()
			}
		}
		if len(keep) == 0 {
			delete(g.captures, k)
		} else {
			g.captures[k] = keep
		}
	}
}

// replayAll replays whatever is still captured for g (another node may have
// declared the group awake before this one saw the listener).
func (a *Agent) replayAll(g *group) {
	var keys []bpf.Key
	for k := range g.captures {
		// An address still held (waiting for a forward to where the group
		// woke) keeps its SYNs for then.
		if g.wantGate[k] != bpf.StateParked {
			keys = append(keys, k)
		}
	}
	if len(keys) > 0 {
		a.replayKeys(g, keys, 0)
	}
}

// replayKeys re-injects the captured SYNs of keys off the loop, then records
// the wake's latencies in a scaling event when gateLatency is known.
func (a *Agent) replayKeys(g *group, keys []bpf.Key, gateLatency time.Duration) {
	type replayItem struct {
		key bpf.Key
		c   capture
		via *bpf.ReplayTarget
		// elsewhere: no instance of the group serves this address; its
		// clients are refused once the group is healthy on another node.
		elsewhere bool
	}
	live := g.liveKeys()
	var batch []replayItem
	var into []Netns // namespaces the batch replays into
	for _, k := range keys {
		via, ns := a.replayTarget(g, k)
		if via != nil && ns.Path != "" && len(g.captures[k]) > 0 && !slices.Contains(into, ns) {
			into = append(into, ns)
		}
		_, here := live[k]
		here = here || g.readyKeys[k] || a.forwarding(k)
		for _, c := range g.captures[k] {
			batch = append(batch, replayItem{k, c, via, !here})
		}
		delete(g.captures, k)
	}
	var firstMono time.Duration
	first := "SYN" // what the client sent first, for the scaling event
	if g.wake != nil {
		firstMono = g.wake.firstMono
		if g.wake.datagram {
			first = "datagram"
		}
	}
	id, node := g.id, a.node
	maxAge := a.cfg.SYNMaxAge
	now := a.clock.Now()
	a.cfg.Spawn(func() {
		// A SYN routed into a container before its bridge port forwards
		// loses its ARP request and waits a second for the next one.
		for _, ns := range into {
			if err := a.cfg.Namespaces.WaitForwarding(ns, forwardingWait); err != nil {
				a.logger.Debug("replaying before the bridge forwards into the allocation", "group", id.String(), "error", err)
			}
		}
		counts := map[string]int{}
		var accepted time.Duration // kernel time of the first accepted replay
		for _, item := range batch {
			if now.Sub(item.c.at) > maxAge {
				counts["too_old"]++
				continue
			}
			if a.cfg.Gate.SYNPassed(item.key, item.c.source) {
				counts["already_connected"]++
				continue
			}
			result := a.replayOne(item.c, item.via)
			if result == "fallback_retransmit" && item.elsewhere {
				result = "woke_elsewhere"
			}
			counts[result]++
			if result == "passed" && accepted == 0 {
				accepted = bpf.MonotonicNow()
			}
		}
		for r, n := range counts {
			a.cfg.Metrics.Replays.WithLabelValues(r).Add(float64(n))
		}
		if gateLatency <= 0 {
			return
		}
		msg := fmt.Sprintf("zeroscale: awake; first %s → gate open %s", first, gateLatency.Round(time.Millisecond))
		meta := map[string]any{"zeroscale": "awake", "node": node, "gate_open_seconds": gateLatency.Seconds()}
		if accepted > 0 && firstMono > 0 {
			replayLatency := accepted - firstMono
			a.cfg.Metrics.WakeLatency.WithLabelValues("replay_accepted").Observe(replayLatency.Seconds())
			msg += fmt.Sprintf("; first %s → replayed %s accepted %s", first, first, replayLatency.Round(time.Millisecond))
			meta["replay_accepted_seconds"] = replayLatency.Seconds()
		}
		if len(batch) > 0 {
			var parts []string
			for _, r := range []string{"passed", "already_connected", "fallback_retransmit", "woke_elsewhere", "unsupported", "too_old"} {
				if counts[r] > 0 {
					parts = append(parts, fmt.Sprintf("%d %s", counts[r], strings.ReplaceAll(r, "_", " ")))
				}
			}
			msg += "; replayed: " + strings.Join(parts, ", ")
		}
		if err := a.cfg.Nomad.Scale(id, nil, msg, false, meta); err != nil {
			a.logger.Warn("cannot record the wake latency", "group", id.String(), "error", err)
		}
		if a.cfg.OnAwake != nil {
			a.cfg.OnAwake(id, msg)
		}
	})
}

// replayOne re-injects one SYN, retrying briefly while the listener is
// being set up (the listen event fires just before it is hashed). via names
// the listener's namespace behind a port mapping.
func (a *Agent) replayOne(c capture, via *bpf.ReplayTarget) string {
	deadline := time.Now().Add(time.Second)
	for {
		res, err := a.cfg.Gate.Replay(c.frame, c.ifindex, via)
		switch {
		case err != nil:
			if errors.Is(err, bpf.ErrReplayUnsupported) {
				return "unsupported"
			}
			a.logger.Debug("SYN replay failed; the client will retransmit", "client", c.source.String(), "error", err)
			return "fallback_retransmit"
		case res == bpf.ReplayPassed:
			return "passed"
		case res == bpf.ReplayConnected:
			return "already_connected"
		case res == bpf.ReplayNoListener && time.Now().Before(deadline):
			time.Sleep(2 * time.Millisecond)
		default:
			return "fallback_retransmit"
		}
	}
}

package scaling

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// desiredGate is the gate state each local address of g should have now.
// Parking is allowed only while the gate is attached everywhere it must be
// and the job is not stopped; a moved address refuses for MovedFor and is
// then forgotten (invariant 1: no entry outlives its reason).
func (a *Agent) desiredGate(g *group) map[bpf.Key]bpf.State {
	out := make(map[bpf.Key]bpf.State)
	if g.policy == nil || g.stoodDown {
		return out
	}
	live := g.liveKeys()
	parked := g.parkedKeys()
	now := a.clock.Now()
	switch g.state.Phase {
	case consul.PhaseParking, consul.PhaseAsleep, consul.PhaseWaking:
		for k := range parked {
			out[k] = bpf.StateParked
		}
		for k := range live {
			out[k] = bpf.StateParked
		}
		for k := range g.readyKeys {
			out[k] = bpf.StateOpen
		}
	default:
		for k := range live {
			out[k] = bpf.StateOpen
		}
		elsewhere := g.passingElsewhere()
		for k := range parked {
			if _, ok := live[k]; ok {
				continue
			}
			// A parked address the group did not come back at: once the
			// group runs healthy elsewhere, refuse at once for a while so
			// clients re-resolve instead of waiting for timeouts.
			switch {
			case elsewhere && now.Sub(g.awakeAt) < a.cfg.MovedFor:
				out[k] = bpf.StateMoved
			case now.Sub(g.awakeAt) < g.policy.WakeTimeout:
				out[k] = bpf.StateOpen
			}
		}
	}
	gateOK := a.gateUsable() == nil
	for k, s := range out {
		if !a.isLocal(k.Addr) {
			delete(out, k)
			continue
		}
		if (a.cfg.DryRun || !gateOK) && s != bpf.StateOpen {
			out[k] = bpf.StateOpen // watch activity, gate nothing
		}
	}
	return out
}

// syncGate makes the kernel's entries for g match desiredGate, diffing
// against what the kernel holds (read back each pass), not against memory.
func (a *Agent) syncGate(g *group) {
	want := a.desiredGate(g)
	for k, s := range want {
		if owner, ok := a.keyIndex[k]; ok && owner != g.id {
			continue // another group claims the address; theirs to set
		}
		if cur, ok := a.kernel[k]; ok && cur == s {
			continue
		}
		var err error
		switch s {
		case bpf.StateOpen:
			err = a.cfg.Gate.Open(k)
		case bpf.StateParked:
			err = a.cfg.Gate.Park(k)
		case bpf.StateMoved:
			err = a.cfg.Gate.Move(k)
		}
		if err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
			a.logger.Warn("cannot set the gate", "address", k.String(), "state", s.String(), "error", err)
			continue
		}
		a.logger.Debug("gate", "group", g.id.String(), "address", k.String(), "state", s.String())
		a.kernel[k] = s
	}
	for k := range g.keys() {
		if _, wanted := want[k]; wanted || a.keyIndex[k] != g.id {
			continue
		}
		if _, ok := a.kernel[k]; ok {
			a.forget(k)
		}
	}
	// Acknowledge parking once every local address of the group is closed.
	if g.state.Phase == consul.PhaseParking && g.parkedEpoch != g.state.Epoch {
		for k, s := range want {
			if s == bpf.StateParked && a.kernel[k] != bpf.StateParked {
				return
			}
		}
		g.parkedEpoch = g.state.Epoch
	}
}

// forget removes k from the kernel.
func (a *Agent) forget(k bpf.Key) {
	if err := a.cfg.Gate.Forget(k); err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
		a.logger.Warn("cannot remove a gate entry", "address", k.String(), "error", err)
		return
	}
	delete(a.kernel, k)
}

// localReport is this node's activity summary for g.
func (a *Agent) localReport(g *group, now time.Time) consul.ActivityReport {
	r := consul.ActivityReport{Node: a.node, ParkedEpoch: g.parkedEpoch, Reported: now}
	for k := range g.keys() {
		if _, ok := a.kernel[k]; !ok || a.keyIndex[k] != g.id {
			continue
		}
		act, err := a.cfg.Gate.Activity(k)
		if err != nil {
			continue
		}
		r.Established += max(act.Established, 0)
		r.Checks += act.Checks
		if act.LastActive.After(r.LastActive) {
			r.LastActive = act.LastActive
		}
	}
	return r
}

// hasEntries tells whether this node gates any address of g.
func (a *Agent) hasEntries(g *group) bool {
	for k := range g.keys() {
		if _, ok := a.kernel[k]; ok {
			return true
		}
	}
	return false
}

// publishActivity sends this node's report when it changed (at most every
// ReportInterval), at once for a parking acknowledgement, and as a heartbeat.
func (a *Agent) publishActivity(g *group, now time.Time) {
	if g.policy == nil || (!a.hasEntries(g) && g.parkedEpoch == g.lastReport.ParkedEpoch) {
		return
	}
	r := a.localReport(g, now)
	prev := g.lastReport
	changed := r.Established != prev.Established || !r.LastActive.Equal(prev.LastActive)
	urgent := r.ParkedEpoch != prev.ParkedEpoch
	due := now.Sub(g.lastReportT) >= a.cfg.HeartbeatInterval ||
		changed && now.Sub(g.lastReportT) >= a.cfg.ReportInterval
	if !urgent && !due {
		return
	}
	if err := a.cfg.Cluster.PublishActivity(g.id.Key(), r); err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("consul").Inc()
		a.logger.Warn("cannot publish activity", "group", g.id.String(), "error", err)
		return
	}
	g.lastReport, g.lastReportT = r, now
	// Keep our own view current without waiting for the watch.
	if a.reports[g.id.Key()] == nil {
		a.reports[g.id.Key()] = make(map[string]consul.ActivityReport)
	}
	a.reports[g.id.Key()][a.node] = r
}

// syncPlaceholders keeps a stand-in registered for each local address of a
// sleeping group, and removes it once the real instance is healthy again.
func (a *Agent) syncPlaceholders(g *group, now time.Time) {
	want := make(map[string]consul.Placeholder)
	if g.policy != nil && g.sleeping() && !a.cfg.DryRun && !g.stoodDown {
		for _, ad := range g.state.Addresses {
			ap, err := netip.ParseAddrPort(ad.Addr)
			if err != nil || !a.isLocal(ap.Addr()) {
				continue
			}
			p := consul.Placeholder{Service: ad.Service, Address: ap.Addr().Unmap(), Port: ap.Port(),
				Namespace: g.id.Namespace, Job: g.id.Job, Group: g.id.Group}
			want[p.ID()] = p
		}
	}
	if g.state.Phase == consul.PhaseAwake && g.policy != nil && !g.stoodDown {
		// Also clean up stand-ins left by an earlier process on this node.
		for _, insts := range g.placeholder {
			for _, inst := range insts {
				if inst.Node != a.node {
					continue
				}
				p := consul.Placeholder{Service: inst.Service, Address: inst.Address, Port: inst.Port,
					Namespace: g.id.Namespace, Job: g.id.Job, Group: g.id.Group}
				if _, ok := g.registered[p.ID()]; !ok {
					g.registered[p.ID()] = p
				}
			}
		}
		// Keep each until the real instance passes its checks (or the wake
		// has had its time), so DNS never goes empty in between.
		elsewhere := g.passingElsewhere()
		for id, p := range g.registered {
			if !elsewhere && !a.realInstanceHealthy(g, p) && now.Sub(g.awakeAt) < g.policy.WakeTimeout {
				want[id] = p
			}
		}
	}
	for id, p := range want {
		if _, ok := g.registered[id]; ok {
			continue
		}
		if err := a.cfg.Cluster.RegisterPlaceholder(p); err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("consul").Inc()
			a.logger.Warn("cannot register placeholder", "placeholder", p.String(), "error", err)
			continue
		}
		g.registered[id] = p
	}
	for id, p := range g.registered {
		if _, ok := want[id]; ok {
			continue
		}
		if err := a.cfg.Cluster.DeregisterPlaceholder(p); err != nil {
			a.logger.Warn("cannot remove placeholder", "placeholder", p.String(), "error", err)
			continue
		}
		delete(g.registered, id)
	}
}

// passingElsewhere tells whether the group runs healthy at an address it
// was not parked at (it woke on another port or node).
func (g *group) passingElsewhere() bool {
	parked := g.parkedKeys()
	for k, inst := range g.liveKeys() {
		if _, ok := parked[k]; !ok && inst.Passing {
			return true
		}
	}
	return false
}

func (a *Agent) realInstanceHealthy(g *group, p consul.Placeholder) bool {
	for _, inst := range g.instances[p.Service] {
		if inst.Passing && inst.Address == p.Address && inst.Port == p.Port {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------- SYN replay

// capture keeps the first SYN of each client connection attempt to a parked
// address, for replay once the service listens.
func (a *Agent) capture(g *group, ev bpf.Event) {
	if !a.cfg.SYNReplay || len(ev.Frame) == 0 {
		return
	}
	list := g.captures[ev.Key]
	for _, c := range list {
		if c.source == ev.Source {
			return
		}
	}
	if len(list) >= a.cfg.MaxCapturesPerKey {
		list = list[1:]
		a.cfg.Metrics.CapturesDropped.Inc()
	}
	g.captures[ev.Key] = append(list, capture{source: ev.Source, frame: ev.Frame, ifindex: ev.Ifindex, at: ev.Time})
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
		keys = append(keys, k)
	}
	if len(keys) > 0 {
		a.replayKeys(g, keys, 0)
	}
}

// replayKeys re-injects the captured SYNs of keys off the loop, then records
// the wake's latencies in a scaling event when gateLatency is known.
func (a *Agent) replayKeys(g *group, keys []bpf.Key, gateLatency time.Duration) {
	var batch []struct {
		key bpf.Key
		c   capture
	}
	for _, k := range keys {
		for _, c := range g.captures[k] {
			batch = append(batch, struct {
				key bpf.Key
				c   capture
			}{k, c})
		}
		delete(g.captures, k)
	}
	var firstMono time.Duration
	if g.wake != nil {
		firstMono = g.wake.firstMono
	}
	id, node := g.id, a.node
	maxAge := a.cfg.SYNMaxAge
	now := a.clock.Now()
	a.cfg.Spawn(func() {
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
			result := a.replayOne(item.c)
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
		msg := fmt.Sprintf("zeroscale: awake; first SYN → gate open %s", gateLatency.Round(time.Millisecond))
		meta := map[string]any{"zeroscale": "awake", "node": node, "gate_open_seconds": gateLatency.Seconds()}
		if accepted > 0 && firstMono > 0 {
			replayLatency := accepted - firstMono
			a.cfg.Metrics.WakeLatency.WithLabelValues("replay_accepted").Observe(replayLatency.Seconds())
			msg += fmt.Sprintf("; first SYN → replayed SYN accepted %s", replayLatency.Round(time.Millisecond))
			meta["replay_accepted_seconds"] = replayLatency.Seconds()
		}
		if len(batch) > 0 {
			var parts []string
			for _, r := range []string{"passed", "already_connected", "fallback_retransmit", "unsupported", "too_old"} {
				if counts[r] > 0 {
					parts = append(parts, fmt.Sprintf("%d %s", counts[r], strings.ReplaceAll(r, "_", " ")))
				}
			}
			msg += "; replayed SYNs: " + strings.Join(parts, ", ")
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
// being set up (the listen event fires just before it is hashed).
func (a *Agent) replayOne(c capture) string {
	deadline := time.Now().Add(time.Second)
	for {
		res, err := a.cfg.Gate.Replay(c.frame, c.ifindex)
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

package scaling

import (
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The gate entries of a group, applied against the kernel's read-back.

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
		for k, inst := range live {
			out[k] = bpf.StateOpen
			if a.startingHere(g, k, inst, parked, now) {
				out[k] = bpf.StateParked // its clients wait for it, as in a wake
			}
		}
		elsewhere := g.passingElsewhere()
		for k := range parked {
			if _, ok := live[k]; ok {
				continue
			}
			// A parked address the group did not come back at forwards
			// to where it woke. Until a forward is in place its clients
			// are held; without one, once the group runs healthy
			// elsewhere, it refuses at once for a while so clients
			// re-resolve instead of waiting for timeouts.
			woke := now.Sub(g.wokeAt())
			switch {
			case a.forwarding(k):
				out[k] = bpf.StateOpen
			case g.readyHere[k]:
				// It did come back here: this node saw its new allocation
				// ready at k, and Consul's view has yet to list it.
				out[k] = bpf.StateOpen
			case k.Proto == bpf.UDP && !elsewhere && !g.wokeFromSleep.IsZero() && now.Sub(g.wokeFromSleep) < g.policy.WakeTimeout:
				// The group is up (its TCP side, or another address), but
				// no UDP socket is bound here yet: its datagrams stay held
				// for replay while watchBinds looks, at most wake_timeout.
				out[k] = bpf.StateParked
			case a.cfg.Forwarder != nil:
				if !elsewhere && woke < forwardHold {
					out[k] = bpf.StateParked
				}
				// Otherwise no entry: the forward has ended (or could not be
				// set), nothing listens there, and the kernel refuses.
			case elsewhere && woke < a.cfg.MovedFor:
				out[k] = bpf.StateMoved
			case woke < g.policy.WakeTimeout:
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

// startingHere tells whether a parked local address of a group another node
// declared awake is still waiting for its own instance here: registered
// but neither listening (as this node saw) nor passing its checks. Its
// clients are held, not refused, until this node sees it ready (a listener
// or passing checks), at most wake_timeout after the wake (invariant 3).
func (a *Agent) startingHere(g *group, k bpf.Key, inst consul.Instance, parked map[bpf.Key]consul.Address, now time.Time) bool {
	if _, wasParked := parked[k]; !wasParked || !a.isLocal(k.Addr) || g.readyHere[k] {
		return false
	}
	if inst.Passing {
		return false
	}
	return !g.wokeFromSleep.IsZero() && now.Sub(g.wokeFromSleep) < g.policy.WakeTimeout
}

// holding tells whether an awake group still holds a local address for its
// instance here (see startingHere).
func (g *group) holding() bool {
	if g.state.Phase != consul.PhaseAwake {
		return false
	}
	for _, s := range g.wantGate {
		if s == bpf.StateParked {
			return true
		}
	}
	return false
}

// syncGate makes the kernel's entries for g match desiredGate, diffing
// against what the kernel holds (read back each pass), not against memory.
func (a *Agent) syncGate(g *group) {
	want := a.desiredGate(g)
	g.wantGate = want
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
	r := consul.ActivityReport{Node: a.node, ParkedEpoch: g.parkedEpoch, Reported: now, Ungated: g.ungated}
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

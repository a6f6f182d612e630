package scaling

import (
	"cmp"
	"net/netip"
	"slices"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Wake anywhere: a parked address the group did not come back at forwards,
// with the kernel's NAT, to where it woke (another port of this node, or
// another node), for ForwardGrace after the wake. Connections forwarded in
// that time live on in conntrack after the forward ends; new clients find
// the new address in Consul, where the placeholder gives way to it.

// forwardHold bounds how long clients of an address the group did not come
// back at are held, waiting for the new instance to show in Consul so the
// forward can be set (invariant 3: a running group's address is not left
// parked beyond a short bound). Beyond it the address opens and, with
// nothing listening, refuses: clients re-resolve.
const forwardHold = 10 * time.Second

// Forwarder installs the forwards; implemented over nftables by
// internal/nat. Forwards reads them back from the kernel.
type Forwarder interface {
	Forward(from, to netip.AddrPort) error
	Unforward(from netip.AddrPort) error
	Forwards() (map[netip.AddrPort]Forward, error)
}

// Forward is one installed forward as the kernel holds it.
type Forward struct {
	To netip.AddrPort
	// Connections forwarded so far.
	Connections uint64
}

// wokeAt is when the group last woke: after a restart of the plugin, the
// awake record's own time.
func (g *group) wokeAt() time.Time {
	if !g.awakeAt.IsZero() {
		return g.awakeAt
	}
	return g.state.Since
}

// desiredForwards are the forwards g needs on this node: each local parked
// address without an instance of its own goes to where the group runs now,
// for ForwardGrace after the wake.
func (a *Agent) desiredForwards(g *group) map[bpf.Key]netip.AddrPort {
	if a.cfg.Forwarder == nil || g.policy == nil || g.stoodDown || g.state.Phase != consul.PhaseAwake ||
		a.clock.Now().Sub(g.wokeAt()) >= a.cfg.ForwardGrace {
		return nil
	}
	live := g.liveKeys()
	out := make(map[bpf.Key]netip.AddrPort)
	for k, parked := range g.parkedKeys() {
		// The kernel's NAT forwards TCP connections; a datagram to an
		// address the group left is refused ("port unreachable").
		if _, ok := live[k]; ok || !a.isLocal(k.Addr) || k.Proto != bpf.TCP {
			continue
		}
		if to, ok := a.forwardTarget(g, k, parked.Service, live); ok {
			out[k] = to
		}
	}
	return out
}

// forwardTarget picks the instance a parked address forwards to: of the
// same service (a group's other services speak other protocols) and
// address family; passing in Consul first, then the one on the node that
// declared the group ready; this node's before others (no hop); then by
// address, so every pass picks the same.
func (a *Agent) forwardTarget(g *group, from bpf.Key, service string, live map[bpf.Key]consul.Instance) (netip.AddrPort, bool) {
	type candidate struct {
		key  bpf.Key
		rank int
	}
	var cands []candidate
	for k, inst := range live {
		if inst.Service != service || k.Addr.Is4() != from.Addr.Is4() || k.Proto != from.Proto {
			continue
		}
		rank := 0
		if !inst.Passing {
			rank += 4
			if inst.Node != g.state.By {
				rank += 8 // nothing says this one is ready
			}
		}
		if !a.isLocal(k.Addr) {
			rank++
		}
		cands = append(cands, candidate{k, rank})
	}
	if len(cands) == 0 {
		return netip.AddrPort{}, false
	}
	slices.SortFunc(cands, func(x, y candidate) int {
		return cmp.Or(cmp.Compare(x.rank, y.rank), x.key.Addr.Compare(y.key.Addr), cmp.Compare(x.key.Port, y.key.Port))
	})
	if cands[0].rank >= 8 {
		return netip.AddrPort{}, false
	}
	k := cands[0].key
	return netip.AddrPortFrom(k.Addr, k.Port), true
}

// forwarding tells whether k forwards now, as the kernel holds it.
func (a *Agent) forwarding(k bpf.Key) bool {
	_, ok := a.forwards[k]
	return ok
}

// observeForwards reads the installed forwards back once per pass.
func (a *Agent) observeForwards() {
	if a.cfg.Forwarder == nil {
		return
	}
	fwds, err := a.cfg.Forwarder.Forwards()
	if err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("forward").Inc()
		a.logger.Warn("cannot read the forwards back", "error", err)
		return
	}
	a.forwards = make(map[bpf.Key]netip.AddrPort, len(fwds))
	seen := make(map[bpf.Key]uint64, len(fwds))
	for from, f := range fwds {
		k := bpf.KeyFrom(from)
		a.forwards[k] = f.To
		seen[k] = f.Connections
		// A forward installed anew (or to a new target) counts from 0.
		if last := a.forwardedSeen[k]; f.Connections >= last {
			a.cfg.Metrics.ForwardedConnections.Add(float64(f.Connections - last))
		} else {
			a.cfg.Metrics.ForwardedConnections.Add(float64(f.Connections))
		}
	}
	a.forwardedSeen = seen
	a.cfg.Metrics.Forwards.Set(float64(len(fwds)))
}

// syncForwards installs g's forwards that the kernel lacks and returns the
// addresses whose forward is new. Ends are applied by endForwards.
func (a *Agent) syncForwards(g *group) []bpf.Key {
	var added []bpf.Key
	for k, to := range a.desiredForwards(g) {
		if cur, ok := a.forwards[k]; ok && cur == to {
			continue
		}
		from := netip.AddrPortFrom(k.Addr, k.Port)
		if err := a.cfg.Forwarder.Forward(from, to); err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("forward").Inc()
			a.logger.Warn("cannot forward a parked address to where the group woke; it refuses instead",
				"group", g.id.String(), "from", from, "to", to, "error", err)
			continue
		}
		a.forwards[k] = to
		a.logger.Info("forwarding a parked address to where the group woke", "group", g.id.String(),
			"from", from, "to", to, "for", (a.cfg.ForwardGrace - a.clock.Now().Sub(g.wokeAt())).Round(time.Second).String())
		added = append(added, k)
	}
	return added
}

// endForwards removes forwards no group wants any more (their grace is
// over, or the group sleeps again). Connections they forwarded go on in
// conntrack. Right after a start the groups are not all known yet.
func (a *Agent) endForwards(now time.Time) {
	if a.cfg.Forwarder == nil || len(a.forwards) == 0 || !a.policiesRead || now.Sub(a.started) < a.cfg.OrphanGrace {
		return
	}
	wanted := make(map[bpf.Key]bool)
	for _, g := range a.groups {
		for k := range a.desiredForwards(g) {
			wanted[k] = true
		}
	}
	for k, to := range a.forwards {
		if wanted[k] {
			continue
		}
		if err := a.cfg.Forwarder.Unforward(netip.AddrPortFrom(k.Addr, k.Port)); err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("forward").Inc()
			a.logger.Warn("cannot end a forward", "from", k.String(), "error", err)
			continue
		}
		a.logger.Info("forward ended", "from", k.String(), "to", to)
		delete(a.forwards, k)
	}
}

// forwardAndReplay installs g's new forwards, opens their addresses and
// replays the SYNs held there through them.
func (a *Agent) forwardAndReplay(g *group) {
	if a.cfg.Forwarder == nil {
		return
	}
	added := a.syncForwards(g)
	if len(added) == 0 {
		return
	}
	a.syncGate(g)
	var held []bpf.Key
	for _, k := range added {
		if len(g.captures[k]) > 0 {
			held = append(held, k)
		}
	}
	if len(held) > 0 {
		a.replayKeys(g, held, 0)
	}
}

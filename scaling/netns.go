package scaling

import (
	"net/netip"
	"slices"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

// Services behind a port mapping: an allocation with its own network
// namespace (docker, Nomad bridge mode) serves the node address through
// NAT, so its sockets, its listener and a replayed SYN all live at the
// mapped port in that namespace.

// allocNetns is where one allocation of a group has its sockets.
type allocNetns struct {
	ns     Netns
	seen   time.Time
	listen netip.Addr // the listener's own address there, when seen
}

// netnsRecheck is how often an allocation whose namespace was not found is
// looked for again.
const netnsRecheck = 30 * time.Second

// mappedPort is the port the service at k listens on inside its namespace.
func (g *group) mappedPort(k bpf.Key) uint16 {
	service := ""
	if inst, ok := g.liveKeys()[k]; ok {
		service = inst.Service
	} else if addr, ok := g.parkedKeys()[k]; ok {
		service = addr.Service
	}
	for _, s := range g.spec.Services {
		if s.MappedPort > 0 && (s.Name == service || service == "" && s.StaticPort == int(k.Port)) {
			return uint16(s.MappedPort)
		}
	}
	return k.Port
}

// mappedPorts are the `to` ports of g's services.
func (g *group) mappedPorts() map[uint16]bool {
	out := make(map[uint16]bool)
	for _, s := range g.spec.Services {
		if s.MappedPort > 0 {
			out[uint16(s.MappedPort)] = true
		}
	}
	return out
}

// findNetns looks up the namespaces of g's local allocations that have none
// recorded yet (after a restart, or when the listener was missed).
func (a *Agent) findNetns(g *group, now time.Time) {
	if a.cfg.Namespaces == nil || g.policy == nil || !g.spec.OwnNetwork {
		return
	}
	liveKeys := g.liveKeys()
	for k, inst := range liveKeys {
		if inst.AllocID == "" || !a.isLocal(k.Addr) || g.netns[inst.AllocID] != nil {
			continue
		}
		if now.Sub(g.netnsLooked[inst.AllocID]) < netnsRecheck {
			continue
		}
		g.netnsLooked[inst.AllocID] = now
		ns, ok, err := a.cfg.Namespaces.OfAlloc(inst.AllocID)
		if err != nil {
			a.logger.Debug("cannot find an allocation's network namespace", "group", g.id.String(), "alloc", inst.AllocID, "error", err)
			continue
		}
		if ok {
			g.netns[inst.AllocID] = &allocNetns{ns: ns, seen: now}
			a.logger.Debug("allocation has its own network namespace", "group", g.id.String(), "alloc", inst.AllocID, "netns", ns.Inode)
		}
	}
	// Forget allocations that are gone: not registered and not seen lately.
	live := make(map[string]bool)
	for _, inst := range liveKeys {
		live[inst.AllocID] = true
	}
	for alloc, an := range g.netns {
		if !live[alloc] && now.Sub(an.seen) > 2*time.Minute+g.policy.WakeTimeout {
			delete(g.netns, alloc)
		}
	}
	for alloc, at := range g.netnsLooked {
		if !live[alloc] && now.Sub(at) > netnsRecheck {
			delete(g.netnsLooked, alloc)
		}
	}
}

// netnsListener records the namespace of a listener outside the node's own
// namespace if it belongs to a gated group, and maps its port at once, so
// the connections the wake lets in are counted. It returns that group.
func (a *Agent) netnsListener(l listenSeen) *group {
	if a.cfg.Namespaces == nil || l.ev.Netns == 0 || l.ev.Netns == a.cfg.Namespaces.Host() || l.alloc == "" {
		return nil
	}
	id, err := a.allocGroup(l.alloc)
	if err != nil {
		return nil
	}
	g := a.groups[id]
	if g == nil || g.policy == nil || !g.spec.OwnNetwork || !g.mappedPorts()[l.ev.Key.Port] && !g.listensOnNodePort(l.ev.Key.Port) {
		return nil
	}
	ns := Netns{Inode: l.ev.Netns, ID: -1}
	if named, err := a.cfg.Namespaces.OfProcess(l.ev.PID); err == nil && named.Inode == l.ev.Netns {
		ns = named
	} else if err != nil {
		a.logger.Debug("cannot name a listener's network namespace; no replay into it", "pid", l.ev.PID, "error", err)
	}
	g.netns[l.alloc] = &allocNetns{ns: ns, seen: l.at, listen: l.ev.Key.Addr}
	a.syncMappedPorts()
	return g
}

// listensOnNodePort: a port mapped without `to` keeps its number inside.
func (g *group) listensOnNodePort(port uint16) bool {
	for k := range g.keys() {
		if k.Port == port {
			return true
		}
	}
	return false
}

// allocOfKey is the allocation whose namespace serves k: the registered
// instance's, or while the group wakes, the newest allocation seen
// listening that was not the one parked.
func (a *Agent) allocOfKey(g *group, k bpf.Key) *allocNetns {
	live := g.liveKeys()
	if inst, ok := live[k]; ok && inst.AllocID != "" {
		if an := g.netns[inst.AllocID]; an != nil {
			return an
		}
	}
	if _, parked := g.parkedKeys()[k]; !parked {
		return nil
	}
	owners := make(map[string]bool)
	for _, inst := range live {
		owners[inst.AllocID] = true
	}
	var newest *allocNetns
	for alloc, an := range g.netns {
		if owners[alloc] || slices.Contains(g.state.Allocs, alloc) {
			continue
		}
		if newest == nil || an.seen.After(newest.seen) {
			newest = an
		}
	}
	return newest
}

// desiredMappedPorts maps each local, gated address of every group to the
// mapped port in the namespace of the allocation serving it.
func (a *Agent) desiredMappedPorts() map[bpf.NsPort]bpf.Key {
	out := make(map[bpf.NsPort]bpf.Key)
	for _, g := range a.groups {
		if g.policy == nil || g.stoodDown || len(g.netns) == 0 {
			continue
		}
		for k := range g.keys() {
			if _, gated := a.kernel[k]; !gated || a.keyIndex[k] != g.id || !a.isLocal(k.Addr) {
				continue
			}
			if an := a.allocOfKey(g, k); an != nil {
				// A port maps for both protocols: one entry, TCP's key.
				out[bpf.NsPort{Netns: an.ns.Inode, Port: g.mappedPort(k)}] = k.WithProto(bpf.TCP)
			}
		}
	}
	return out
}

// syncMappedPorts applies desiredMappedPorts against the kernel's read-back,
// and watches every group's mapped ports for listeners.
func (a *Agent) syncMappedPorts() {
	if a.cfg.Namespaces == nil {
		return
	}
	for _, g := range a.groups {
		if g.policy == nil {
			continue
		}
		for port := range g.mappedPorts() {
			if err := a.cfg.Gate.WatchListenPort(port); err != nil {
				a.logger.Warn("cannot watch a mapped port for listeners", "port", port, "error", err)
			}
		}
	}
	have, err := a.cfg.Gate.MappedPorts()
	if err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
		a.logger.Warn("cannot read the mapped ports back", "error", err)
		return
	}
	want := a.desiredMappedPorts()
	for p, k := range want {
		if cur, ok := have[p]; ok && cur == k {
			continue
		}
		if err := a.cfg.Gate.MapPort(p, k); err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
			a.logger.Warn("cannot map a port to its service address", "port", p.String(), "address", k.String(), "error", err)
			continue
		}
		a.logger.Debug("mapped port", "port", p.String(), "address", k.String())
	}
	for p := range have {
		if _, ok := want[p]; ok {
			continue
		}
		if err := a.cfg.Gate.UnmapPort(p); err != nil {
			a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
			a.logger.Warn("cannot unmap a port", "port", p.String(), "error", err)
		}
	}
}

// replayTarget is where a SYN captured for k must find its listener: inside
// the namespace of the allocation that serves k, at the mapped port; nil
// when k is served in the node's namespace.
func (a *Agent) replayTarget(g *group, k bpf.Key) (*bpf.ReplayTarget, Netns) {
	if a.forwarding(k) {
		return &bpf.ReplayTarget{Forward: true}, Netns{}
	}
	an := a.allocOfKey(g, k)
	if an == nil || an.ns.ID < 0 {
		return nil, Netns{}
	}
	return &bpf.ReplayTarget{NetnsID: an.ns.ID, Addr: an.listen, Port: g.mappedPort(k)}, an.ns
}

// forwardingWait bounds how long a replay into an allocation's namespace
// waits for the bridge to forward there: beyond it, the client's own
// retransmit arrives anyway.
const forwardingWait = time.Second

package scaling

import (
	"net/netip"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Placeholder instances that keep a sleeping service's address in Consul.

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

package scaling

import (
	"slices"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
)

// The reconciler pass: observe (observe.go), decide (decide.go), apply.

// Tick is one reconciler pass: observe (the kernel's entries, each group's
// count and record), decide and apply, then the timers of the sleep and
// wake protocol, and the removal of entries no group owns.
func (a *Agent) Tick() {
	now := a.clock.Now()
	a.refreshLocal(false)
	a.observeKernel()
	a.observeForwards()
	a.retryPending(now)
	a.observeRecords(now)
	if len(a.unresolved) > 0 && now.Sub(a.unresolvedRetry) >= a.cfg.NomadPollInterval {
		a.unresolvedRetry = now
		for service, insts := range a.unresolved {
			a.OnInstances(service, insts)
		}
	}
	for len(a.recentListens) > 0 && now.Sub(a.recentListens[0].at) > 30*time.Second {
		a.recentListens = a.recentListens[1:]
	}
	for _, g := range a.groups {
		if g.policy != nil && a.specReadDue(g, now) {
			a.refreshSpec(g, now) // the job may have changed its services
		}
		a.reconcile(g, now)
		a.checkProtocols(g, now, false)
		a.publishActivity(g, now)
		if a.leader && g.policy != nil && !g.stoodDown {
			a.leaderDuties(g, now)
		}
		a.wakeDuties(g, now)
		a.watchBinds(g)
		a.expireCaptures(g, now)
		a.forwardAndReplay(g)
		a.syncGate(g)
		a.syncPlaceholders(g, now)
		a.findNetns(g, now)
	}
	a.endForwards(now)
	a.removeOrphans(now)
	a.syncMappedPorts()
	a.followServices()
	a.updateGauges()
}

// reconcile brings one group's record in line with Nomad's count, and its
// gate and placeholders in line with the record.
func (a *Agent) reconcile(g *group, now time.Time) {
	if g.policy == nil {
		return
	}
	a.pushUnsynced(g)
	a.observeNomad(g, now, false)
	stopped := g.nomad.err == nil && g.nomad.status.Stopped || g.nomad.gone
	if stopped != g.stoodDown {
		g.stoodDown = stopped
		if stopped {
			a.logger.Info("job stopped: gate opened and placeholders removed", "group", g.id.String())
		}
	}
	if g.stoodDown {
		return
	}
	r, ok := decideRecord(a.recordViewOf(g, now))
	if !ok {
		return
	}
	a.logger.Info("repairing the group's record", "group", g.id.String(), "from", g.state.Phase, "to", r.next.Phase, "reason", r.why)
	a.cfg.Metrics.Repairs.WithLabelValues(string(r.next.Phase)).Inc()
	if err := a.change(g, r.next); err != nil {
		a.logger.Debug("the group's record changed meanwhile", "group", g.id.String(), "error", err)
		return
	}
	if r.takeOver {
		a.takeOverWake(g, now)
	}
}

func (a *Agent) recordViewOf(g *group, now time.Time) recordView {
	v := recordView{
		now: now, record: g.state, recordLost: g.recordLost, nomad: g.nomad, policy: *g.policy,
		known: g.knownAddresses(), wakingHere: g.wake != nil && g.wake.winner,
		clientsWaiting: g.lastConnect.After(g.state.Since), wakeTakeover: a.cfg.WakeTakeover,
		settle: a.cfg.ScaleSettle, parkAbandon: 2 * a.cfg.ParkAckTimeout,
	}
	for _, inst := range g.liveKeys() {
		if inst.AllocID == "" {
			continue
		}
		if !slices.Contains(v.allocs, inst.AllocID) {
			v.allocs = append(v.allocs, inst.AllocID)
		}
		if inst.Passing && slices.Contains(g.state.Allocs, inst.AllocID) {
			v.oldAllocsRunning = true
		}
	}
	return v
}

// removeOrphans forgets kernel entries that no gated group wants: a policy
// removed while the plugin was down, an address a group no longer has, an
// expired "moved" entry. They are kept for OrphanGrace after start, until
// the policies and records have been read.
func (a *Agent) removeOrphans(now time.Time) {
	if !a.policiesRead || now.Sub(a.started) < a.cfg.OrphanGrace {
		return
	}
	wanted := make(map[bpf.Key]bool)
	for _, g := range a.groups {
		for k := range g.wantGate { // as this pass's syncGate computed it
			wanted[k] = true
		}
	}
	for k, s := range a.kernel {
		if wanted[k] {
			continue
		}
		a.logger.Info("removing a gate entry no gated group owns", "address", k.String(), "state", s.String())
		a.cfg.Metrics.Repairs.WithLabelValues("orphan_entry").Inc()
		a.forget(k)
	}
}

package scaling

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Wakes that no connect started (a schedule, a dependency, an operator),
// and groups woken together (wake_with).

// wakeFor wakes g for a reason other than a connect: the record first
// (check-and-set, so one node does it), then the scale-up.
func (a *Agent) wakeFor(g *group, now time.Time, reason string) {
	if g.policy == nil || g.stoodDown || g.state.Phase != consul.PhaseAsleep {
		return
	}
	if a.cfg.DryRun {
		a.cfg.Metrics.DryRunDecisions.WithLabelValues("wake").Inc()
		return
	}
	next := g.state
	next.Phase, next.Since, next.FirstSYN, next.Reason = consul.PhaseWaking, now, time.Time{}, reason
	if err := a.change(g, next); err != nil {
		return // another node wakes it
	}
	g.wake = &wakeAttempt{started: now, deadline: now.Add(g.policy.WakeTimeout), winner: true, why: reason}
	a.logger.Info("waking group", "group", g.id.String(), "reason", reason, "wake_count", g.policy.WakeCount)
	a.tryScaleUp(g, now)
	a.wakeDependencies(g, now)
}

// wakeDependencies wakes the groups g wakes with that sleep, and brings
// back those that are being parked.
func (a *Agent) wakeDependencies(g *group, now time.Time) {
	for _, id := range g.policy.WakeWith {
		d := a.groups[id]
		if d == nil || d.policy == nil {
			a.reportOnce(g, "wake-with-unknown-"+id.String(), true, fmt.Sprintf(
				"zeroscale: wake_with names %s/%s, which has no zeroscale policy; it is not woken with this group", id.Job, id.Group))
			continue
		}
		switch d.state.Phase {
		case consul.PhaseAsleep:
			a.wakeFor(d, now, "wake_with of "+g.id.Job+"/"+g.id.Group)
		case consul.PhaseParking:
			a.undoParking(d, "wake_with of "+g.id.Job+"/"+g.id.Group)
		}
	}
}

// depsWaiting lists the groups g wakes with that are not awake yet (those
// without a policy are never put to sleep, so they count as awake).
func (a *Agent) depsWaiting(g *group) (waiting []string) {
	for _, id := range g.policy.WakeWith {
		if d := a.groups[id]; d != nil && d.policy != nil && d.state.Phase != consul.PhaseAwake {
			waiting = append(waiting, id.Job+"/"+id.Group)
		}
	}
	return waiting
}

// holdUntilDepsReady keeps g's ready addresses closed while a group it wakes
// with is not awake yet; it tells whether it did.
func (a *Agent) holdUntilDepsReady(g *group, keys []bpf.Key, how string) bool {
	waiting := a.depsWaiting(g)
	if len(waiting) == 0 {
		return false
	}
	for _, k := range keys {
		if !slices.Contains(g.pendingReady, k) {
			g.pendingReady = append(g.pendingReady, k)
		}
	}
	g.pendingHow = how
	a.logger.Info("ready, waiting for the groups it wakes with", "group", g.id.String(), "waiting_for", strings.Join(waiting, ", "))
	return true
}

// releaseDependents opens the groups that waited for d.
func (a *Agent) releaseDependents(d *group) {
	for _, g := range a.groups {
		if g.policy == nil || len(g.pendingReady) == 0 || !slices.Contains(g.policy.WakeWith, d.id) {
			continue
		}
		if len(a.depsWaiting(g)) == 0 {
			keys, how := g.pendingReady, g.pendingHow
			g.pendingReady = nil
			a.markReady(g, keys, how+", after the groups it wakes with")
		}
	}
}

// neededBy lists the groups that wake with d and are not asleep: d does not
// sleep while they are up.
func (a *Agent) neededBy(d *group) []string {
	var out []string
	for _, g := range a.groups {
		if g.policy == nil || !slices.Contains(g.policy.WakeWith, d.id) {
			continue
		}
		if g.state.Phase != consul.PhaseAsleep {
			out = append(out, g.id.Job+"/"+g.id.Group)
		}
	}
	slices.Sort(out)
	return out
}

// refuseWakeWithCycles drops wake_with from groups in a cycle, with an error
// event naming it: each group then sleeps and wakes on its own.
func (a *Agent) refuseWakeWithCycles() {
	cycles := make(map[*group][]GroupID)
	for _, g := range a.groups {
		if g.policy == nil || len(g.policy.WakeWith) == 0 {
			continue
		}
		if path := a.cycleFrom(g.id, g.id, nil); path != nil {
			cycles[g] = path
		}
	}
	for g, path := range cycles {
		p := *g.policy
		p.WakeWith = nil
		g.policy = &p
		names := make([]string, len(path))
		for i, id := range path {
			names[i] = id.Job + "/" + id.Group
		}
		a.reportOnce(g, fmt.Sprintf("wake-with-cycle-%d", g.policyIndex), true,
			"zeroscale: invalid policy: scaling.policy.zeroscale.wake_with: a cycle ("+strings.Join(names, " → ")+
				"); wake_with is ignored until it is fixed")
	}
}

// cycleFrom finds a path of wake_with edges from at back to start.
func (a *Agent) cycleFrom(start, at GroupID, path []GroupID) []GroupID {
	path = append(path, at)
	g := a.groups[at]
	if g == nil || g.policy == nil || len(path) > len(a.groups)+1 {
		return nil
	}
	for _, next := range g.policy.WakeWith {
		if next == start {
			return append(path, next)
		}
		if slices.Contains(path, next) {
			continue
		}
		if found := a.cycleFrom(start, next, path); found != nil {
			return found
		}
	}
	return nil
}

package scaling

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Going to sleep: idle detection, parking and the scale-down (the leader's duties).

// leaderDuties runs on the elected node: spot idle groups, drive parking to
// its end, and unstick wakes whose node vanished.
func (a *Agent) leaderDuties(g *group, now time.Time) {
	w, inWindow := g.policy.inWindow(now)
	switch g.state.Phase {
	case consul.PhaseAwake:
		a.idleCheck(g, now)
	case consul.PhaseAsleep:
		if inWindow {
			a.wakeFor(g, now, "awake_during "+w.Source)
		}
	case consul.PhaseParking:
		if inWindow && !g.state.Forced {
			a.undoParking(g, "awake_during "+w.Source)
			return
		}
		a.parkingProgress(g, now)
	case consul.PhaseWaking:
		// The waking node handles its deadline; if it died, the leader does.
		if g.wake == nil && now.Sub(g.state.Since) > g.policy.WakeTimeout+30*time.Second {
			a.wakeTimedOut(g, now)
		}
	}
}

// union combines every node's fresh report with this node's own reading.
func (a *Agent) union(g *group, now time.Time) (established int64, lastActive time.Time, reports map[string]consul.ActivityReport) {
	reports = make(map[string]consul.ActivityReport)
	for node, r := range a.reports[g.id.Key()] {
		if node == a.node || now.Sub(r.Reported) > a.cfg.ReportMaxAge {
			continue
		}
		reports[node] = r
	}
	reports[a.node] = a.localReport(g, now)
	for _, r := range reports {
		established += r.Established
		if r.LastActive.After(lastActive) {
			lastActive = r.LastActive
		}
	}
	return established, lastActive, reports
}

func (a *Agent) idleCheck(g *group, now time.Time) {
	if a.sleepRequest(g, now) || now.Before(g.nextIdleCheck) {
		return
	}
	if _, in := g.policy.inWindow(now); in {
		return
	}
	if users := a.neededBy(g); len(users) > 0 {
		return // groups that wake with it are up
	}
	established, lastActive, _ := a.union(g, now)
	since := lastActive
	for _, t := range []time.Time{g.firstSeen, g.awakeAt} {
		if t.After(since) {
			since = t
		}
	}
	idle := now.Sub(since)
	if established > 0 || idle < g.policy.IdleTimeout {
		return
	}
	a.startParking(g, now, "idle for "+idle.Round(time.Second).String(), false)
}

// sleepRequest parks g now when an operator asked for it since it last woke
// (outside its awake_during windows, which win).
func (a *Agent) sleepRequest(g *group, now time.Time) bool {
	at := g.nomad.status.SleepRequested
	if at.IsZero() || !at.After(g.wokeAt()) || !at.After(g.sleepRequested) {
		return false
	}
	g.sleepRequested = at
	if w, in := g.policy.inWindow(now); in {
		a.reportOnce(g, fmt.Sprintf("sleep-request-%d", at.UnixNano()), false,
			"zeroscale: sleep request ignored: inside awake_during "+w.Source)
		return false
	}
	a.startParking(g, now, "sleep requested by an operator", true)
	return true
}

func (a *Agent) startParking(g *group, now time.Time, reason string, forced bool) {
	if err := a.gateUsable(); err != nil {
		// Invariant 4: a SYN could not reach a gate, so nothing could wake it.
		a.reportOnce(g, "gate-unusable-"+err.Error(), true, "zeroscale: idle, but not parked: "+err.Error())
		g.nextIdleCheck = now.Add(30 * time.Second)
		return
	}
	// Look again here, right before parking: the cadence may have looked
	// before the service bound its sockets.
	a.checkProtocols(g, now, true)
	if _, _, reports := a.union(g, now); ungatedSocket(reports) != "" {
		// Its clients speak a protocol the gate ignores: parked, they
		// would find nothing and wake nothing. Fail towards serving.
		socket := ungatedSocket(reports)
		msg := protocolsMessage(g, socket)
		a.logger.Error(msg, "group", g.id.String())
		a.reportOnce(g, fmt.Sprintf("ungated-%s-%d", socket, g.policyIndex), true, msg)
		g.nextIdleCheck = now.Add(30 * time.Second)
		return
	}
	status, err := a.cfg.Nomad.ScaleStatus(g.id)
	if err != nil {
		a.logger.Warn("cannot read the group's count", "group", g.id.String(), "error", err)
		a.cfg.Metrics.Errors.WithLabelValues("nomad").Inc()
		g.nextIdleCheck = now.Add(10 * time.Second)
		return
	}
	if active, err := a.cfg.Nomad.DeploymentActive(g.id); err == nil && active {
		// Nomad would refuse Scale(0) until the deployment ends (after a
		// wake, that is the wake's own): wait for it with the gate open
		// rather than close it and be refused.
		a.logger.Debug("idle, but a deployment runs; parking when it ends", "group", g.id.String())
		g.nextIdleCheck = now.Add(a.cfg.DeploymentPoll)
		return
	}
	if status.Desired > g.policy.WakeCount {
		// Above wake_count the Nomad Autoscaler owns the count.
		a.logger.Debug("idle but scaled above wake_count; left to the autoscaler", "group", g.id.String(), "count", status.Desired)
		g.nextIdleCheck = now.Add(g.policy.IdleTimeout)
		return
	}
	var addrs []consul.Address
	var allocs []string
	for k, inst := range g.liveKeys() {
		// Records hold addresses; each is gated for every protocol.
		if ad := (consul.Address{Service: inst.Service, Addr: k.AddrPort().String(), Node: inst.Node}); !slices.Contains(addrs, ad) {
			addrs = append(addrs, ad)
		}
		if inst.AllocID != "" && !slices.Contains(allocs, inst.AllocID) {
			allocs = append(allocs, inst.AllocID)
		}
	}
	sort.Slice(addrs, func(i, j int) bool { return addrs[i].Addr < addrs[j].Addr })
	sort.Strings(allocs)
	if len(addrs) == 0 {
		// Nothing registered in Consul: nothing could wake it again.
		a.logger.Debug("idle but no registered address to gate", "group", g.id.String(), "count", status.Desired)
		if status.Running > 0 && !g.reported["no-address"] {
			// Consul hides what a token may not read instead of refusing
			// it: a token without read on the services sees exactly this.
			g.reported["no-address"] = true
			a.logger.Warn(`idle, but Consul shows no instance of the running group, so it cannot sleep; `+
				`if the job registers its services in Consul, the plugin's Consul token needs `+
				`service_prefix "" { policy = "read" } and node_prefix "" { policy = "read" }`,
				"group", g.id.String(), "running", status.Running)
		}
		g.nextIdleCheck = now.Add(10 * time.Second)
		return
	}
	if a.cfg.DryRun {
		a.logger.Info("dry run: would scale the group to 0", "group", g.id.String(), "reason", reason)
		a.cfg.Metrics.DryRunDecisions.WithLabelValues("sleep").Inc()
		g.nextIdleCheck = now.Add(g.policy.IdleTimeout)
		return
	}
	next := consul.GroupState{
		Phase: consul.PhaseParking, Epoch: g.state.Epoch + 1, Since: now, Addresses: addrs, Allocs: allocs, Reason: reason,
		Forced: forced,
	}
	if err := a.swap(g, next); err != nil {
		a.logger.Debug("could not start parking", "group", g.id.String(), "error", err)
		return
	}
	g.parkDeadline = now.Add(a.cfg.ParkAckTimeout)
	a.logger.Info("parking idle group", "group", g.id.String(), "reason", reason, "addresses", len(addrs))
}

// parkingProgress waits until every node serving an address has closed its
// gate, re-checks activity, then commits: state asleep first, so a connect
// racing with the scale-down becomes a wake, then Scale(0).
func (a *Agent) parkingProgress(g *group, now time.Time) {
	if g.parkDeadline.IsZero() {
		g.parkDeadline = g.state.Since.Add(a.cfg.ParkAckTimeout)
	}
	_, _, reports := a.union(g, now)
	var missing []string
	busy := ""
	for _, node := range nodesOf(g.state.Addresses, a.node) {
		r, ok := reports[node]
		if !ok || r.ParkedEpoch != g.state.Epoch {
			missing = append(missing, node)
			continue
		}
		if r.Established > 0 || r.LastActive.After(g.state.Since.Add(-g.policy.IdleTimeout)) {
			busy = node
		}
	}
	switch {
	case busy != "" && !g.state.Forced:
		a.undoParking(g, "traffic on "+busy+" while parking")
	case len(missing) > 0 && now.After(g.parkDeadline):
		a.undoParking(g, "parking not acknowledged by "+strings.Join(missing, ", "))
	case len(missing) > 0:
		// wait
	case now.Sub(g.state.Since) < a.cfg.TickInterval:
		// Let connections that slipped in before the gate closed establish.
	default:
		a.commitSleep(g, now)
	}
}

func nodesOf(addrs []consul.Address, self string) []string {
	set := map[string]bool{}
	for _, ad := range addrs {
		n := ad.Node
		if n == "" {
			n = self
		}
		set[n] = true
	}
	if len(set) == 0 {
		set[self] = true
	}
	return slices.Sorted(maps.Keys(set))
}

func (a *Agent) undoParking(g *group, reason string) {
	next := g.state
	next.Phase, next.Reason = consul.PhaseAwake, reason
	next.Since = a.clock.Now()
	if err := a.change(g, next); err != nil {
		return
	}
	a.cfg.Metrics.ParkingUndone.WithLabelValues(g.id.Namespace, g.id.Job, g.id.Group).Inc()
	a.logger.Info("parking undone", "group", g.id.String(), "reason", reason)
	// Do not try again at once: traffic restarts the idle clock anyway, and
	// a node that did not answer gets time to recover.
	g.nextIdleCheck = a.clock.Now().Add(30 * time.Second)
}

func (a *Agent) commitSleep(g *group, now time.Time) {
	asleep := g.state
	asleep.Phase, asleep.Since = consul.PhaseAsleep, now
	if err := a.swap(g, asleep); err != nil {
		return // someone woke it meanwhile
	}
	zero := 0
	msg := "zeroscale: " + g.state.Reason
	err := a.cfg.Nomad.Scale(g.id, &zero, msg, false, map[string]any{"zeroscale": "sleep", "node": a.node})
	g.nomad.at = time.Time{} // whatever the answer, read the count again
	if err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("scale_down").Inc()
		back := g.state
		back.Phase, back.Since, back.Reason = consul.PhaseAwake, now, "scale-down failed: "+err.Error()
		awakeAt := g.awakeAt // it never slept: the idle clock goes on
		if serr := a.change(g, back); serr != nil {
			a.logger.Warn("cannot revert a failed scale-down", "group", g.id.String(), "error", serr)
		}
		g.awakeAt = awakeAt
		if IsDeploymentBlock(err) {
			// A deployment started after the check: wait for it to end.
			a.logger.Info("scale-down blocked by an active deployment; parking when it ends", "group", g.id.String())
			g.nextIdleCheck = now.Add(a.cfg.DeploymentPoll)
			return
		}
		a.reportOnce(g, "scale-down-"+err.Error(), true, "zeroscale: could not scale to 0: "+err.Error())
		g.nextIdleCheck = now.Add(g.policy.IdleTimeout)
		return
	}
	a.cfg.Metrics.Sleeps.WithLabelValues(g.id.Namespace, g.id.Job, g.id.Group).Inc()
	a.logger.Info("group asleep", "group", g.id.String(), "reason", g.state.Reason)
}

// publishActivity sends this node's report when it changed (at most every
// ReportInterval), at once for a parking acknowledgement, and as a heartbeat.
func (a *Agent) publishActivity(g *group, now time.Time) {
	if g.policy == nil || (!a.hasEntries(g) && g.parkedEpoch == g.lastReport.ParkedEpoch) {
		return
	}
	r := a.localReport(g, now)
	prev := g.lastReport
	changed := r.Established != prev.Established || !r.LastActive.Equal(prev.LastActive) || r.Ungated != prev.Ungated
	urgent := r.ParkedEpoch != prev.ParkedEpoch
	// A sleeping group's activity decides nothing until it wakes (then it
	// reports at once: its last report is old): no heartbeat, so a
	// thousand sleeping groups cost Consul no writes.
	heartbeat := g.state.Phase != consul.PhaseAsleep && now.Sub(g.lastReportT) >= a.cfg.HeartbeatInterval
	due := heartbeat || changed && now.Sub(g.lastReportT) >= a.cfg.ReportInterval
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

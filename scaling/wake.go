package scaling

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Waking: the connect, the scale-up, readiness and the gate opening.

type wakeAttempt struct {
	firstSYN  time.Time     // wall time of the first SYN
	firstMono time.Duration // kernel time of the first SYN (this node)
	from      netip.AddrPort
	started   time.Time
	deadline  time.Time
	winner    bool // this node won the wake and owns the Scale call
	scaled    bool
	calling   bool // tryScaleUp's calls to Nomad are under way
	nextTry   time.Time
	tries     int
	failed    string // a non-retryable failure, reported once
	why       string // what started it, for the scaling event
	datagram  bool   // a UDP datagram started it, not a SYN
}

// onConnect handles a SYN dropped at a parked address of g.
func (a *Agent) onConnect(g *group, ev bpf.Event) {
	if g.policy == nil || g.stoodDown {
		return
	}
	now := a.clock.Now()
	g.lastConnect = now
	switch g.state.Phase {
	case consul.PhaseAwake:
		a.syncGate(g) // our gate lags the cluster state
	case consul.PhaseParking:
		if g.state.Forced {
			return // an operator's sleep: the SYN waits and wakes it after
		}
		a.undoParking(g, packetWord(ev.Key)+" from "+ev.Source.String()+" while parking")
		if g.state.Phase == consul.PhaseAsleep { // lost to the commit: wake instead
			a.onConnect(g, ev)
		}
	case consul.PhaseAsleep:
		a.startWake(g, ev, now, true)
	case consul.PhaseWaking:
		if g.wake != nil && g.wake.firstMono == 0 && ev.Mono != 0 {
			g.wake.firstMono = ev.Mono
		}
	}
}

// startWake records the wake (check-and-set, so one node wins) and scales
// the group up.
func (a *Agent) startWake(g *group, ev bpf.Event, now time.Time, mayRetry bool) {
	next := g.state
	next.Phase, next.Since, next.FirstSYN = consul.PhaseWaking, now, ev.Time
	next.Reason = packetWord(ev.Key) + " from " + ev.Source.String()
	if a.cfg.DryRun {
		a.cfg.Metrics.DryRunDecisions.WithLabelValues("wake").Inc()
		return
	}
	err := a.change(g, next)
	if errors.Is(err, consul.ErrConflict) {
		// Another node's wake, or a record wiped or restored from an older
		// snapshot: re-derive the record from Nomad, and wake if it is
		// still asleep.
		if mayRetry {
			a.observeNomad(g, now, true)
			a.reconcile(g, now)
			if g.state.Phase == consul.PhaseAsleep {
				a.startWake(g, ev, now, false)
			}
		}
		return
	}
	g.wake = &wakeAttempt{firstSYN: ev.Time, firstMono: ev.Mono, from: ev.Source, started: now,
		deadline: now.Add(g.policy.WakeTimeout), winner: true, datagram: ev.Key.Proto == bpf.UDP}
	a.logger.Info("waking group", "group", g.id.String(), "from", ev.Source, "wake_count", g.policy.WakeCount)
	a.tryScaleUp(g, now)
	a.wakeDependencies(g, now)
	a.watchBinds(g)
}

// takeOverWake makes this node the owner of a wake whose first owner left
// the count at 0, and scales the group up.
func (a *Agent) takeOverWake(g *group, now time.Time) {
	w := &wakeAttempt{firstSYN: g.lastConnect, started: now, deadline: now.Add(g.policy.WakeTimeout), winner: true}
	for _, list := range g.captures {
		for _, c := range list {
			if w.from == (netip.AddrPort{}) || c.at.Before(w.firstSYN) {
				w.firstSYN, w.from = c.at, c.source
			}
		}
	}
	g.wake = w
	a.cfg.Metrics.Repairs.WithLabelValues("wake_taken_over").Inc()
	a.logger.Info("taking over a wake that left the count at 0", "group", g.id.String())
	a.tryScaleUp(g, now)
}

// tryScaleUp scales the group to wake_count if Nomad still has it at zero.
// Nomad's two calls run off the loop and their outcome is applied on it: a
// storm waking a hundred groups at once queued them one after another (16 s
// until the last group's Scale).
func (a *Agent) tryScaleUp(g *group, now time.Time) {
	w := g.wake
	if w == nil || !w.winner || w.failed != "" || w.calling {
		return
	}
	w.tries++
	w.calling = true
	id, count := g.id, g.policy.WakeCount
	msg, meta := "zeroscale: wake on connect", map[string]any{"zeroscale": "wake", "node": a.node}
	if w.datagram {
		msg = "zeroscale: wake on datagram"
	}
	if w.why != "" {
		msg, meta["reason"] = "zeroscale: wake on "+w.why, w.why
	}
	if w.from.IsValid() {
		msg += " from " + w.from.String()
		meta["source"] = w.from.String()
	}
	a.offLoop(func() func() {
		status, readErr := a.cfg.Nomad.ScaleStatus(id)
		var scaleErr error
		scaled := readErr == nil && !status.Stopped && status.Desired == 0
		if scaled {
			scaleErr = a.cfg.Nomad.Scale(id, &count, msg, false, meta)
		}
		return func() { a.scaleUpDone(id, w, status, readErr, scaled, scaleErr) }
	})
}

// scaleUpDone applies what tryScaleUp's calls found: the count read, and
// the Scale's outcome if it called it.
func (a *Agent) scaleUpDone(id GroupID, w *wakeAttempt, status ScaleStatus, readErr error, scaled bool, scaleErr error) {
	w.calling = false
	g := a.groups[id]
	if g == nil || g.wake != w {
		return // the wake ended meanwhile (timed out, or the group released)
	}
	now := a.clock.Now()
	// A job change heard while the read was under way leaves nomadDirty
	// set: the next pass reads again.
	a.noteCount(g, status, readErr, now)
	if readErr != nil {
		w.nextTry = now.Add(backoff(w.tries))
		a.logger.Warn("cannot read the group's count; retrying", "group", g.id.String(), "error", readErr)
		return
	}
	if status.Stopped {
		// The operator stopped the job: their intent wins over the connect.
		w.failed = "the job is stopped"
		g.stoodDown = true
		a.logger.Info("connect to a stopped job; not waking it", "group", g.id.String())
		return
	}
	if !scaled {
		w.scaled = true
		w.nextTry = now.Add(2 * time.Second) // keep an eye on it: a racing scale-down may land
		// The allocation that was parked still runs and passes: the
		// scale-down never happened (a crash between the record and
		// Scale(0)), so it is ready now; no new listener will appear.
		var ready []bpf.Key
		for k, inst := range g.liveKeys() {
			if inst.Passing && slices.Contains(g.state.Allocs, inst.AllocID) {
				ready = append(ready, k)
			}
		}
		if len(ready) > 0 {
			a.markReady(g, ready, "the scale-down never happened")
		}
		return
	}
	g.nomad.at = time.Time{} // the count changed: read it again
	if scaleErr == nil {
		w.scaled = true
		w.nextTry = now.Add(2 * time.Second)
		a.cfg.Metrics.Wakes.WithLabelValues(g.id.Namespace, g.id.Job, g.id.Group).Inc()
		return
	}
	a.cfg.Metrics.Errors.WithLabelValues("scale_up").Inc()
	if Retryable(scaleErr) {
		w.nextTry = now.Add(backoff(w.tries))
		a.logger.Info("wake scale-up refused for now; retrying", "group", g.id.String(), "error", scaleErr, "retry_in", w.nextTry.Sub(now).String())
		return
	}
	w.failed = scaleErr.Error()
	a.reportOnce(g, "wake-failed-"+scaleErr.Error(), true, "zeroscale: wake failed: "+scaleErr.Error())
}

func backoff(tries int) time.Duration {
	d := 500 * time.Millisecond << min(tries, 6)
	return min(d, 15*time.Second)
}

// wakeDuties retries the scale-up and enforces wake_timeout.
func (a *Agent) wakeDuties(g *group, now time.Time) {
	w := g.wake
	if w == nil || g.state.Phase != consul.PhaseWaking || g.policy == nil {
		return
	}
	if now.After(w.deadline) {
		if w.winner {
			a.wakeTimedOut(g, now)
		}
		return
	}
	if w.winner && !w.nextTry.IsZero() && !now.Before(w.nextTry) {
		a.tryScaleUp(g, now)
	}
}

func (a *Agent) wakeTimedOut(g *group, now time.Time) {
	a.observeNomad(g, now, true)
	running := g.nomad.err == nil && g.nomad.status.Desired > 0
	msg := fmt.Sprintf("zeroscale: not ready within wake_timeout %s after the connect; ", g.policy.WakeTimeout)
	back := g.state
	back.Since = now
	if running {
		// Invariant 3: an instance is (or should be) running; an open gate
		// lets clients reach it or be refused at once, never held.
		msg += "gate opened"
		back.Phase, back.Reason = consul.PhaseAwake, "wake timed out; opened"
	} else {
		msg += "staying parked"
		back.Phase, back.Reason = consul.PhaseAsleep, "wake timed out"
	}
	if g.wake != nil && g.wake.failed != "" {
		msg += " (" + g.wake.failed + ")"
	}
	a.cfg.Metrics.Errors.WithLabelValues("wake_timeout").Inc()
	a.logger.Error(msg, "group", g.id.String())
	if err := a.cfg.Nomad.Scale(g.id, nil, msg, true, map[string]any{"zeroscale": "wake_timeout", "node": a.node}); err != nil {
		a.logger.Warn("cannot record a scaling event", "group", g.id.String(), "error", err)
	}
	g.wake = nil
	if err := a.change(g, back); err != nil {
		a.logger.Debug("wake timeout: state changed meanwhile", "group", g.id.String(), "error", err)
	}
}

// onListen handles a socket starting to listen on a watched port. A
// listener at any address of a sleeping group (the parked ones, or a new one
// if the group woke elsewhere) means it is up.
func (a *Agent) onListen(ev bpf.Event) {
	seen := listenSeen{ev: ev, at: a.clock.Now()}
	if a.cfg.ListenerAlloc != nil {
		// Resolve now: the process (and its cgroup) may be gone later.
		seen.alloc, _ = a.cfg.ListenerAlloc(ev)
	}
	a.logger.Debug("listener", "address", ev.Key.String(), "netns", ev.Netns, "pid", ev.PID, "alloc_id", seen.alloc)
	a.recentListens = append(a.recentListens, seen)
	a.netnsListener(seen)
	for _, g := range a.groups {
		a.checkListening(g, []listenSeen{seen})
	}
}

// inNodeNetns tells a listener in the node's own namespace (or from a
// program version that did not say).
func (a *Agent) inNodeNetns(ev bpf.Event) bool {
	return ev.Netns == 0 || a.cfg.Namespaces == nil || ev.Netns == a.cfg.Namespaces.Host()
}

// listensFor tells whether a listener serves the address k of g: at k
// itself (or a wildcard of its family) in the node's namespace, or at k's
// mapped port in an allocation's own namespace.
func (a *Agent) listensFor(g *group, k bpf.Key, ev bpf.Event) bool {
	if !a.inNodeNetns(ev) {
		// Only a group with its own namespaces listens outside the node's
		// (another node's agent on the same machine, in tests, would too).
		return g.spec.OwnNetwork && ev.Key.Port == g.mappedPort(k) && ev.Key.Proto == k.Proto
	}
	la := ev.Key.Addr
	return k.Port == ev.Key.Port && k.Proto == ev.Key.Proto && (la == k.Addr || la.IsUnspecified() && (la.Is6() || k.Addr.Is4()))
}

type listenSeen struct {
	ev    bpf.Event
	at    time.Time
	alloc string // the listener's Nomad allocation, "" when not one
}

// ownListener tells whether a listener belongs to an allocation the wake
// started (invariant 5): a foreign process, or the allocation that was
// running when the group parked, never opens the gate.
func (a *Agent) ownListener(g *group, l listenSeen) bool {
	if a.cfg.ListenerAlloc == nil {
		return true
	}
	if l.alloc == "" || slices.Contains(g.state.Allocs, l.alloc) {
		return false
	}
	id, err := a.allocGroup(l.alloc)
	return err == nil && id == g.id
}

// checkListening marks g ready if one of the listen events matches a local
// address of g while it sleeps.
func (a *Agent) checkListening(g *group, evs []listenSeen) {
	if g.policy == nil || g.policy.Ready != ReadyListen && !g.unchecked() || !g.sleeping() && !g.holding() || g.state.Phase == consul.PhaseParking {
		return
	}
	var ready []bpf.Key
	for k := range g.keys() {
		if !a.isLocal(k.Addr) || g.readyKeys[k] {
			continue
		}
		for _, l := range evs {
			if a.listensFor(g, k, l.ev) && a.ownListener(g, l) {
				ready = append(ready, k)
				break
			}
		}
	}
	if len(ready) > 0 {
		a.markReady(g, ready, "listening")
	}
}

// markReady opens the gate for keys that have a listener (or a healthy
// instance), replays the SYNs captured for them and marks the group awake.
func (a *Agent) markReady(g *group, keys []bpf.Key, how string) {
	if g.policy != nil && a.holdUntilDepsReady(g, keys, how) {
		return
	}
	now := a.clock.Now()
	for _, k := range keys {
		g.readyKeys[k] = true
		g.readyHere[k] = true
	}
	a.syncGate(g)
	openMono := bpf.MonotonicNow() // kernel clock, like the SYN's stamp

	var gateLatency time.Duration
	first := g.state.FirstSYN
	if g.wake != nil {
		first = g.wake.firstSYN
		if g.wake.firstMono > 0 {
			gateLatency = openMono - g.wake.firstMono
		}
	}
	if gateLatency <= 0 && !first.IsZero() {
		gateLatency = now.Sub(first)
	}
	if gateLatency > 0 {
		a.cfg.Metrics.WakeLatency.WithLabelValues("gate_open").Observe(gateLatency.Seconds())
	}
	a.replayKeys(g, keys, gateLatency)

	if g.state.Phase == consul.PhaseAwake {
		return
	}
	next := g.state
	next.Phase, next.Since = consul.PhaseAwake, now
	next.Reason = "ready (" + how + ")"
	if gateLatency > 0 {
		next.Reason += " " + gateLatency.Round(time.Millisecond).String() + " after the first SYN"
	}
	if err := a.change(g, next); err != nil {
		a.logger.Debug("the group's record changed meanwhile", "group", g.id.String(), "error", err)
	}
	a.logger.Info("group awake", "group", g.id.String(), "ready", how, "gate_open_after", gateLatency.String())
}

package scaling

import (
	"errors"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The group's record: taken from the watch or a consistent read, changed by
// check-and-set, and acted on locally while Consul is away.

// fromWatch applies a record delivered by the KV watch. A watch may deliver
// a snapshot older than what this node just wrote: KV indexes only grow, so
// anything below ours is stale. A snapshot without the record is either
// stale or a deletion; a consistent read tells which, unless the snapshot's
// newest record (newest; 0 for an empty one, which may be a wipe) is older
// than ours: then it is stale. (Many groups
// created at once each paid a read on the loop for every such snapshot;
// a deletion missed that way is found by observeRecords.)
func (a *Agent) fromWatch(g *group, st consul.GroupState, newest uint64) {
	old := g.state
	if g.unsynced && st.Index <= old.Index {
		return // this node is ahead; pushUnsynced writes its state
	}
	if st.Index == 0 && newest > 0 && old.Index > newest {
		return
	}
	if st.Index == 0 && old.Index > 0 {
		cur, err := a.cfg.Cluster.GroupState(g.id.Key())
		if err != nil {
			a.logger.Debug("cannot confirm a missing group record", "group", g.id.String(), "error", err)
			return
		}
		a.adopt(g, cur)
		return
	}
	if st.Index < old.Index || st.Index == old.Index && st.Phase == old.Phase {
		return
	}
	a.setState(g, st)
}

// adopt takes a record read consistently from Consul as the cluster's view,
// even one older than this node's copy (a snapshot restore). An absent
// record while this node holds one means it was lost: keep acting on this
// node's copy, and let the reconciler rebuild it from Nomad's count.
func (a *Agent) adopt(g *group, st consul.GroupState) {
	if g.unsynced && st.Index != 0 && st.Index <= g.state.Index {
		return // this node is ahead; pushUnsynced writes its state
	}
	if st.Index == 0 {
		if g.state.Index > 0 || g.recordLost {
			if !g.recordLost {
				a.logger.Warn("the group's record is gone from Consul; rebuilding it from Nomad", "group", g.id.String(),
					"phase", g.state.Phase)
			}
			g.state.Index, g.recordLost = 0, true
			g.nomad.at = time.Time{} // read the count again before deciding
		}
		return
	}
	g.recordLost = false
	if st.Index == g.state.Index && st.Phase == g.state.Phase {
		return
	}
	a.setState(g, st)
}

// setState adopts a group record and acts on the phase change.
func (a *Agent) setState(g *group, st consul.GroupState) {
	old := g.state
	g.state = st
	if st.Phase == old.Phase && st.Epoch == old.Epoch {
		return
	}
	now := a.clock.Now()
	a.logger.Debug("group phase", "group", g.id.String(), "from", old.Phase, "to", st.Phase, "by", st.By, "reason", st.Reason)
	switch st.Phase {
	case consul.PhaseAwake:
		if old.Phase == consul.PhaseAsleep || old.Phase == consul.PhaseWaking {
			g.awakeAt = now // the idle clock starts again from the wake
			g.wokeFromSleep = now
		}
		g.wake = nil
		g.parkDeadline = time.Time{}
		if a.cfg.Forwarder != nil {
			a.syncForwards(g) // before the gate opens: replays go through them
		}
		a.syncGate(g)
		a.replayAll(g)
		clear(g.readyKeys)
		g.pendingReady = nil
		a.releaseDependents(g)
	case consul.PhaseParking, consul.PhaseAsleep:
		clear(g.readyKeys)
		clear(g.readyHere)
		a.syncGate(g)
		a.publishActivity(g, now)
	case consul.PhaseWaking:
		if st.By == a.node && g.wake == nil && g.policy != nil {
			// Our own wake from before a restart: carry on with it.
			g.wake = &wakeAttempt{firstSYN: st.FirstSYN, started: now, deadline: now.Add(g.policy.WakeTimeout), winner: true}
		}
		a.syncGate(g)
	}
	a.syncPlaceholders(g, now)
	a.reindexGroup(g)
}

// change moves the group to next with check-and-set. When Consul cannot be
// reached it acts on next locally all the same (the record is a cache, and
// the gate must follow what is true now) and writes it once Consul answers.
// Only a lost race is returned, as consul.ErrConflict.
func (a *Agent) change(g *group, next consul.GroupState) error {
	err := a.swap(g, next)
	if err == nil || errors.Is(err, consul.ErrConflict) {
		return err
	}
	a.logger.Warn("cannot write the group's record; acting on it locally until Consul answers",
		"group", g.id.String(), "phase", next.Phase, "error", err)
	local := next
	local.By = a.node
	local.Index = g.state.Index
	a.setState(g, local)
	g.unsynced = true
	return nil
}

// pushUnsynced writes a state this node acted on while Consul was away.
func (a *Agent) pushUnsynced(g *group) {
	now := a.clock.Now()
	if !g.unsynced || now.Sub(g.pushedAt) < a.cfg.NomadPollInterval {
		return // at most one try per poll interval: Consul may hang each call
	}
	g.pushedAt = now
	expected := consul.GroupState{Index: g.state.Index}
	st, err := a.cfg.Cluster.SwapGroupState(g.id.Key(), expected, g.state)
	switch {
	case err == nil:
		g.unsynced = false
		g.state.Index = st.Index
	case errors.Is(err, consul.ErrConflict):
		// Someone wrote meanwhile: theirs is the cluster's view now.
		g.unsynced = false
		if cur, rerr := a.cfg.Cluster.GroupState(g.id.Key()); rerr == nil {
			a.adopt(g, cur)
		}
	}
}

// swap changes a group's phase with check-and-set; on a lost race it adopts
// the winner's state and returns ErrConflict.
func (a *Agent) swap(g *group, next consul.GroupState) error {
	next.By = a.node
	st, err := a.cfg.Cluster.SwapGroupState(g.id.Key(), g.state, next)
	if err != nil {
		if errors.Is(err, consul.ErrConflict) {
			if cur, rerr := a.cfg.Cluster.GroupState(g.id.Key()); rerr == nil {
				a.adopt(g, cur)
			}
			return err
		}
		a.cfg.Metrics.Errors.WithLabelValues("consul").Inc()
		return err
	}
	// What is written supersedes anything this node kept while Consul
	// was away.
	g.unsynced, g.recordLost = false, false
	a.setState(g, st)
	return nil
}

package scaling

import (
	"errors"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The observe half of the reconciler: what Nomad, Consul and the kernel say
// now. Nothing here decides; decide.go turns an observation into a plan.

// nomadView is the group's count as Nomad last reported it.
type nomadView struct {
	status ScaleStatus
	at     time.Time // when it was read; zero: never
	err    error     // the last read failed
	gone   bool      // Nomad no longer knows the job or group
}

// fresh tells whether the view was read after t: a count read before the
// group's record last changed may predate a Scale of that change.
func (v nomadView) fresh(t time.Time) bool {
	return !v.at.IsZero() && v.err == nil && v.at.After(t)
}

// observeNomad reads the group's count when nomadReadDue says (or force is
// set). Every call has a timeout (NomadAPI), so a hung Nomad delays a pass
// by at most that much.
func (a *Agent) observeNomad(g *group, now time.Time, force bool) {
	if !force && !a.nomadReadDue(g, now) {
		return
	}
	g.nomadDirty = false
	status, err := a.cfg.Nomad.ScaleStatus(g.id)
	a.noteCount(g, status, err, now)
}

// noteCount keeps what a read of the group's count at now found.
func (a *Agent) noteCount(g *group, status ScaleStatus, err error, now time.Time) {
	if err != nil {
		g.nomad = nomadView{status: g.nomad.status, at: now, err: err, gone: isNotFound(err)}
		a.cfg.Metrics.Errors.WithLabelValues("nomad").Inc()
		a.logger.Debug("cannot read the group's count", "group", g.id.String(), "error", err)
		return
	}
	g.nomad = nomadView{status: status, at: now}
}

// nomadReadDue tells whether the group's count must be read again: never
// read, its job changed, its record changed since (decideRecord trusts only
// a count read after that), or the last read is older than the poll
// interval. While the job list is followed that interval is NomadResync,
// except for awake groups on the leader: it acts on sleep requests, which
// are scaling events and change no job.
func (a *Agent) nomadReadDue(g *group, now time.Time) bool {
	// A count read in the same pass that changed the record (at equal to
	// Since) is not after it: read again.
	if g.nomad.at.IsZero() || g.nomadDirty || !g.nomad.at.After(g.state.Since) {
		return true
	}
	every := a.cfg.NomadPollInterval
	if a.jobsWatched && g.nomad.err == nil && !(a.leader && g.state.Phase == consul.PhaseAwake) {
		every = a.cfg.NomadResync
	}
	return now.Sub(g.nomad.at) >= every
}

// specReadDue tells whether the group's job spec must be read again: its
// job's spec changed, or a resync is due (every minute while the job list
// is not followed).
func (a *Agent) specReadDue(g *group, now time.Time) bool {
	if g.specDirty {
		return true
	}
	every := time.Minute
	if a.jobsWatched {
		every = a.cfg.NomadResync
	}
	return now.Sub(g.specRead) > every
}

// OnJobs applies the job list (a blocking query over every job): a group
// whose job changed is read again at the next pass; the others need no
// polling while the list is followed.
func (a *Agent) OnJobs(stubs []JobStub) {
	type jobID struct{ namespace, id string }
	byJob := make(map[jobID]JobStub, len(stubs))
	for _, s := range stubs {
		byJob[jobID{s.Namespace, s.ID}] = s
	}
	for _, g := range a.groups {
		s, ok := byJob[jobID{g.id.Namespace, g.id.Job}]
		if !ok {
			g.nomadDirty = true // purged: the read says so
			continue
		}
		if s.ModifyIndex != g.job.ModifyIndex || s.SummaryIndex != g.job.SummaryIndex {
			g.nomadDirty = true
		}
		if s.JobModifyIndex != g.job.JobModifyIndex && !g.specRead.IsZero() {
			g.specDirty = true
		}
		g.job = s
	}
	a.jobsWatched = true
}

// OnJobsLost: the job list cannot be followed now; groups are polled.
func (a *Agent) OnJobsLost() { a.jobsWatched = false }

// observeRecords re-reads every group's record with one consistent read
// every RecordRefresh: the watch may have been told nothing after a KV wipe
// or a snapshot restore, and a record is only a cache of what Nomad says.
func (a *Agent) observeRecords(now time.Time) {
	if now.Sub(a.recordsReadAt) < a.cfg.RecordRefresh {
		return
	}
	a.recordsReadAt = now
	states, err := a.cfg.Cluster.GroupStates()
	if err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("consul").Inc()
		a.logger.Debug("cannot read the group states", "error", err)
		return
	}
	for _, g := range a.groups {
		if g.policy == nil {
			continue
		}
		st, ok := states[g.id.Key()]
		if !ok {
			st = consul.GroupState{Phase: consul.PhaseAwake}
		}
		a.adopt(g, st)
	}
}

// observeKernel reads back the gate's entries once per pass.
func (a *Agent) observeKernel() {
	keys, err := a.cfg.Gate.Keys()
	if err != nil {
		a.cfg.Metrics.Errors.WithLabelValues("gate").Inc()
		a.logger.Warn("cannot read the gate's entries back", "error", err)
		return
	}
	a.kernel = keys
}

// gateUsable tells whether parking is allowed on this node: the gate is
// attached wherever it must be (invariant 4).
func (a *Agent) gateUsable() error {
	if a.cfg.GateReady == nil {
		return nil
	}
	return a.cfg.GateReady()
}

// knownAddresses are every address the group is known to serve at: the
// record's, the live instances', the placeholders' and the last ones this
// node saw. A group at count 0 is wakeable only at a known address.
func (g *group) knownAddresses() []consul.Address {
	seen := map[string]bool{}
	var out []consul.Address
	add := func(ad consul.Address) {
		if ad.Addr == "" || seen[ad.Addr] {
			return
		}
		seen[ad.Addr] = true
		out = append(out, ad)
	}
	for _, ad := range g.state.Addresses {
		add(ad)
	}
	for k, inst := range g.liveKeys() {
		add(consul.Address{Service: inst.Service, Addr: k.AddrPort().String(), Node: inst.Node})
	}
	for _, insts := range g.placeholder {
		for _, inst := range insts {
			add(consul.Address{Service: inst.Service, Addr: bpf.KeyFrom(inst.AddrPort()).String(), Node: inst.Node})
		}
	}
	for _, ad := range g.lastLive {
		add(ad)
	}
	sortAddresses(out)
	return out
}

func isNotFound(err error) bool {
	if err == nil {
		return false
	}
	var se *ScaleError
	if errors.As(err, &se) {
		err = se.Err
	}
	if code, ok := statusCode(err); ok {
		return code == 404
	}
	return errors.Is(err, ErrGroupGone)
}

// ErrGroupGone: the job exists but has no such group any more.
var ErrGroupGone = errors.New("no such group")

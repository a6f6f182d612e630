package scaling

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// group is one gated task group as this node sees it.
type group struct {
	id GroupID

	policy      *Policy
	policyIndex uint64 // ModifyIndex of the policy last read
	// bindWatch: a lookup for the waking group's UDP sockets runs.
	bindWatch bool
	// ungated names a socket of a protocol the policy does not gate at a
	// live address here ("" if none), as last looked at ungatedAt.
	ungated   string
	ungatedAt time.Time
	// reported remembers which policy/job versions were already reported
	// (invalid policy, address warnings), so each is reported once.
	reported    map[string]bool
	spec        GroupSpec
	specRead    time.Time
	services    map[string]bool
	firstSeen   time.Time
	instances   map[string][]consul.Instance // Nomad instances by service
	placeholder map[string][]consul.Instance // placeholder instances by service

	state consul.GroupState
	// recordLost: Consul lost the record this node held (KV wiped or
	// restored); state is this node's copy until the reconciler rebuilds it.
	recordLost bool
	// unsynced: this node acted on a state Consul has not stored yet.
	unsynced bool
	pushedAt time.Time
	nomad    nomadView
	// indexed are the keys of the agent's key index that point here.
	indexed map[bpf.Key]bool
	// job is the job's stub as last listed; nomadDirty and specDirty: it
	// changed since the count or the spec was last read.
	job        JobStub
	nomadDirty bool
	specDirty  bool
	// lastLive are the addresses of the last live instances seen, so a group
	// scaled to 0 outside zeroscale stays wakeable at them.
	lastLive []consul.Address
	// wantGate is the gate state desiredGate gave at the last syncGate.
	wantGate map[bpf.Key]bpf.State
	// stoodDown: the job is stopped; the gate and placeholders are released.
	stoodDown bool

	// Leader bookkeeping.
	nextIdleCheck time.Time
	parkDeadline  time.Time

	// This node's bookkeeping.
	readyKeys map[bpf.Key]bool // opened here during a wake
	// readyHere are local addresses this node saw ready since the group
	// last parked: another node declaring the group awake does not open
	// one whose own instance here is still starting.
	readyHere map[bpf.Key]bool
	// wokeFromSleep is when this node saw the group go from asleep or
	// waking to awake (zero after a restart: nothing is held then).
	wokeFromSleep time.Time
	parkedEpoch   uint64 // the parking epoch this node has applied
	lastReport    consul.ActivityReport
	lastReportT   time.Time
	wake          *wakeAttempt
	captures      map[bpf.Key][]capture
	lastConnect   time.Time // the last SYN this node dropped for the group
	// pendingReady are addresses ready here while a group this one wakes
	// with is not awake yet (pendingHow: how they became ready).
	pendingReady []bpf.Key
	pendingHow   string
	// sleepRequested is the operator's last sleep request acted on.
	sleepRequested time.Time
	registered     map[string]consul.Placeholder // placeholders this node keeps
	awakeAt        time.Time
	// netns: allocations with their own network namespace, by id;
	// netnsLooked: when each was last looked for.
	netns       map[string]*allocNetns
	netnsLooked map[string]time.Time
}

func newGroup(id GroupID, now time.Time) *group {
	return &group{
		id:          id,
		reported:    make(map[string]bool),
		services:    make(map[string]bool),
		firstSeen:   now,
		instances:   make(map[string][]consul.Instance),
		placeholder: make(map[string][]consul.Instance),
		state:       consul.GroupState{Phase: consul.PhaseAwake},
		readyKeys:   make(map[bpf.Key]bool),
		readyHere:   make(map[bpf.Key]bool),
		captures:    make(map[bpf.Key][]capture),
		registered:  make(map[string]consul.Placeholder),
		netns:       make(map[string]*allocNetns),
		netnsLooked: make(map[string]time.Time),
	}
}

// protocols are the transports g gates at each address: its policy's, TCP
// without one.
func (g *group) protocols() []bpf.Protocol {
	if g.policy == nil || len(g.policy.Protocols) == 0 {
		return []bpf.Protocol{bpf.TCP}
	}
	return g.policy.Protocols
}

// keysAt are g's gate keys at one service address: one per protocol.
func (g *group) keysAt(ap netip.AddrPort) []bpf.Key {
	k := bpf.KeyFrom(ap)
	out := make([]bpf.Key, 0, 2)
	for _, p := range g.protocols() {
		out = append(out, k.WithProto(p))
	}
	return out
}

// liveKeys are the addresses of the group's Nomad-registered instances.
func (g *group) liveKeys() map[bpf.Key]consul.Instance {
	out := make(map[bpf.Key]consul.Instance)
	for _, insts := range g.instances {
		for _, inst := range insts {
			for _, k := range g.keysAt(inst.AddrPort()) {
				out[k] = inst
			}
		}
	}
	return out
}

// parkedKeys are the addresses recorded when the group was parked.
func (g *group) parkedKeys() map[bpf.Key]consul.Address {
	out := make(map[bpf.Key]consul.Address)
	for _, a := range g.state.Addresses {
		if ap, err := netip.ParseAddrPort(a.Addr); err == nil {
			for _, k := range g.keysAt(ap) {
				out[k] = a
			}
		}
	}
	return out
}

// keys are every address the group is known by.
func (g *group) keys() map[bpf.Key]bool {
	out := make(map[bpf.Key]bool)
	for k := range g.liveKeys() {
		out[k] = true
	}
	for k := range g.parkedKeys() {
		out[k] = true
	}
	for _, insts := range g.placeholder {
		for _, inst := range insts {
			for _, k := range g.keysAt(inst.AddrPort()) {
				out[k] = true
			}
		}
	}
	return out
}

// unchecked tells whether the group's instances have no checks of their
// own: Consul's "passing" says nothing of them, so their listener tells
// when they are ready, whatever the policy's ready says.
func (g *group) unchecked() bool {
	seen := false
	for _, insts := range g.instances {
		for _, inst := range insts {
			if inst.Checked {
				return false
			}
			seen = true
		}
	}
	return seen
}

func (g *group) sleeping() bool {
	switch g.state.Phase {
	case consul.PhaseParking, consul.PhaseAsleep, consul.PhaseWaking:
		return true
	}
	return false
}

// OnPolicies applies the list of Nomad scaling policies: new and changed
// zeroscale policies are read and validated; groups whose policy went away
// are released.
func (a *Agent) OnPolicies(stubs []PolicyStub) {
	now := a.clock.Now()
	seen := make(map[GroupID]bool)
	for _, stub := range stubs {
		if !stub.Enabled {
			continue
		}
		g, known := a.groups[stub.Target]
		if known && g.policyIndex == stub.ModifyIndex {
			seen[stub.Target] = true
			continue
		}
		data, err := a.cfg.Nomad.Policy(stub.ID)
		if err != nil {
			a.logger.Warn("cannot read scaling policy", "policy", stub.ID, "group", stub.Target.String(), "error", err)
			if known {
				seen[stub.Target] = true // keep what we have
			}
			continue
		}
		if !HasZeroscaleBlock(data) {
			continue
		}
		if !known {
			g = newGroup(stub.Target, now)
			a.groups[stub.Target] = g
		}
		seen[stub.Target] = true
		g.policyIndex = stub.ModifyIndex
		policy, err := ParsePolicy(data)
		if err != nil {
			// A broken edit must not strand a sleeping service: keep acting
			// on the last valid version, if any.
			keeping := ""
			if g.policy != nil {
				keeping = "; the previous version stays in force"
			}
			a.reportOnce(g, fmt.Sprintf("policy-%d", stub.ModifyIndex), true,
				"zeroscale: invalid policy, ignored until fixed: "+err.Error()+keeping)
			continue
		}
		if g.policy == nil {
			a.logger.Info("gating group", "group", g.id.String(), "idle_timeout", policy.IdleTimeout.String(),
				"wake_count", policy.WakeCount, "ready", policy.Ready)
		}
		g.policy = &policy
		a.refreshSpec(g, now)
		if !known {
			// Pick up where the cluster is (after a restart: maybe asleep).
			if st, err := a.cfg.Cluster.GroupState(g.id.Key()); err == nil {
				a.adopt(g, st)
			} else {
				a.logger.Warn("cannot read group state", "group", g.id.String(), "error", err)
			}
		}
	}
	for id, g := range a.groups {
		if !seen[id] {
			a.release(g)
		}
	}
	a.refuseWakeWithCycles()
	a.policiesRead = true
	a.reindex()
	a.followServices()
}

// Services lists the Consul services whose instances the agent follows:
// the gated groups' services but those of groups settled asleep, most
// urgent first (waking and parking groups', then awake ones'), for the
// instance watch.
func (a *Agent) Services() []string {
	now := a.clock.Now()
	rank := func(g *group) int {
		switch {
		case g.state.Phase == consul.PhaseWaking || g.state.Phase == consul.PhaseParking:
			return 0 // their instances decide readiness and parking now
		case g.state.Phase == consul.PhaseAwake:
			return 1
		}
		return 2
	}
	best := map[string]int{}
	for _, g := range a.groups {
		if g.settledAsleep(now) {
			continue
		}
		r := rank(g)
		for s := range g.services {
			if cur, ok := best[s]; !ok || r < cur {
				best[s] = r
			}
		}
	}
	out := slices.Collect(maps.Keys(best))
	slices.SortFunc(out, func(x, y string) int { return cmp.Or(cmp.Compare(best[x], best[y]), strings.Compare(x, y)) })
	return out
}

// settledAsleep tells whether the group sleeps with nothing left to learn
// from its instances: asleep over a minute at count 0, every service's
// instances seen, none live, its addresses recorded. Until it wakes, which
// its record or Nomad's count says first, its services need no watch: a
// thousand sleeping groups hold no connection to Consul.
func (g *group) settledAsleep(now time.Time) bool {
	if g.state.Phase != consul.PhaseAsleep || now.Sub(g.state.Since) < time.Minute || len(g.state.Addresses) == 0 ||
		g.nomad.at.IsZero() || g.nomad.err != nil || g.nomad.status.Desired != 0 || len(g.liveKeys()) > 0 {
		return false
	}
	for s := range g.services {
		if _, seen := g.placeholder[s]; !seen {
			return false
		}
	}
	return true
}

// followServices tells the service watch which services to follow when
// that changes (most urgent first).
func (a *Agent) followServices() {
	if a.cfg.FollowServices == nil {
		return
	}
	want := a.Services()
	if slices.Equal(want, a.followed) {
		return
	}
	a.followed = want
	a.cfg.Metrics.FollowedServices.Set(float64(len(want)))
	a.cfg.FollowServices(want)
}

// refreshSpec reads the group's job spec and warns about addresses that
// cannot stay stable.
func (a *Agent) refreshSpec(g *group, now time.Time) {
	spec, err := a.cfg.Nomad.Group(g.id)
	if err != nil {
		a.logger.Warn("cannot read the group's job", "group", g.id.String(), "error", err)
		return
	}
	g.spec, g.specRead, g.specDirty = spec, now, false
	g.services = make(map[string]bool)
	var problems, moves []string
	for _, s := range spec.Services {
		if s.Provider != "consul" {
			problems = append(problems, fmt.Sprintf("service %q uses provider %q; zeroscale gates Consul services only", s.Name, s.Provider))
			continue
		}
		g.services[s.Name] = true
		if s.StaticPort == 0 {
			moves = append(moves, fmt.Sprintf("service %q uses the dynamic port %q", s.Name, s.PortLabel))
		}
	}
	if len(spec.Services) == 0 {
		problems = append(problems, "the group registers no Consul service, so there is no address to gate")
	}
	if !spec.Pinned {
		moves = append(moves, "the group is not pinned to a node (constraint on ${node.unique.name})")
	}
	key := fmt.Sprintf("spec-%d-%d", g.policyIndex, spec.JobModified)
	if len(moves) > 0 && a.cfg.Forwarder != nil {
		// Served all the same, through a forward: advice, not an error.
		a.reportOnce(g, key+"-moves", false, "zeroscale: note: "+strings.Join(moves, "; ")+
			"; it may wake at another address, and connections to the old one are then forwarded there"+
			" (a static port and a node pin wake fastest)")
	} else if len(moves) > 0 {
		problems = append(problems, strings.Join(moves, "; ")+"; it may wake at another address, where the old one cannot follow")
	}
	if len(problems) > 0 {
		a.reportOnce(g, key, true, "zeroscale: warning: "+strings.Join(problems, "; "))
	}
}

// reportOnce records an error scaling event and a log line, once per key.
func (a *Agent) reportOnce(g *group, key string, isError bool, msg string) {
	if g.reported[key] {
		return
	}
	g.reported[key] = true
	if isError {
		a.logger.Error(msg, "group", g.id.String())
		a.cfg.Metrics.Errors.WithLabelValues("policy").Inc()
	} else {
		a.logger.Info(msg, "group", g.id.String())
	}
	if err := a.cfg.Nomad.Scale(g.id, nil, msg, isError, map[string]any{"zeroscale": "report", "node": a.node}); err != nil {
		a.logger.Warn("cannot record a scaling event", "group", g.id.String(), "error", err)
		if a.cfg.OnUnrecorded != nil {
			a.cfg.OnUnrecorded(g.id, msg)
		}
	}
}

// release stops gating a group whose policy is gone.
func (a *Agent) release(g *group) {
	a.logger.Info("releasing group: no zeroscale policy any more", "group", g.id.String())
	for k := range g.keys() {
		if _, ok := a.kernel[k]; ok && a.keyIndex[k] == g.id {
			a.forget(k)
		}
	}
	for id, p := range g.registered {
		if err := a.cfg.Cluster.DeregisterPlaceholder(p); err != nil {
			a.logger.Warn("cannot remove placeholder", "placeholder", p.String(), "error", err)
		}
		delete(g.registered, id)
	}
	if a.leader && g.state.Index != 0 {
		if err := a.cfg.Cluster.DeleteGroupState(g.id.Key()); err != nil {
			a.logger.Warn("cannot delete group state", "group", g.id.String(), "error", err)
		}
	}
	delete(a.groups, g.id)
}

func (a *Agent) setInstances(g *group, service string, insts []consul.Instance) {
	var live, asleep []consul.Instance
	for _, inst := range insts {
		if inst.Asleep {
			asleep = append(asleep, inst)
		} else {
			live = append(live, inst)
		}
	}
	before := len(g.liveKeys())
	g.instances[service] = live
	g.placeholder[service] = asleep
	if lk := g.liveKeys(); len(lk) < before && g.state.Phase == consul.PhaseAwake && g.policy != nil {
		// An instance left the catalog while the group is awake: maybe an
		// operator scaled it to 0. Ask Nomad now rather than at the next
		// poll, so the address parks before a client finds it refused.
		a.observeNomad(g, a.clock.Now(), true)
		defer a.reconcile(g, a.clock.Now())
	}
	if lk := g.liveKeys(); len(lk) > 0 {
		g.lastLive = g.lastLive[:0]
		for k, inst := range lk {
			if ad := (consul.Address{Service: inst.Service, Addr: k.AddrPort().String(), Node: inst.Node}); !slices.Contains(g.lastLive, ad) {
				g.lastLive = append(g.lastLive, ad)
			}
		}
		sortAddresses(g.lastLive)
	}
	if g.policy == nil {
		return
	}
	// A passing instance of a new allocation means the group is up (one
	// with checks of its own: without, it passes before it listens): with
	// ready = "healthy" that is the signal; with "listen" it is the fallback
	// when the listen event was missed. Instances of the allocations that
	// were running when the group parked do not count: Consul may still list
	// them for a moment after the scale-down.
	if g.sleeping() && g.state.Phase != consul.PhaseParking || g.holding() {
		var ready []bpf.Key
		for _, inst := range live {
			if inst.Passing && inst.Checked && !slices.Contains(g.state.Allocs, inst.AllocID) {
				ready = append(ready, g.keysAt(inst.AddrPort())...)
			}
		}
		if len(ready) > 0 {
			a.markReady(g, ready, "healthy in Consul")
		} else if len(a.recentListens) > 0 {
			// Only listeners that appeared after the group was parked: the
			// one the old allocation opened long ago says nothing.
			var evs []listenSeen
			for _, l := range a.recentListens {
				if !l.at.Before(g.state.Since) {
					evs = append(evs, l)
				}
			}
			a.checkListening(g, evs)
		}
	}
	a.syncGate(g)
}

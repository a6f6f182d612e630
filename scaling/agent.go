package scaling

import (
	"context"
	"net/netip"
	"sync/atomic"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Config wires an Agent to the world.
type Config struct {
	Gate    Gate
	Nomad   Nomad
	Cluster Cluster
	Clock   Clock
	Logger  hclog.Logger
	Metrics *Metrics

	// DryRun: observe and log decisions, never park or scale.
	DryRun bool
	// SYNReplay re-injects captured SYNs when a woken service is ready.
	SYNReplay bool
	// SYNMaxAge: captured SYNs older than this are dropped, not replayed.
	SYNMaxAge time.Duration
	// MaxCapturesPerKey bounds captured SYNs kept per parked address.
	MaxCapturesPerKey int
	// ReportInterval is the least time between two activity reports of a
	// group; HeartbeatInterval is the most.
	ReportInterval    time.Duration
	HeartbeatInterval time.Duration
	// ReportMaxAge: reports older than this are from nodes that stopped.
	ReportMaxAge time.Duration
	// ParkAckTimeout: nodes must close their gates within this time of a
	// parking decision, or parking is abandoned.
	ParkAckTimeout time.Duration
	// TickInterval paces timers, checks and reports.
	TickInterval time.Duration
	// LocalAddrs lists this host's addresses (consul.LocalAddrs by default).
	LocalAddrs func() (map[netip.Addr]bool, error)
	// Spawn runs slow work (SYN replays) off the loop; `go f()` by default.
	Spawn func(func())
	// OnAwake, if set, hears that a woken group is ready (the plugin turns
	// it into task events).
	OnAwake func(id GroupID, message string)
	// OnUnrecorded, if set, hears a report Nomad refused to record as a
	// scaling event (a token without scale-job cannot record one): the
	// plugin shows it as a task event of the group's zeroscale tasks.
	OnUnrecorded func(id GroupID, message string)

	// DeploymentPoll: an idle group whose job is deploying is checked again
	// this often (Nomad refuses scaling during a deployment).
	DeploymentPoll time.Duration
	// NomadPollInterval: each group's count is read at least this often
	// while the job list is not followed (OnJobs), and awake groups' on the
	// leader, which acts on sleep requests (scaling events move no job).
	NomadPollInterval time.Duration
	// NomadResync: while the job list is followed, a group whose job did
	// not change is read again this often all the same.
	NomadResync time.Duration
	// RecordRefresh: every group's record is re-read consistently this often.
	RecordRefresh time.Duration
	// ScaleSettle is how long a Scale may take to show in Nomad's count.
	ScaleSettle time.Duration
	// WakeTakeover: a node holding clients of a wake that left the count
	// at 0 this long takes the wake over (its first node died).
	WakeTakeover time.Duration
	// MovedFor: an address the group left answers SYNs with a RST this long.
	MovedFor time.Duration
	// OrphanGrace: after start, gate entries that no group claims are kept
	// this long (the watches need a moment to say who owns what), then
	// removed.
	OrphanGrace time.Duration
	// GateReady says whether parking is safe on this node: nil when the
	// gate is attached everywhere it must be (nil func: always).
	GateReady func() error
	// ListenerAlloc resolves the process of a listen event to its Nomad
	// allocation; nil: every listener counts (tests of pure logic).
	ListenerAlloc func(ev bpf.Event) (allocID string, ok bool)
	// SocketOwner finds a process holding the socket with an inode number
	// (a bound UDP socket comes with none), for ListenerAlloc.
	SocketOwner func(inode uint64) (pid int, ok bool)
	// Namespaces finds allocations' own network namespaces; nil: every
	// service is taken to live in the node's namespace.
	Namespaces Namespaces
	// Forwarder forwards a parked address the group did not come back at
	// to where it woke; nil: such an address refuses (a RST) instead.
	Forwarder Forwarder
	// ForwardGrace is how long after a wake such forwards take new
	// connections (clients that still resolve the old address).
	ForwardGrace time.Duration
	// FollowServices, if set, hears which services' instances to follow
	// (OnInstances), most urgent first, whenever that changes: sleeping
	// groups' services drop out until they wake.
	FollowServices func(names []string)
}

func (c *Config) setDefaults() {
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.SYNMaxAge <= 0 {
		c.SYNMaxAge = 60 * time.Second
	}
	if c.MaxCapturesPerKey <= 0 {
		c.MaxCapturesPerKey = 1024
	}
	if c.ReportInterval <= 0 {
		c.ReportInterval = time.Second
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 30 * time.Second
	}
	if c.ReportMaxAge <= 0 {
		c.ReportMaxAge = 3 * c.HeartbeatInterval
	}
	if c.ParkAckTimeout <= 0 {
		c.ParkAckTimeout = 15 * time.Second
	}
	if c.TickInterval <= 0 {
		c.TickInterval = 500 * time.Millisecond
	}
	if c.LocalAddrs == nil {
		c.LocalAddrs = consul.LocalAddrs
	}
	if c.Spawn == nil {
		c.Spawn = func(f func()) { go f() }
	}
	if c.DeploymentPoll <= 0 {
		c.DeploymentPoll = 2 * time.Second
	}
	if c.NomadPollInterval <= 0 {
		c.NomadPollInterval = 5 * time.Second
	}
	if c.NomadResync <= 0 {
		c.NomadResync = 5 * time.Minute
	}
	if c.RecordRefresh <= 0 {
		c.RecordRefresh = 30 * time.Second
	}
	if c.ScaleSettle <= 0 {
		c.ScaleSettle = 15 * time.Second
	}
	if c.WakeTakeover <= 0 {
		c.WakeTakeover = 3 * time.Second
	}
	if c.MovedFor <= 0 {
		c.MovedFor = 5 * time.Minute
	}
	if c.ForwardGrace <= 0 {
		c.ForwardGrace = 5 * time.Minute
	}
	if c.OrphanGrace <= 0 {
		c.OrphanGrace = 15 * time.Second
	}
}

// Agent is one node's scaler. Its state is owned by one goroutine (Run);
// the exported On*/Tick methods are that goroutine's entry points, called
// directly only by tests.
type Agent struct {
	cfg    Config
	logger hclog.Logger
	node   string
	clock  Clock

	inbox chan func()
	// running: Run handles the inbox; stopped is closed when it returns.
	running atomic.Bool
	stopped chan struct{}

	groups   map[GroupID]*group
	keyIndex map[bpf.Key]GroupID
	leader   bool
	// reports holds every node's latest activity report per group key.
	reports map[string]map[string]consul.ActivityReport
	local   map[netip.Addr]bool
	// localRefreshed is when local was last read.
	localRefreshed time.Time
	// pending are gate events for keys not yet known (just after a restart).
	pending []pendingEvent
	// allocGroups caches allocation → group lookups.
	allocGroups map[string]GroupID
	// recentListens are listen events of the last seconds: a woken service
	// may listen before its new address is registered in Consul.
	recentListens []listenSeen
	// unresolved holds the latest instance lists that named an allocation
	// Nomad could not resolve yet; they are applied again until it can (the
	// watch sends a list only when it changes).
	unresolved      map[string][]consul.Instance
	unresolvedRetry time.Time
	// kernel is the gate's entries as last read back (and since written).
	kernel map[bpf.Key]bpf.State
	// forwards are the installed forwards as last read back (and since
	// written); forwardedSeen are their connection counts then.
	forwards      map[bpf.Key]netip.AddrPort
	forwardedSeen map[bpf.Key]uint64
	// jobsWatched: OnJobs follows every job's changes, so groups whose job
	// did not change need no polling.
	jobsWatched bool
	// followed is the service list last given to FollowServices.
	followed []string
	// recordsReadAt is when every record was last read consistently.
	recordsReadAt time.Time
	// started and policiesRead gate the removal of unowned entries.
	started      time.Time
	policiesRead bool
}

type pendingEvent struct {
	ev    bpf.Event
	since time.Time
}

// NewAgent builds an agent; Run starts it.
func NewAgent(cfg Config) *Agent {
	cfg.setDefaults()
	a := &Agent{
		cfg:         cfg,
		logger:      cfg.Logger.Named("scaling"),
		clock:       cfg.Clock,
		inbox:       make(chan func(), 256),
		stopped:     make(chan struct{}),
		groups:      make(map[GroupID]*group),
		keyIndex:    make(map[bpf.Key]GroupID),
		reports:     make(map[string]map[string]consul.ActivityReport),
		allocGroups: make(map[string]GroupID),
		kernel:      make(map[bpf.Key]bpf.State),
		forwards:    make(map[bpf.Key]netip.AddrPort),
		unresolved:  make(map[string][]consul.Instance),
	}
	a.node = cfg.Cluster.NodeName()
	a.started = a.clock.Now()
	a.refreshLocal(true)
	a.observeKernel()
	a.observeForwards()
	a.cfg.Metrics.ForwardGrace.Set(a.cfg.ForwardGrace.Seconds())
	return a
}

// offLoop runs a slow call off the loop (cfg.Spawn) and the continuation it
// returns back on the loop. Before Run (tests drive the agent directly)
// both run at once.
func (a *Agent) offLoop(work func() func()) {
	if !a.running.Load() {
		work()() // tests drive the agent from one goroutine
		return
	}
	a.cfg.Spawn(func() {
		then := work()
		select {
		case a.inbox <- then:
		case <-a.stopped:
		}
	})
}

// Do queues f to run on the agent's goroutine (for watchers and callbacks).
func (a *Agent) Do(ctx context.Context, f func()) {
	select {
	case a.inbox <- f:
	case <-ctx.Done():
	}
}

// Run handles inputs and ticks until ctx ends.
func (a *Agent) Run(ctx context.Context, events <-chan bpf.Event) {
	tick := time.NewTicker(a.cfg.TickInterval)
	defer tick.Stop()
	a.running.Store(true)
	defer close(a.stopped)
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-a.inbox:
			f()
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			a.OnGateEvent(ev)
		case <-tick.C:
			a.Tick()
		}
	}
}

// OnLeader records whether this node decides scale-downs.
func (a *Agent) OnLeader(leader bool) {
	a.leader = leader
	if leader {
		a.cfg.Metrics.Leader.Set(1)
	} else {
		a.cfg.Metrics.Leader.Set(0)
		for _, g := range a.groups {
			g.parkDeadline = time.Time{}
		}
	}
}

// OnActivityReports replaces the view of all nodes' reports.
func (a *Agent) OnActivityReports(all map[string]map[string]consul.ActivityReport) {
	a.reports = all
}

// OnGroupStates applies the cluster's group records.
func (a *Agent) OnGroupStates(states map[string]consul.GroupState) {
	// The snapshot is at least as new as its newest record.
	var newest uint64
	for _, st := range states {
		newest = max(newest, st.Index)
	}
	for _, g := range a.groups {
		st, ok := states[g.id.Key()]
		if !ok {
			st = consul.GroupState{Phase: consul.PhaseAwake}
		}
		a.fromWatch(g, st, newest)
	}
}

// OnInstances applies a service's current instances from Consul.
func (a *Agent) OnInstances(service string, instances []consul.Instance) {
	byGroup := make(map[GroupID][]consul.Instance)
	delete(a.unresolved, service)
	for _, inst := range instances {
		var id GroupID
		switch {
		case inst.Asleep:
			id = GroupID{Namespace: inst.Meta[consul.MetaNamespace], Job: inst.Meta[consul.MetaJob], Group: inst.Meta[consul.MetaGroup]}
		case inst.AllocID != "":
			gid, err := a.allocGroup(inst.AllocID)
			if err != nil {
				a.logger.Debug("cannot resolve the allocation of an instance", "service", service, "alloc_id", inst.AllocID, "error", err)
				a.unresolved[service] = instances
				continue
			}
			id = gid
		default:
			continue // not registered by Nomad nor by us
		}
		byGroup[id] = append(byGroup[id], inst)
	}
	for id, g := range a.groups {
		if !g.services[service] {
			continue
		}
		a.setInstances(g, service, byGroup[id])
		a.forwardAndReplay(g) // a new instance is somewhere to forward to
		a.reindexGroup(g)
	}
}

// allocGroup resolves an allocation to its group (allocations never move).
func (a *Agent) allocGroup(allocID string) (GroupID, error) {
	if id, ok := a.allocGroups[allocID]; ok {
		return id, nil
	}
	id, err := a.cfg.Nomad.AllocGroup(allocID)
	if err != nil {
		return GroupID{}, err
	}
	a.allocGroups[allocID] = id
	return id, nil
}

// OnGateEvent handles a kernel report.
func (a *Agent) OnGateEvent(ev bpf.Event) {
	if ev.Is(bpf.EventListen) {
		a.onListen(ev)
		return
	}
	id, ok := a.keyIndex[ev.Key]
	if !ok {
		a.pending = append(a.pending, pendingEvent{ev: ev, since: a.clock.Now()})
		return
	}
	g := a.groups[id]
	if ev.Is(bpf.EventCapture) {
		a.capture(g, ev)
	}
	a.onConnect(g, ev)
}

func (a *Agent) refreshLocal(force bool) {
	now := a.clock.Now()
	if !force && now.Sub(a.localRefreshed) < 30*time.Second {
		return
	}
	addrs, err := a.cfg.LocalAddrs()
	if err != nil {
		a.logger.Warn("cannot list local addresses", "error", err)
		return
	}
	a.local = addrs
	a.localRefreshed = now
}

func (a *Agent) isLocal(addr netip.Addr) bool { return a.local[addr.Unmap()] }

func (a *Agent) retryPending(now time.Time) {
	if len(a.pending) == 0 {
		return
	}
	keep := a.pending[:0]
	for _, p := range a.pending {
		if id, ok := a.keyIndex[p.ev.Key]; ok {
			g := a.groups[id]
			if p.ev.Is(bpf.EventCapture) {
				a.capture(g, p.ev)
			}
			a.onConnect(g, p.ev)
			continue
		}
		if now.Sub(p.since) < 30*time.Second {
			keep = append(keep, p)
		}
	}
	a.pending = keep
}

// reindex rebuilds the key → group index.
func (a *Agent) reindex() {
	idx := make(map[bpf.Key]GroupID)
	for id, g := range a.groups {
		g.indexed = g.keys()
		for k := range g.indexed {
			idx[k] = id
		}
	}
	a.keyIndex = idx
}

// reindexGroup brings the key → group index up to date for one group's
// keys: rebuilding it whole for each of 10,000 services' instance lists
// was quadratic.
func (a *Agent) reindexGroup(g *group) {
	keys := g.keys()
	for k := range g.indexed {
		if !keys[k] && a.keyIndex[k] == g.id {
			delete(a.keyIndex, k)
		}
	}
	for k := range keys {
		a.keyIndex[k] = g.id
	}
	g.indexed = keys
}

func (a *Agent) updateGauges() {
	phases := map[consul.Phase]int{}
	parked := 0
	for _, g := range a.groups {
		phases[g.state.Phase]++
	}
	for _, s := range a.kernel {
		if s == bpf.StateParked {
			parked++
		}
	}
	for _, p := range []consul.Phase{consul.PhaseAwake, consul.PhaseParking, consul.PhaseAsleep, consul.PhaseWaking} {
		a.cfg.Metrics.GroupsByPhase.WithLabelValues(string(p)).Set(float64(phases[p]))
	}
	a.cfg.Metrics.ParkedAddresses.Set(float64(parked))
}

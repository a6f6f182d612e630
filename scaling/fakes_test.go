package scaling

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Fakes for the state-machine unit tests. The real gate, Consul and Nomad
// are exercised by the integration tests beside these.

type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time          { return c.now }
func (c *fakeClock) Advance(d time.Duration) { c.now = c.now.Add(d) }

type fakeGate struct {
	mu       sync.Mutex
	states   map[bpf.Key]bpf.State
	activity map[bpf.Key]bpf.Activity
	replays  [][]byte
	passed   map[netip.AddrPort]bool
	// replayResults are returned in order, then ReplayPassed.
	replayResults []bpf.ReplayResult
	// replayVia is the target of each replay, in order.
	replayVia []*bpf.ReplayTarget
	mapped    map[bpf.NsPort]bpf.Key
	watched   map[uint16]bool
	// bound are the sockets Bound finds, with their cgroup ids (which are
	// their inode numbers too).
	bound map[bpf.Key]uint64
}

func newFakeGate() *fakeGate {
	return &fakeGate{states: map[bpf.Key]bpf.State{}, activity: map[bpf.Key]bpf.Activity{}, passed: map[netip.AddrPort]bool{},
		mapped: map[bpf.NsPort]bpf.Key{}, watched: map[uint16]bool{}, bound: map[bpf.Key]uint64{}}
}

func (g *fakeGate) Bound(k bpf.Key, _ *bpf.ReplayTarget) (bpf.BoundSocket, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	cg, ok := g.bound[k]
	return bpf.BoundSocket{Found: ok, CgroupID: cg, Inode: cg}, nil
}

func (g *fakeGate) bind(k bpf.Key, cgroup uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.bound[k] = cgroup
}

func (g *fakeGate) set(k bpf.Key, s bpf.State) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.states[k] = s
	return nil
}
func (g *fakeGate) Park(k bpf.Key) error { return g.set(k, bpf.StateParked) }
func (g *fakeGate) Open(k bpf.Key) error { return g.set(k, bpf.StateOpen) }
func (g *fakeGate) Move(k bpf.Key) error { return g.set(k, bpf.StateMoved) }
func (g *fakeGate) Forget(k bpf.Key) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.states, k)
	return nil
}
func (g *fakeGate) State(k bpf.Key) (bpf.State, bool, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s, ok := g.states[k]
	return s, ok, nil
}
func (g *fakeGate) Activity(k bpf.Key) (bpf.Activity, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.activity[k], nil
}
func (g *fakeGate) setActivity(k bpf.Key, a bpf.Activity) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.activity[k] = a
}
func (g *fakeGate) Replay(frame []byte, _ int, via *bpf.ReplayTarget) (bpf.ReplayResult, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.replays = append(g.replays, frame)
	g.replayVia = append(g.replayVia, via)
	if len(g.replayResults) > 0 {
		r := g.replayResults[0]
		g.replayResults = g.replayResults[1:]
		return r, nil
	}
	return bpf.ReplayPassed, nil
}
func (g *fakeGate) SYNPassed(_ bpf.Key, c netip.AddrPort) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.passed[c]
}
func (g *fakeGate) Keys() (map[bpf.Key]bpf.State, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[bpf.Key]bpf.State, len(g.states))
	for k, s := range g.states {
		out[k] = s
	}
	return out, nil
}
func (g *fakeGate) MapPort(p bpf.NsPort, k bpf.Key) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.mapped[p] = k
	return nil
}
func (g *fakeGate) UnmapPort(p bpf.NsPort) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.mapped, p)
	return nil
}
func (g *fakeGate) MappedPorts() (map[bpf.NsPort]bpf.Key, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[bpf.NsPort]bpf.Key, len(g.mapped))
	for p, k := range g.mapped {
		out[p] = k
	}
	return out, nil
}
func (g *fakeGate) WatchListenPort(port uint16) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.watched[port] = true
	return nil
}
func (g *fakeGate) state(k bpf.Key) bpf.State {
	s, _, _ := g.State(k)
	return s
}

type scaleCall struct {
	Group   GroupID
	Count   *int
	Message string
	Error   bool
	Meta    map[string]any
}

type fakeNomad struct {
	mu       sync.Mutex
	policies map[string]*api.ScalingPolicy
	specs    map[GroupID]GroupSpec
	status   map[GroupID]ScaleStatus
	allocs   map[string]GroupID
	calls    []scaleCall
	// scaleErrs are returned by the next Scale calls that change the count.
	scaleErrs []error
	deploying map[GroupID]bool
	// statusReads counts ScaleStatus calls.
	statusReads int
	// scaleHold, if set, is called (without the lock) by each Scale that
	// changes the count before it applies, and may block.
	scaleHold func(GroupID)
}

func newFakeNomad() *fakeNomad {
	return &fakeNomad{policies: map[string]*api.ScalingPolicy{}, specs: map[GroupID]GroupSpec{},
		status: map[GroupID]ScaleStatus{}, allocs: map[string]GroupID{}, deploying: map[GroupID]bool{}}
}

func (n *fakeNomad) stubs() []PolicyStub {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []PolicyStub
	for id, p := range n.policies {
		out = append(out, PolicyStub{ID: id, ModifyIndex: p.ModifyIndex, Enabled: p.Enabled == nil || *p.Enabled,
			Target: GroupID{p.Target["Namespace"], p.Target["Job"], p.Target["Group"]}})
	}
	return out
}

func (n *fakeNomad) Policies(uint64, time.Duration) ([]PolicyStub, uint64, error) {
	return n.stubs(), 1, nil
}
func (n *fakeNomad) Policy(id string) (*api.ScalingPolicy, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	p, ok := n.policies[id]
	if !ok {
		return nil, errors.New("no such policy")
	}
	return p, nil
}
func (n *fakeNomad) Group(id GroupID) (GroupSpec, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.specs[id]
	if !ok {
		return GroupSpec{}, errors.New("no such group")
	}
	return s, nil
}
func (n *fakeNomad) ScaleStatus(id GroupID) (ScaleStatus, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.statusReads++
	return n.status[id], nil
}
func (n *fakeNomad) Scale(id GroupID, count *int, msg string, isErr bool, meta map[string]any) error {
	n.mu.Lock()
	hold := n.scaleHold
	n.mu.Unlock()
	if hold != nil && count != nil {
		hold(id)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if count != nil && len(n.scaleErrs) > 0 {
		err := n.scaleErrs[0]
		n.scaleErrs = n.scaleErrs[1:]
		if err != nil {
			n.calls = append(n.calls, scaleCall{id, count, msg + " [refused]", isErr, meta})
			return &ScaleError{Group: id, Err: err}
		}
	}
	n.calls = append(n.calls, scaleCall{id, count, msg, isErr, meta})
	if count != nil {
		st := n.status[id]
		st.Desired = *count
		n.status[id] = st
	}
	return nil
}
func (n *fakeNomad) DeploymentActive(id GroupID) (bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.deploying[id], nil
}
func (n *fakeNomad) AllocGroup(alloc string) (GroupID, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	g, ok := n.allocs[alloc]
	if !ok {
		return GroupID{}, errors.New("no such alloc")
	}
	return g, nil
}

// countChanges are the Scale calls that changed the count (not refused).
func (n *fakeNomad) countChanges() []scaleCall {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []scaleCall
	for _, c := range n.calls {
		if c.Count != nil && !containsRefused(c.Message) {
			out = append(out, c)
		}
	}
	return out
}

func (n *fakeNomad) events(isErr bool) []scaleCall {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []scaleCall
	for _, c := range n.calls {
		if c.Count == nil && c.Error == isErr {
			out = append(out, c)
		}
	}
	return out
}

func containsRefused(s string) bool {
	return len(s) >= 10 && s[len(s)-10:] == " [refused]"
}

// fakeCluster is Consul's KV, shared by the agents of one test as nodes.
type fakeKV struct {
	mu     sync.Mutex
	index  uint64
	states map[string]consul.GroupState
	// listReads counts GroupStates calls, stateReads GroupState calls.
	listReads, stateReads int
}

func newFakeKV() *fakeKV { return &fakeKV{states: map[string]consul.GroupState{}} }

type fakeCluster struct {
	kv           *fakeKV
	node         string
	leader       bool
	published    []consul.ActivityReport
	placeholders map[string]consul.Placeholder
	failSwaps    error
}

func newFakeCluster(kv *fakeKV, node string) *fakeCluster {
	return &fakeCluster{kv: kv, node: node, placeholders: map[string]consul.Placeholder{}}
}

func (c *fakeCluster) NodeName() string { return c.node }
func (c *fakeCluster) IsLeader() bool   { return c.leader }
func (c *fakeCluster) GroupState(group string) (consul.GroupState, error) {
	c.kv.mu.Lock()
	defer c.kv.mu.Unlock()
	c.kv.stateReads++
	st, ok := c.kv.states[group]
	if !ok {
		return consul.GroupState{Phase: consul.PhaseAwake}, nil
	}
	return st, nil
}
func (c *fakeCluster) GroupStates() (map[string]consul.GroupState, error) {
	c.kv.mu.Lock()
	defer c.kv.mu.Unlock()
	c.kv.listReads++
	return maps.Clone(c.kv.states), nil
}
func (c *fakeCluster) SwapGroupState(group string, expected, next consul.GroupState) (consul.GroupState, error) {
	if c.failSwaps != nil {
		return consul.GroupState{}, c.failSwaps
	}
	c.kv.mu.Lock()
	defer c.kv.mu.Unlock()
	cur := c.kv.states[group]
	if cur.Index != expected.Index {
		return consul.GroupState{}, consul.ErrConflict
	}
	c.kv.index++
	next.Index = c.kv.index
	c.kv.states[group] = next
	return next, nil
}
func (c *fakeCluster) DeleteGroupState(group string) error {
	c.kv.mu.Lock()
	defer c.kv.mu.Unlock()
	delete(c.kv.states, group)
	return nil
}
func (c *fakeCluster) PublishActivity(_ string, r consul.ActivityReport) error {
	c.published = append(c.published, r)
	return nil
}
func (c *fakeCluster) RegisterPlaceholder(p consul.Placeholder) error {
	c.placeholders[p.ID()] = p
	return nil
}
func (c *fakeCluster) DeregisterPlaceholder(p consul.Placeholder) error {
	delete(c.placeholders, p.ID())
	return nil
}
func (c *fakeCluster) all() map[string]consul.GroupState {
	c.kv.mu.Lock()
	defer c.kv.mu.Unlock()
	out := map[string]consul.GroupState{}
	for k, v := range c.kv.states {
		out[k] = v
	}
	return out
}

func ptr[T any](v T) *T { return &v }

// zeroscalePolicy builds a policy as Nomad returns it for a job spec.
func zeroscalePolicy(id string, g GroupID, modify uint64, block map[string]any) *api.ScalingPolicy {
	return &api.ScalingPolicy{
		ID: id, ModifyIndex: modify, Min: ptr(int64(0)), Max: ptr(int64(3)), Enabled: ptr(true), Type: "horizontal",
		Target: map[string]string{"Namespace": g.Namespace, "Job": g.Job, "Group": g.Group},
		Policy: map[string]any{"zeroscale": []any{block}},
	}
}

func instance(service string, ap string, node string, alloc string, passing bool) consul.Instance {
	a := netip.MustParseAddrPort(ap)
	return consul.Instance{ID: fmt.Sprintf("_nomad-task-%s-group-web-%s-http", alloc, service), Service: service,
		Address: a.Addr(), Port: a.Port(), Node: node, AllocID: alloc, Passing: passing, Checked: true, Nomad: true}
}

// fakeForwarder holds forwards as the kernel would.
type fakeForwarder struct {
	fwds map[netip.AddrPort]Forward
}

func newFakeForwarder() *fakeForwarder { return &fakeForwarder{fwds: map[netip.AddrPort]Forward{}} }

func (f *fakeForwarder) Forward(from, to netip.AddrPort) error {
	f.fwds[from] = Forward{To: to}
	return nil
}

func (f *fakeForwarder) Unforward(from netip.AddrPort) error {
	delete(f.fwds, from)
	return nil
}

func (f *fakeForwarder) Forwards() (map[netip.AddrPort]Forward, error) {
	return maps.Clone(f.fwds), nil
}

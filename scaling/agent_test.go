package scaling

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

var (
	web     = GroupID{"default", "web", "web"}
	allocA  = "aaaaaaaa-aaaa-4aaa-aaaa-aaaaaaaaaaaa"
	allocB  = "bbbbbbbb-bbbb-4bbb-bbbb-bbbbbbbbbbbb"
	svcAddr = "10.0.0.5:8080"
	svcKey  = bpf.KeyFrom(netip.MustParseAddrPort(svcAddr))
	client  = netip.MustParseAddrPort("192.0.2.9:53211")
)

type env struct {
	t       testing.TB
	clock   *fakeClock
	gate    *fakeGate
	nomad   *fakeNomad
	cluster *fakeCluster
	agent   *Agent
}

type envOpt func(*Config)

func newEnv(t testing.TB, kv *fakeKV, nomad *fakeNomad, node string, local []string, opts ...envOpt) *env {
	t.Helper()
	e := &env{t: t, clock: &fakeClock{now: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)}, gate: newFakeGate(),
		nomad: nomad, cluster: newFakeCluster(kv, node)}
	addrs := map[netip.Addr]bool{}
	for _, a := range local {
		addrs[netip.MustParseAddr(a)] = true
	}
	cfg := Config{
		Gate: e.gate, Nomad: nomad, Cluster: e.cluster, Clock: e.clock,
		SYNReplay: true, TickInterval: 500 * time.Millisecond,
		LocalAddrs: func() (map[netip.Addr]bool, error) { return addrs, nil },
		Spawn:      func(f func()) { f() },
	}
	for _, o := range opts {
		o(&cfg)
	}
	e.agent = NewAgent(cfg)
	return e
}

// standardNomad has one gated group, running one instance.
func standardNomad(block map[string]any) *fakeNomad {
	n := newFakeNomad()
	n.policies["p1"] = zeroscalePolicy("p1", web, 10, block)
	n.specs[web] = GroupSpec{Services: []ServiceSpec{{Name: "web", PortLabel: "http", StaticPort: 8080, Provider: "consul"}}, Pinned: true}
	n.status[web] = ScaleStatus{Desired: 1, Running: 1}
	n.allocs[allocA] = web
	n.allocs[allocB] = web
	return n
}

func defaultBlock() map[string]any {
	return map[string]any{"idle_timeout": "10m", "wake_count": 1, "wake_timeout": "2m"}
}

// awakeEnv is a single leader node running the group.
func awakeEnv(t *testing.T, opts ...envOpt) *env {
	t.Helper()
	e := newEnv(t, newFakeKV(), standardNomad(defaultBlock()), "node-1", []string{"10.0.0.5"}, opts...)
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour), Checks: 40})
	return e
}

func (e *env) tick(d time.Duration) {
	e.clock.Advance(d)
	e.agent.Tick()
}

func (e *env) phase() consul.Phase {
	st, _ := e.cluster.GroupState(web.Key())
	return st.Phase
}

// sleep drives an awake group to asleep.
func (e *env) sleep() {
	e.t.Helper()
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		e.t.Fatalf("phase %s, want asleep", e.phase())
	}
	// Nomad stops the allocation; its instance goes away.
	e.agent.OnInstances("web", nil)
}

func (e *env) syn(src netip.AddrPort, kind bpf.EventKind) {
	e.agent.OnGateEvent(bpf.Event{Kind: kind, Key: svcKey, Source: src, Time: e.clock.now,
		Mono: time.Duration(e.clock.now.UnixNano()), Frame: []byte("syn from " + src.String()), FrameLen: 20, Ifindex: 3})
}

func TestSleepsAfterIdleTimeoutDespiteChecks(t *testing.T) {
	e := awakeEnv(t)
	if s := e.gate.state(svcKey); s != bpf.StateOpen {
		t.Fatalf("running instance's address is %v, want open (counted)", s)
	}
	e.tick(5 * time.Minute)
	// Health checks keep arriving; they are not activity.
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour), Checks: 400})
	e.tick(5*time.Minute - time.Second)
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("parked before idle_timeout: %s", e.phase())
	}
	e.tick(2 * time.Second)
	if e.phase() != consul.PhaseParking || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("after idle_timeout: phase %s gate %v, want parking and parked", e.phase(), e.gate.state(svcKey))
	}
	if len(e.nomad.countChanges()) != 0 {
		t.Fatal("scaled before the gate was parked and activity re-checked")
	}
	if len(e.cluster.placeholders) != 1 {
		t.Fatalf("placeholders %v, want one while parking", e.cluster.placeholders)
	}
	e.tick(time.Second)
	changes := e.nomad.countChanges()
	if len(changes) != 1 || *changes[0].Count != 0 || !strings.HasPrefix(changes[0].Message, "zeroscale: idle for 10m") {
		t.Fatalf("scale calls %+v, want one to 0 saying idle for 10m", changes)
	}
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("phase %s gate %v", e.phase(), e.gate.state(svcKey))
	}
	var p consul.Placeholder
	for _, v := range e.cluster.placeholders {
		p = v
	}
	if p.Service != "web" || netip.AddrPortFrom(p.Address, p.Port).String() != svcAddr || p.Job != "web" {
		t.Fatalf("placeholder %+v", p)
	}
}

func TestOpenConnectionKeepsItAwake(t *testing.T) {
	e := awakeEnv(t)
	e.gate.setActivity(svcKey, bpf.Activity{Established: 1, LastActive: e.clock.now.Add(-time.Hour)})
	e.tick(30 * time.Minute)
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("an open connection did not keep the group awake: %s", e.phase())
	}
	// Closing it restarts the idle clock from the close.
	e.gate.setActivity(svcKey, bpf.Activity{Established: 0, Closed: 1, LastActive: e.clock.now})
	e.tick(9 * time.Minute)
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("parked 9m after the last close: %s", e.phase())
	}
	e.tick(time.Minute + time.Second)
	if e.phase() != consul.PhaseParking {
		t.Fatalf("phase %s, want parking 10m after the last close", e.phase())
	}
}

func TestConnectDuringParkingWins(t *testing.T) {
	e := awakeEnv(t)
	e.tick(10*time.Minute + time.Second)
	if e.phase() != consul.PhaseParking {
		t.Fatal("not parking")
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("after a connect while parking: phase %s gate %v", e.phase(), e.gate.state(svcKey))
	}
	e.tick(time.Second)
	e.tick(time.Second)
	if len(e.nomad.countChanges()) != 0 {
		t.Fatalf("scaled despite the connect: %+v", e.nomad.countChanges())
	}
	if len(e.cluster.placeholders) != 0 {
		t.Fatalf("placeholder left after undoing parking: %v", e.cluster.placeholders)
	}
	if len(e.gate.replays) != 1 {
		t.Fatalf("%d replays, want the captured SYN replayed once", len(e.gate.replays))
	}
}

func TestActivityFoundOnRecheckUndoesParking(t *testing.T) {
	e := awakeEnv(t)
	e.tick(10*time.Minute + time.Second)
	// A connection slipped in before the gate closed.
	e.gate.setActivity(svcKey, bpf.Activity{Established: 1, LastActive: e.clock.now})
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || len(e.nomad.countChanges()) != 0 {
		t.Fatalf("phase %s scale calls %+v", e.phase(), e.nomad.countChanges())
	}
}

func TestWakeOnConnectThenReadyOnListen(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	firstSYN := e.clock.now
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	other := netip.MustParseAddrPort("192.0.2.10:40000")
	for i := 0; i < 100; i++ {
		e.syn(client, bpf.EventWake) // retransmits and reports of the same client
		e.syn(other, bpf.EventCapture)
	}
	changes := e.nomad.countChanges()
	if len(changes) != 2 || *changes[1].Count != 1 || changes[1].Message != "zeroscale: wake on connect from 192.0.2.9:53211" {
		t.Fatalf("scale calls %+v, want the sleep then exactly one wake", changes)
	}
	if e.phase() != consul.PhaseWaking || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("phase %s gate %v", e.phase(), e.gate.state(svcKey))
	}

	e.clock.Advance(300 * time.Millisecond)
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: bpf.Key{Addr: netip.IPv4Unspecified(), Port: 8080}})
	if e.gate.state(svcKey) != bpf.StateOpen || e.phase() != consul.PhaseAwake {
		t.Fatalf("after listen: gate %v phase %s", e.gate.state(svcKey), e.phase())
	}
	if len(e.gate.replays) != 2 {
		t.Fatalf("%d replays, want 2 (one per distinct client)", len(e.gate.replays))
	}
	events := e.nomad.events(false)
	last := events[len(events)-1]
	if !strings.Contains(last.Message, "first SYN → gate open") || !strings.Contains(last.Message, "replayed SYN accepted") ||
		!strings.Contains(last.Message, "2 passed") {
		t.Fatalf("awake event %q", last.Message)
	}
	if _, ok := last.Meta["gate_open_seconds"]; !ok {
		t.Fatalf("awake event meta %v", last.Meta)
	}
	_ = firstSYN

	// The placeholder stays until the real instance passes its checks.
	if len(e.cluster.placeholders) != 1 {
		t.Fatal("placeholder removed before the instance was healthy")
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, false)})
	e.tick(time.Second)
	if len(e.cluster.placeholders) != 1 {
		t.Fatal("placeholder removed while the instance's checks fail")
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, true)})
	e.tick(time.Second)
	if len(e.cluster.placeholders) != 0 {
		t.Fatal("placeholder kept after the instance became healthy")
	}
}

func TestReadyHealthy(t *testing.T) {
	e := newEnv(t, newFakeKV(), standardNomad(map[string]any{"idle_timeout": "10m", "ready": "healthy"}), "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.sleep()
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	// A listener alone is not enough with ready = "healthy".
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey})
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s after listen with ready=healthy", e.phase())
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, false)})
	if e.phase() != consul.PhaseWaking {
		t.Fatal("woke on a failing instance")
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, true)})
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v after the instance passed", e.phase(), e.gate.state(svcKey))
	}
}

// twoNodesAsleep is the group with an address on each of two nodes, parked
// by node-1 (the leader) with node-2's acknowledgement.
func twoNodesAsleep(t *testing.T) (n1, n2 *env, nomad *fakeNomad, keyB bpf.Key) {
	t.Helper()
	kv := newFakeKV()
	nomad = standardNomad(defaultBlock())
	// The group has an address on each node.
	addrB := "10.0.0.6:8080"
	keyB = bpf.KeyFrom(netip.MustParseAddrPort(addrB))
	n1 = newEnv(t, kv, nomad, "node-1", []string{"10.0.0.5"})
	n2 = newEnv(t, kv, nomad, "node-2", []string{"10.0.0.6"})
	n2.clock = n1.clock
	n2.agent.clock = n1.clock
	insts := []consul.Instance{instance("web", svcAddr, "node-1", allocA, true), instance("web", addrB, "node-2", allocB, true)}
	for _, e := range []*env{n1, n2} {
		e.agent.OnPolicies(nomad.stubs())
		e.agent.OnInstances("web", insts)
	}
	n1.agent.OnLeader(true)
	n1.gate.setActivity(svcKey, bpf.Activity{LastActive: n1.clock.now.Add(-time.Hour)})
	n2.gate.setActivity(keyB, bpf.Activity{LastActive: n1.clock.now.Add(-time.Hour)})

	// Parking needs node-2's acknowledgement.
	n1.tick(10*time.Minute + time.Second)
	if n1.phase() != consul.PhaseParking {
		t.Fatalf("phase %s", n1.phase())
	}
	n1.tick(time.Second)
	if n1.phase() != consul.PhaseParking {
		t.Fatal("committed without node-2's acknowledgement")
	}
	n2.agent.OnGroupStates(n2.cluster.all())
	if n2.gate.state(keyB) != bpf.StateParked {
		t.Fatal("node-2 did not park its address")
	}
	n1.agent.OnActivityReports(map[string]map[string]consul.ActivityReport{
		web.Key(): {"node-2": n2.cluster.published[len(n2.cluster.published)-1]},
	})
	n1.tick(time.Second)
	if n1.phase() != consul.PhaseAsleep {
		t.Fatalf("phase %s after node-2 acknowledged", n1.phase())
	}
	for _, e := range []*env{n1, n2} {
		e.agent.OnGroupStates(e.cluster.all())
		e.agent.OnInstances("web", nil)
	}
	return n1, n2, nomad, keyB
}

func TestTwoNodesWakingAtOnceScaleOnce(t *testing.T) {
	n1, n2, nomad, keyB := twoNodesAsleep(t)

	// Both nodes see SYNs at the same moment, from before either saw the
	// other's state change.
	n1.agent.OnGateEvent(bpf.Event{Kind: bpf.EventWake, Key: svcKey, Source: client, Time: n1.clock.now})
	n2.agent.OnGateEvent(bpf.Event{Kind: bpf.EventWake, Key: keyB, Source: client, Time: n1.clock.now})
	wakes := 0
	for _, c := range nomad.countChanges() {
		if *c.Count == 1 {
			wakes++
		}
	}
	if wakes != 1 {
		t.Fatalf("%d scale-ups for simultaneous wakes on two nodes, want 1: %+v", wakes, nomad.countChanges())
	}
}

// A node that began a wake and died before its Scale leaves the record
// waking at count 0: a node whose clients wait takes the wake over.
func TestAWakeWhoseNodeDiedBeforeItsScaleIsTakenOver(t *testing.T) {
	n1, n2, nomad, keyB := twoNodesAsleep(t)
	scaleUps := func() (ups []int) {
		for _, c := range nomad.countChanges() {
			if *c.Count > 0 {
				ups = append(ups, *c.Count)
			}
		}
		return ups
	}
	nomad.scaleErrs = []error{errors.New("node-1 died before this call")}
	n1.agent.OnGateEvent(bpf.Event{Kind: bpf.EventWake, Key: svcKey, Source: client, Time: n1.clock.now})
	if n1.phase() != consul.PhaseWaking || len(scaleUps()) != 0 {
		t.Fatalf("phase %s, scale-ups %v: want a wake record and no Scale", n1.phase(), scaleUps())
	}
	n2.agent.OnGroupStates(n2.cluster.all())
	n2.clock.Advance(100 * time.Millisecond)
	n2.agent.OnGateEvent(bpf.Event{Kind: bpf.EventCapture, Key: keyB, Source: client, Time: n2.clock.now,
		Frame: []byte("syn"), FrameLen: 3, Ifindex: 3})
	n2.tick(time.Second)
	if len(scaleUps()) != 0 {
		t.Fatal("node-2 scaled within the takeover time: the first node's Scale may still land")
	}
	for range 12 {
		n2.tick(time.Second)
	}
	if ups := scaleUps(); len(ups) != 1 || ups[0] != 1 {
		t.Fatalf("scale-ups %v, want node-2's one, to 1", ups)
	}
	st, _ := n2.cluster.GroupState(web.Key())
	if st.Phase != consul.PhaseWaking || st.By != "node-2" {
		t.Fatalf("record %s by %s, want waking by node-2", st.Phase, st.By)
	}
	if n2.gate.state(keyB) != bpf.StateParked {
		t.Fatal("node-2 opened before anything listens")
	}
}

// A node whose address the group did not come back at cannot serve the
// SYNs it holds: they are counted as woke_elsewhere, not as a replay that
// fell back to the client's retransmit.
func TestSYNsHeldWhereNoInstanceWokeAreCountedAsWokeElsewhere(t *testing.T) {
	n1, n2, _, keyB := twoNodesAsleep(t)
	n2.agent.OnGateEvent(bpf.Event{Kind: bpf.EventCapture, Key: keyB, Source: client, Time: n2.clock.now,
		Frame: []byte("syn"), FrameLen: 3, Ifindex: 3})
	if n2.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s, want waking", n2.phase())
	}
	// The group comes back on node-1 only, and node-1 declares it awake.
	n1.agent.OnGroupStates(n1.cluster.all())
	n1.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", "alloc-new", true)})
	n1.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: n1.clock.now})
	if n1.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s after node-1's listener, want awake", n1.phase())
	}
	// Nothing listens at node-2's address: every try says so, for the
	// second the replay retries.
	for range 2000 {
		n2.gate.replayResults = append(n2.gate.replayResults, bpf.ReplayNoListener)
	}
	n2.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", "alloc-new", true)})
	n2.agent.OnGroupStates(n2.cluster.all())
	elsewhere := counterValue(t, n2.agent.cfg.Metrics.Replays.WithLabelValues("woke_elsewhere"))
	fallback := counterValue(t, n2.agent.cfg.Metrics.Replays.WithLabelValues("fallback_retransmit"))
	if elsewhere != 1 || fallback != 0 {
		t.Fatalf("woke_elsewhere %v, fallback_retransmit %v: want the held SYN counted as woke_elsewhere", elsewhere, fallback)
	}
}

func TestWakeDuringDeploymentIsRetried(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	blocked := errors.New("Unexpected response code: 400 (job scaling blocked due to active deployment)")
	e.nomad.scaleErrs = []error{blocked, blocked, nil}
	e.syn(client, bpf.EventWake)
	if n := len(e.nomad.countChanges()); n != 1 {
		t.Fatalf("%d count changes after a blocked wake, want just the sleep", n)
	}
	for i := 0; i < 20 && len(e.nomad.countChanges()) < 2; i++ {
		e.tick(time.Second)
	}
	changes := e.nomad.countChanges()
	if len(changes) != 2 || *changes[1].Count != 1 {
		t.Fatalf("the wake was lost: %+v", changes)
	}
	if len(e.nomad.events(true)) != 0 {
		t.Fatalf("a retryable refusal was reported as an error: %+v", e.nomad.events(true))
	}
}

func TestUnretryableWakeFailureAndTimeout(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.scaleErrs = []error{errors.New("Unexpected response code: 400 (group count was greater than scaling policy maximum: 5 > 3)")}
	e.syn(client, bpf.EventWake)
	errs := e.nomad.events(true)
	if len(errs) != 1 || !strings.Contains(errs[0].Message, "wake failed") {
		t.Fatalf("error events %+v", errs)
	}
	calls := len(e.nomad.calls)
	for i := 0; i < 30; i++ {
		e.tick(time.Second)
	}
	if len(e.nomad.calls) != calls {
		t.Fatalf("a non-retryable failure was retried: %+v", e.nomad.calls[calls:])
	}
	e.tick(2 * time.Minute)
	errs = e.nomad.events(true)
	if len(errs) != 2 || !strings.Contains(errs[1].Message, "wake_timeout") {
		t.Fatalf("error events after wake_timeout %+v", errs)
	}
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("after the timeout: phase %s gate %v, want asleep and parked", e.phase(), e.gate.state(svcKey))
	}
	// The next connect tries again.
	e.syn(client, bpf.EventWake)
	if e.phase() != consul.PhaseWaking || *e.nomad.countChanges()[len(e.nomad.countChanges())-1].Count != 1 {
		t.Fatalf("no new attempt: phase %s calls %+v", e.phase(), e.nomad.countChanges())
	}
}

func TestWakeWhenScaledUpElsewhereDoesNotScaleAgain(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 1}
	e.syn(client, bpf.EventWake)
	if n := len(e.nomad.countChanges()); n != 1 {
		t.Fatalf("scaled although Nomad already had the group at 1: %+v", e.nomad.countChanges())
	}
	// …but if a racing scale-down lands, the wake is not lost.
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	e.tick(3 * time.Second)
	if n := len(e.nomad.countChanges()); n != 2 {
		t.Fatalf("wake lost to a racing scale-down: %+v", e.nomad.countChanges())
	}
}

func TestInvalidPolicyIsReportedOncePerVersion(t *testing.T) {
	nomad := standardNomad(map[string]any{"idle_timeout": "10x"})
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnPolicies(nomad.stubs())
	errs := nomad.events(true)
	if len(errs) != 1 || !strings.Contains(errs[0].Message, "scaling.policy.zeroscale.idle_timeout") ||
		!strings.Contains(errs[0].Message, `"10x"`) {
		t.Fatalf("error events %+v", errs)
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.tick(time.Hour)
	if len(nomad.countChanges()) != 0 || e.gate.state(svcKey) != 0 {
		t.Fatal("an invalid policy was acted on")
	}

	nomad.policies["p1"] = zeroscalePolicy("p1", web, 11, map[string]any{"wake_count": 7})
	e.agent.OnPolicies(nomad.stubs())
	errs = nomad.events(true)
	if len(errs) != 2 || !strings.Contains(errs[1].Message, "wake_count: 7 is outside 1..3") {
		t.Fatalf("error events after a new invalid version %+v", errs)
	}

	nomad.policies["p1"] = zeroscalePolicy("p1", web, 12, map[string]any{"idle_timeout": "1m"})
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	if e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatal("a fixed policy is not gated")
	}
}

func TestAddressWarnings(t *testing.T) {
	nomad := standardNomad(defaultBlock())
	nomad.specs[web] = GroupSpec{Services: []ServiceSpec{{Name: "web", PortLabel: "http", Provider: "consul"}}}
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnPolicies(nomad.stubs())
	errs := nomad.events(true)
	if len(errs) != 1 || !strings.Contains(errs[0].Message, `dynamic port "http"`) || !strings.Contains(errs[0].Message, "not pinned") {
		t.Fatalf("warning events %+v", errs)
	}
}

func TestAboveWakeCountIsLeftToTheAutoscaler(t *testing.T) {
	e := awakeEnv(t)
	e.nomad.status[web] = ScaleStatus{Desired: 3}
	e.tick(time.Hour)
	if e.phase() != consul.PhaseAwake || len(e.nomad.countChanges()) != 0 {
		t.Fatalf("phase %s calls %+v", e.phase(), e.nomad.countChanges())
	}
}

func TestDryRunDecidesButTouchesNothing(t *testing.T) {
	e := awakeEnv(t, func(c *Config) { c.DryRun = true })
	e.tick(time.Hour)
	if e.phase() != consul.PhaseAwake || len(e.nomad.countChanges()) != 0 || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("dry run acted: phase %s calls %+v gate %v", e.phase(), e.nomad.countChanges(), e.gate.state(svcKey))
	}
	if v := counterValue(t, e.agent.cfg.Metrics.DryRunDecisions.WithLabelValues("sleep")); v < 1 {
		t.Fatal("dry run recorded no decision")
	}
}

func TestOnlyTheLeaderParks(t *testing.T) {
	e := awakeEnv(t)
	e.agent.OnLeader(false)
	e.tick(time.Hour)
	if e.phase() != consul.PhaseAwake {
		t.Fatal("a follower parked a group")
	}
	e.agent.OnLeader(true)
	e.tick(time.Second)
	if e.phase() != consul.PhaseParking {
		t.Fatalf("the new leader did not park: %s", e.phase())
	}
}

func TestScaleDownBlockedByDeploymentReverts(t *testing.T) {
	e := awakeEnv(t)
	e.nomad.scaleErrs = []error{errors.New("Unexpected response code: 400 (job scaling blocked due to active deployment)")}
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("after a blocked scale-down: phase %s gate %v", e.phase(), e.gate.state(svcKey))
	}
	e.tick(31 * time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatalf("no retry after the deployment: %s", e.phase())
	}
}

func TestGroupBackElsewhereMovesTheOldAddress(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.syn(client, bpf.EventWake)
	// It comes back at another port of this node (a dynamic port, say).
	newKey := bpf.KeyFrom(netip.MustParseAddrPort("10.0.0.5:9090"))
	e.agent.OnInstances("web", []consul.Instance{instance("web", "10.0.0.5:9090", "node-1", allocB, false)})
	if e.phase() != consul.PhaseWaking || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("before it is ready: phase %s old gate %v", e.phase(), e.gate.state(svcKey))
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", "10.0.0.5:9090", "node-1", allocB, true)})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s, want awake at the new address", e.phase())
	}
	if s := e.gate.state(svcKey); s != bpf.StateMoved {
		t.Fatalf("old address %v, want moved (clients get a RST and re-resolve)", s)
	}
	if s := e.gate.state(newKey); s != bpf.StateOpen {
		t.Fatalf("new address %v, want open", s)
	}
	e.tick(time.Second)
	if len(e.cluster.placeholders) != 0 {
		t.Fatal("the placeholder still points at the old address")
	}
}

func TestOldInstanceStillListedAfterScaleDownIsNotAWake(t *testing.T) {
	e := awakeEnv(t)
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatal("not asleep")
	}
	// Consul still lists the stopped allocation's passing instance for a
	// moment (here next to the new placeholder).
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("the old instance woke the group: phase %s gate %v", e.phase(), e.gate.state(svcKey))
	}
}

func TestListenBeforeRegistrationIsRemembered(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.syn(client, bpf.EventWake)
	// The new allocation listens on a new port before Consul lists it.
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: bpf.Key{Addr: netip.IPv4Unspecified(), Port: 9090}})
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s", e.phase())
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", "10.0.0.5:9090", "node-1", allocB, false)})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s, want awake once the listening address is known", e.phase())
	}
}

func TestRestartContinuesFromClusterState(t *testing.T) {
	kv := newFakeKV()
	nomad := standardNomad(defaultBlock())
	first := newEnv(t, kv, nomad, "node-1", []string{"10.0.0.5"})
	first.agent.OnLeader(true)
	first.agent.OnPolicies(nomad.stubs())
	first.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	first.gate.setActivity(svcKey, bpf.Activity{LastActive: first.clock.now.Add(-time.Hour)})
	first.sleep()

	// A new plugin process: fresh memory, same cluster state and gate.
	second := newEnv(t, kv, nomad, "node-1", []string{"10.0.0.5"})
	second.gate = first.gate
	second.agent.cfg.Gate = first.gate
	second.agent.OnPolicies(nomad.stubs())
	second.agent.OnGroupStates(second.cluster.all())
	second.agent.OnInstances("web", nil)
	if len(second.cluster.placeholders) != 1 {
		t.Fatal("the restarted agent did not keep the placeholder")
	}
	second.syn(client, bpf.EventWake)
	if second.phase() != consul.PhaseWaking || len(nomad.countChanges()) != 2 {
		t.Fatalf("after restart a connect did not wake: phase %s calls %+v", second.phase(), nomad.countChanges())
	}
}

func TestEventsForUnknownKeysWaitForPolicies(t *testing.T) {
	kv := newFakeKV()
	nomad := standardNomad(defaultBlock())
	kv.states[web.Key()] = consul.GroupState{Phase: consul.PhaseAsleep, Index: 7,
		Addresses: []consul.Address{{Service: "web", Addr: svcAddr, Node: "node-1"}}}
	kv.index = 7
	nomad.status[web] = ScaleStatus{Desired: 0}
	e := newEnv(t, kv, nomad, "node-1", []string{"10.0.0.5"})
	// The SYN arrives before the policies are read (just after a restart).
	e.syn(client, bpf.EventWake)
	e.agent.OnPolicies(nomad.stubs())
	e.tick(time.Second)
	if e.phase() != consul.PhaseWaking || len(nomad.countChanges()) != 1 {
		t.Fatalf("early SYN lost: phase %s calls %+v", e.phase(), nomad.countChanges())
	}
}

func TestStaleWatchSnapshotIsIgnored(t *testing.T) {
	e := awakeEnv(t)
	before := e.cluster.all() // the watch's view from before parking
	e.tick(10*time.Minute + time.Second)
	if e.phase() != consul.PhaseParking {
		t.Fatal("not parking")
	}
	e.agent.OnGroupStates(before)
	if e.gate.state(svcKey) != bpf.StateParked {
		t.Fatal("a stale snapshot reopened the gate")
	}
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatalf("phase %s", e.phase())
	}
}

func TestOldListenEventsDoNotWake(t *testing.T) {
	e := awakeEnv(t)
	// The service started listening when it was first deployed.
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey})
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatal("not asleep")
	}
	e.agent.OnInstances("web", nil)
	if e.phase() != consul.PhaseAsleep {
		t.Fatalf("an old listen event woke the group: %s", e.phase())
	}
}

func TestIdleDuringADeploymentParksAsSoonAsItEnds(t *testing.T) {
	e := awakeEnv(t)
	e.nomad.deploying[web] = true // the wake's own deployment, say
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen || len(e.nomad.calls) != 0 {
		t.Fatalf("during a deployment: phase %s gate %v calls %+v, want awake, open and no refused Scale",
			e.phase(), e.gate.state(svcKey), e.nomad.calls)
	}
	e.nomad.deploying[web] = false
	e.tick(2 * time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatalf("phase %s 3s after the deployment ended, want asleep (not 30s later)", e.phase())
	}
}

// A service without checks of its own passes in Consul from the moment
// Nomad registers it, before its task runs: that opens no gate (clients
// would be refused); its listener does, whatever ready says.
func TestAnInstanceWithoutChecksIsReadyWhenItListens(t *testing.T) {
	for _, ready := range []string{"listen", "healthy"} {
		t.Run(ready, func(t *testing.T) {
			e := newEnv(t, newFakeKV(), standardNomad(map[string]any{"idle_timeout": "10m", "ready": ready}), "node-1", []string{"10.0.0.5"})
			e.agent.OnLeader(true)
			e.agent.OnPolicies(e.nomad.stubs())
			e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
			e.sleep()
			e.syn(client, bpf.EventWake|bpf.EventCapture)
			unchecked := instance("web", svcAddr, "node-1", allocB, true)
			unchecked.Checked = false
			e.agent.OnInstances("web", []consul.Instance{unchecked})
			if e.phase() != consul.PhaseWaking || e.gate.state(svcKey) != bpf.StateParked {
				t.Fatalf("phase %s, gate %v once an instance without checks registered: want waking and parked", e.phase(), e.gate.state(svcKey))
			}
			e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: e.clock.now})
			if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
				t.Fatalf("phase %s, gate %v once it listens: want awake and open", e.phase(), e.gate.state(svcKey))
			}
		})
	}
}

// A sleeping group publishes no activity heartbeat (a thousand of them
// would cost Consul a write each every 30 s); once it wakes it reports at
// once.
func TestSleepingGroupsSendNoHeartbeat(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.tick(time.Second)
	before := len(e.cluster.published)
	for range 10 {
		e.tick(30 * time.Second)
	}
	if n := len(e.cluster.published) - before; n != 0 {
		t.Fatalf("%d activity reports in 5 minutes asleep: want none", n)
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: e.clock.now})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s, want awake", e.phase())
	}
	e.tick(time.Second)
	if n := len(e.cluster.published) - before; n == 0 {
		t.Fatal("no activity report after the wake")
	}
}

// A group at count 0 that nobody parked (its record lost, or scaled to 0
// by an operator) is found asleep by the first of its services' instances
// that arrives; the others' addresses, arriving later, are recorded and
// gated too, so it wakes at every one of them. The job list is followed,
// so the count is not polled.
func TestAGroupFoundAsleepIsGatedAtEveryServicesAddress(t *testing.T) {
	nomad := standardNomad(defaultBlock())
	nomad.specs[web] = GroupSpec{Pinned: true, Services: []ServiceSpec{
		{Name: "web", PortLabel: "http", StaticPort: 8080, Provider: "consul"},
		{Name: "admin", PortLabel: "admin", StaticPort: 8081, Provider: "consul"}}}
	nomad.status[web] = ScaleStatus{}
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnJobs([]JobStub{{Namespace: web.Namespace, ID: web.Job, ModifyIndex: 3}})
	placeholder := func(service, addr string) consul.Instance {
		ap := netip.MustParseAddrPort(addr)
		return consul.Instance{Service: service, Address: ap.Addr(), Port: ap.Port(), Node: "node-1", Asleep: true, Passing: true,
			Meta: map[string]string{consul.MetaNamespace: web.Namespace, consul.MetaJob: web.Job, consul.MetaGroup: web.Group}}
	}
	e.agent.OnInstances("web", []consul.Instance{placeholder("web", svcAddr)})
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep {
		t.Fatalf("phase %s, want asleep", e.phase())
	}
	e.agent.OnInstances("admin", []consul.Instance{placeholder("admin", "10.0.0.5:8081")})
	e.tick(time.Second)
	e.tick(time.Second)
	adminKey := bpf.KeyFrom(netip.MustParseAddrPort("10.0.0.5:8081"))
	if s := e.gate.state(adminKey); s != bpf.StateParked {
		st, _ := e.cluster.GroupState(web.Key())
		t.Fatalf("admin's address is %v (record holds %v): want parked", s, st.Addresses)
	}
	if s := e.gate.state(svcKey); s != bpf.StateParked {
		t.Fatalf("web's address is %v: want parked", s)
	}
}

// A group settled asleep needs no instance watch (a thousand sleeping
// groups would hold a thousand blocking queries); one that wakes is
// followed again at once, ahead of awake groups.
func TestSettledAsleepGroupsAreNotFollowed(t *testing.T) {
	var followed [][]string
	e := awakeEnv(t, func(c *Config) { c.FollowServices = func(s []string) { followed = append(followed, s) } })
	if got := e.agent.Services(); !slices.Equal(got, []string{"web"}) {
		t.Fatalf("awake group's services followed: %v", got)
	}
	e.sleep()
	e.tick(30 * time.Second)
	if got := e.agent.Services(); !slices.Equal(got, []string{"web"}) {
		t.Fatalf("followed %v within a minute of the sleep: want web (its instances are leaving)", got)
	}
	e.tick(31 * time.Second)
	if got := e.agent.Services(); len(got) != 0 {
		t.Fatalf("followed %v a minute into the sleep: want nothing", got)
	}
	if last := followed[len(followed)-1]; len(last) != 0 {
		t.Fatalf("the watch was last told %v", last)
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	e.tick(500 * time.Millisecond)
	if last := followed[len(followed)-1]; !slices.Equal(last, []string{"web"}) {
		t.Fatalf("the watch was last told %v after the wake began: want web", last)
	}
}

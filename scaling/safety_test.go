package scaling

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Scenario tests of the safety invariants in DESIGN.md, each read as "given
// this world, the reconciler converges to that". The names say which
// invariant a test proves; the fault e2e suite proves the same on real
// agents.

// settle runs passes until the reconciler has read Nomad after the last
// record change and acted on it.
func (e *env) settle() {
	for i := 0; i < 4; i++ {
		e.tick(6 * time.Second)
	}
}

// recordedEnv is a node starting with the group's record already in KV (as
// a crashed process or another node left it): st at address svcAddr, with
// allocA as the allocation that was running when it parked.
func recordedEnv(t *testing.T, st consul.GroupState) *env {
	t.Helper()
	kv := newFakeKV()
	st.Index, st.Epoch = 5, 1
	st.Addresses = []consul.Address{{Service: "web", Addr: svcAddr, Node: "node-1"}}
	st.Allocs = []string{allocA}
	kv.states[web.Key()] = st
	kv.index = 5
	return newEnv(t, kv, standardNomad(defaultBlock()), "node-1", []string{"10.0.0.5"})
}

func TestInvariant2OperatorScaleToZeroWhileAwakeLeavesItWakeable(t *testing.T) {
	e := awakeEnv(t)
	e.tick(time.Second)
	// `nomad job scale web web 0`: the allocation stops, its instance goes.
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	e.agent.OnInstances("web", nil)
	e.settle()
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("after an operator's scale to 0: phase %s gate %v, want asleep and parked", e.phase(), e.gate.state(svcKey))
	}
	if len(e.cluster.placeholders) != 1 {
		t.Fatalf("placeholders %v, want one so DNS keeps resolving", e.cluster.placeholders)
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	changes := e.nomad.countChanges()
	if len(changes) != 1 || *changes[0].Count != 1 {
		t.Fatalf("a connect did not wake it: %+v", changes)
	}
}

func TestInvariant2ScaleDownErrorThatWasAppliedStillSleeps(t *testing.T) {
	e := awakeEnv(t)
	// Nomad applies the scale-down but the answer is lost (a 502 from a proxy).
	e.nomad.scaleErrs = []error{errors.New("Unexpected response code: 502 (bad gateway)")}
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s after a failed scale-down, want awake (reverted)", e.phase())
	}
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	e.agent.OnInstances("web", nil)
	e.settle()
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("phase %s gate %v, want asleep and parked: the count is 0", e.phase(), e.gate.state(svcKey))
	}
	e.syn(client, bpf.EventWake)
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("a connect did not wake it: %s", e.phase())
	}
}

func TestInvariant2WipedRecordWhileAsleepStillWakes(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	// Someone deletes the KV prefix; the watch delivers an empty snapshot.
	if err := e.cluster.DeleteGroupState(web.Key()); err != nil {
		t.Fatal(err)
	}
	e.agent.OnGroupStates(map[string]consul.GroupState{})
	if e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("gate %v right after the wipe, want still parked", e.gate.state(svcKey))
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s after a connect, want waking", e.phase())
	}
	if changes := e.nomad.countChanges(); len(changes) != 2 || *changes[1].Count != 1 {
		t.Fatalf("scale calls %+v, want the sleep then one wake", changes)
	}
}

func TestInvariant2WipedRecordIsRebuiltFromNomad(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	_ = e.cluster.DeleteGroupState(web.Key())
	e.agent.OnGroupStates(map[string]consul.GroupState{})
	e.settle()
	st, _ := e.cluster.GroupState(web.Key())
	if st.Phase != consul.PhaseAsleep || len(st.Addresses) != 1 || st.Addresses[0].Addr != svcAddr {
		t.Fatalf("record %+v, want asleep at %s again", st, svcAddr)
	}
}

func TestInvariant2RestoredOlderRecordIsCorrectedFromNomad(t *testing.T) {
	e := awakeEnv(t)
	old := e.cluster.all()[web.Key()] // absent: awake
	_ = old
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	// A snapshot from before the sleep is restored: the record says awake,
	// at a lower index than this node's copy.
	e.cluster.kv.mu.Lock()
	e.cluster.kv.states[web.Key()] = consul.GroupState{Phase: consul.PhaseAwake, Index: 1, Since: e.clock.now.Add(-time.Hour)}
	e.cluster.kv.mu.Unlock()
	e.tick(31 * time.Second) // the periodic consistent read
	e.settle()
	if e.phase() != consul.PhaseAsleep || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("phase %s gate %v after a restore, want asleep and parked", e.phase(), e.gate.state(svcKey))
	}
}

func TestInvariant3CrashBetweenAsleepAndScaleDownOpens(t *testing.T) {
	// The record says asleep, but Scale(0) never happened: the allocation
	// that was parked still runs and passes its checks.
	e := recordedEnv(t, consul.GroupState{Phase: consul.PhaseAsleep,
		Since: time.Date(2026, 1, 1, 11, 59, 0, 0, time.UTC)})
	nomad := e.nomad
	e.gate.states[svcKey] = bpf.StateParked // pinned by the process that crashed
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v, want awake and open: the instance never stopped", e.phase(), e.gate.state(svcKey))
	}
}

func TestInvariant3OperatorScaleUpWhileAsleepOpens(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.tick(20 * time.Second)
	// `nomad job scale web web 1`: a new allocation starts and listens.
	e.nomad.status[web] = ScaleStatus{Desired: 1, Running: 1}
	e.settle()
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s after an operator's scale-up, want waking", e.phase())
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, true)})
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v, want awake and open", e.phase(), e.gate.state(svcKey))
	}
	if n := len(e.nomad.countChanges()); n != 1 {
		t.Fatalf("zeroscale changed the count: %+v", e.nomad.countChanges())
	}
}

func TestInvariant3WakeTimeoutWithTheCountUpOpensTheGate(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.syn(client, bpf.EventWake)
	// The instance never passes or listens (say it serves on another port).
	e.tick(2*time.Minute + time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) == bpf.StateParked {
		t.Fatalf("phase %s gate %v after wake_timeout with count 1, want awake and not parked", e.phase(), e.gate.state(svcKey))
	}
	errs := e.nomad.events(true)
	if len(errs) == 0 || !strings.Contains(errs[len(errs)-1].Message, "gate opened") {
		t.Fatalf("error events %+v", errs)
	}
}

func TestInvariant3AbandonedParkingIsUndone(t *testing.T) {
	// A leader closed the gate and died before scaling down.
	e := recordedEnv(t, consul.GroupState{Phase: consul.PhaseParking, By: "node-9",
		Since: time.Date(2026, 1, 1, 11, 59, 0, 0, time.UTC)})
	nomad := e.nomad
	e.agent.OnPolicies(nomad.stubs()) // not the leader
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v, want the stale parking undone by a follower", e.phase(), e.gate.state(svcKey))
	}
}

func TestInvariant3ConsulDownWhileParkingOpensLocally(t *testing.T) {
	e := awakeEnv(t)
	e.tick(10*time.Minute + time.Second)
	if e.phase() != consul.PhaseParking {
		t.Fatal("not parking")
	}
	e.cluster.failSwaps = errors.New("dial tcp 127.0.0.1:8500: connection refused")
	e.agent.OnLeader(false) // the session is gone with Consul
	for i := 0; i < 10; i++ {
		e.tick(5 * time.Second)
	}
	if e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("gate %v with Consul down mid-parking, want open", e.gate.state(svcKey))
	}
}

func TestInvariant1UnownedEntriesAreRemoved(t *testing.T) {
	e := awakeEnv(t)
	// Left parked by a policy removed while the plugin was down.
	orphan := bpf.KeyFrom(netip.MustParseAddrPort("10.0.0.5:7070"))
	e.gate.states[orphan] = bpf.StateParked
	e.tick(time.Second)
	if e.gate.state(orphan) != bpf.StateParked {
		t.Fatal("removed before the grace after start")
	}
	e.tick(15 * time.Second)
	if _, ok, _ := e.gate.State(orphan); ok {
		t.Fatal("an entry no group owns is still in the gate")
	}
	if e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatal("the owned entry went too")
	}
}

func TestInvariant1MovedEntryExpires(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.syn(client, bpf.EventWake)
	e.agent.OnInstances("web", []consul.Instance{instance("web", "10.0.0.5:9090", "node-1", allocB, true)})
	if e.gate.state(svcKey) != bpf.StateMoved {
		t.Fatalf("old address %v, want moved", e.gate.state(svcKey))
	}
	e.tick(5*time.Minute + time.Second)
	if _, ok, _ := e.gate.State(svcKey); ok {
		t.Fatalf("the moved entry is still there after MovedFor: %v", e.gate.state(svcKey))
	}
}

func TestInvariant4NothingIsParkedWhileTheGateIsNotAttached(t *testing.T) {
	missing := errors.New(`interface "eth9" not found`)
	e := awakeEnv(t, func(c *Config) { c.GateReady = func() error { return missing } })
	e.tick(time.Hour)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen || len(e.nomad.countChanges()) != 0 {
		t.Fatalf("phase %s gate %v calls %+v, want awake, open and unscaled", e.phase(), e.gate.state(svcKey), e.nomad.countChanges())
	}
	errs := e.nomad.events(true)
	if len(errs) != 1 || !strings.Contains(errs[0].Message, "eth9") {
		t.Fatalf("error events %+v, want one naming the interface", errs)
	}
}

func TestInvariant5ForeignListenerDoesNotOpenTheGate(t *testing.T) {
	owners := map[uint64]string{1: "", 2: allocA, 3: allocB}
	e := awakeEnv(t, func(c *Config) {
		c.ListenerAlloc = func(ev bpf.Event) (string, bool) { a := owners[ev.CgroupID]; return a, a != "" }
	})
	e.sleep()
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	listen := func(cgroup uint64) {
		e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: bpf.Key{Addr: netip.IPv4Unspecified(), Port: 8080}, CgroupID: cgroup})
	}
	listen(1) // a process outside Nomad
	listen(2) // the allocation that was parked
	if e.phase() != consul.PhaseWaking || e.gate.state(svcKey) != bpf.StateParked || len(e.gate.replays) != 0 {
		t.Fatalf("phase %s gate %v replays %d after foreign listeners", e.phase(), e.gate.state(svcKey), len(e.gate.replays))
	}
	listen(3) // the woken allocation
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen || len(e.gate.replays) != 1 {
		t.Fatalf("phase %s gate %v replays %d after the woken allocation listened", e.phase(), e.gate.state(svcKey), len(e.gate.replays))
	}
}

func TestStoppedJobOpensAndRemovesThePlaceholder(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 0, Stopped: true}
	e.settle()
	if _, ok, _ := e.gate.State(svcKey); ok {
		t.Fatalf("gate %v for a stopped job, want no entry (refused at once)", e.gate.state(svcKey))
	}
	if len(e.cluster.placeholders) != 0 {
		t.Fatalf("placeholders %v for a stopped job", e.cluster.placeholders)
	}
	e.syn(client, bpf.EventWake)
	if n := len(e.nomad.countChanges()); n != 1 {
		t.Fatalf("a stopped job was woken: %+v", e.nomad.countChanges())
	}
}

func TestConsulDownDuringAWakeStillWakesAndOpens(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.cluster.failSwaps = errors.New("dial tcp 127.0.0.1:8500: connection refused")
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if changes := e.nomad.countChanges(); len(changes) != 2 || *changes[1].Count != 1 {
		t.Fatalf("scale calls %+v, want a wake despite Consul", changes)
	}
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey})
	if e.gate.state(svcKey) != bpf.StateOpen || len(e.gate.replays) != 1 {
		t.Fatalf("gate %v replays %d, want open and replayed", e.gate.state(svcKey), len(e.gate.replays))
	}
	e.cluster.failSwaps = nil
	// The watch comes back first, with the record from before the outage.
	e.agent.OnGroupStates(e.cluster.all())
	if e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("gate %v: the record from before the outage closed it again", e.gate.state(svcKey))
	}
	e.settle()
	if e.gate.state(svcKey) != bpf.StateOpen || e.phase() != consul.PhaseAwake {
		t.Fatalf("gate %v phase %s after Consul came back, want open and the record written", e.gate.state(svcKey), e.phase())
	}
}

func TestInvariant2AConnectRightAfterARestoreStillWakes(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	e.nomad.status[web] = ScaleStatus{Desired: 0}
	e.cluster.kv.mu.Lock()
	e.cluster.kv.states[web.Key()] = consul.GroupState{Phase: consul.PhaseAwake, Index: 1, Since: e.clock.now.Add(-time.Hour)}
	e.cluster.kv.mu.Unlock()
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s after a connect following a restore, want waking", e.phase())
	}
	if changes := e.nomad.countChanges(); len(changes) != 2 || *changes[1].Count != 1 {
		t.Fatalf("scale calls %+v, want the sleep then one wake", changes)
	}
}

func TestInvariant3AConnectAfterACrashBeforeScaleDownIsServedAtOnce(t *testing.T) {
	e := recordedEnv(t, consul.GroupState{Phase: consul.PhaseAsleep,
		Since: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)})
	nomad := e.nomad
	e.gate.states[svcKey] = bpf.StateParked
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	// A client connects before the record's settle time has passed.
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen || len(e.gate.replays) != 1 {
		t.Fatalf("phase %s gate %v replays %d, want awake, open and the SYN replayed", e.phase(), e.gate.state(svcKey), len(e.gate.replays))
	}
	if n := len(nomad.countChanges()); n != 0 {
		t.Fatalf("scaled %+v: the group was running all along", nomad.countChanges())
	}
}

func TestAConnectRacingAJobStopDoesNotWakeIt(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	// `nomad job stop`, and a client connects before the next poll.
	e.nomad.status[web] = ScaleStatus{Desired: 0, Stopped: true}
	e.syn(client, bpf.EventWake)
	if n := len(e.nomad.countChanges()); n != 1 {
		t.Fatalf("a stopped job was woken: %+v", e.nomad.countChanges())
	}
	e.tick(time.Second)
	if _, ok, _ := e.gate.State(svcKey); ok {
		t.Fatalf("gate %v for a stopped job, want no entry", e.gate.state(svcKey))
	}
}

// A watch snapshot older than this node's record (its newest record is
// older) is stale, not a deletion: no consistent read on the loop for it.
func TestAStaleSnapshotWithoutTheRecordCostsNoRead(t *testing.T) {
	e := awakeEnv(t)
	e.sleep()
	st, _ := e.cluster.GroupState(web.Key())
	reads := e.cluster.kv.stateReads
	older := consul.GroupState{Phase: consul.PhaseAsleep, Index: st.Index - 1}
	e.agent.OnGroupStates(map[string]consul.GroupState{"default/other/other": older})
	if n := e.cluster.kv.stateReads - reads; n != 0 {
		t.Fatalf("%d consistent reads for a stale snapshot, want none", n)
	}
	if e.agent.groups[web].state.Index != st.Index || e.agent.groups[web].recordLost {
		t.Fatal("a stale snapshot changed the group's record")
	}
}

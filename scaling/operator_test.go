package scaling

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// The fake clock starts on Thursday 2026-01-01 at 12:00 UTC.

func TestAwakeDuringWakesAtTheStartAndKeepsTheGroupAwakeInside(t *testing.T) {
	block := defaultBlock()
	block["awake_during"] = []any{"Thu 12:30-13:00 UTC"}
	e := newEnv(t, newFakeKV(), standardNomad(block), "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour)})
	e.sleep() // at 12:10, outside the window
	e.tick(19 * time.Minute)
	if len(scaleUps(e.nomad)) != 0 {
		t.Fatal("woken before the window")
	}
	e.tick(time.Minute) // 12:30:02
	if ups := scaleUps(e.nomad); len(ups) != 1 || !strings.Contains(ups[0], "awake_during Thu 12:30-13:00 UTC") {
		t.Fatalf("scale-ups %v at the window's start, want one naming the window", ups)
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, false)})
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: e.clock.now})
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v once listening, want awake and open", e.phase(), e.gate.state(svcKey))
	}
	// Idle for longer than idle_timeout, but inside the window.
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour)})
	for range 25 {
		e.tick(time.Minute)
	}
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s at 12:55 inside the window, want awake", e.phase())
	}
	for range 16 {
		e.tick(time.Minute)
	}
	if e.phase() == consul.PhaseAwake {
		t.Fatal("still awake 11 minutes after the window closed, idle all the while")
	}
}

func TestSleepRequestParksAtOnceDespiteTraffic(t *testing.T) {
	e := awakeEnv(t)
	e.gate.setActivity(svcKey, bpf.Activity{Established: 2, LastActive: e.clock.now})
	e.tick(time.Minute)
	st := e.nomad.status[web]
	st.SleepRequested = e.clock.now
	e.nomad.status[web] = st
	e.tick(6 * time.Second) // the count (and its events) is read every 5 s
	if e.phase() != consul.PhaseParking {
		t.Fatalf("phase %s after a sleep request, want parking", e.phase())
	}
	e.tick(time.Second)
	if e.phase() != consul.PhaseAsleep || len(e.nomad.countChanges()) != 1 || *e.nomad.countChanges()[0].Count != 0 {
		t.Fatalf("phase %s, count changes %+v: want asleep at 0 despite two open connections", e.phase(), e.nomad.countChanges())
	}
	// The same request is not acted on again after the next wake.
	e.agent.OnInstances("web", nil)
	e.syn(client, bpf.EventWake)
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, true)})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s, want awake", e.phase())
	}
	e.tick(10 * time.Second)
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s: an old sleep request parked the group again", e.phase())
	}
}

// web wakes with db: a connect to web wakes both; web opens only once db
// is ready; db does not sleep while web is up; a cycle is refused.
func TestWakeWithWakesTheDependencyAndWaitsForIt(t *testing.T) {
	db := GroupID{"default", "db", "postgres"}
	dbAddr := "10.0.0.5:5432"
	dbKey := bpf.KeyFrom(netip.MustParseAddrPort(dbAddr))
	block := defaultBlock()
	block["wake_with"] = []any{"db/postgres"}
	nomad := standardNomad(block)
	nomad.policies["p2"] = zeroscalePolicy("p2", db, 10, defaultBlock())
	nomad.specs[db] = GroupSpec{Services: []ServiceSpec{{Name: "postgres", PortLabel: "pg", StaticPort: 5432, Provider: "consul"}}, Pinned: true}
	nomad.status[db] = ScaleStatus{Desired: 1, Running: 1}
	nomad.allocs["alloc-db-1"], nomad.allocs["alloc-db-2"] = db, db
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.agent.OnInstances("postgres", []consul.Instance{instance("postgres", dbAddr, "node-1", "alloc-db-1", true)})
	old := e.clock.now.Add(-time.Hour)
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: old})
	e.gate.setActivity(dbKey, bpf.Activity{LastActive: old})

	// db is idle but web is up: db stays awake.
	e.tick(10*time.Minute + time.Second)
	if st := e.agent.groups[db].state.Phase; st != consul.PhaseAwake {
		t.Fatalf("db is %s while web (which wakes with it) is up, want awake", st)
	}
	for range 4 {
		e.tick(time.Second)
	}
	e.agent.OnInstances("web", nil)
	e.tick(11 * time.Minute)
	e.tick(time.Second)
	e.agent.OnInstances("postgres", nil)
	if e.agent.groups[db].state.Phase != consul.PhaseAsleep || e.phase() != consul.PhaseAsleep {
		t.Fatalf("web %s db %s, want both asleep once web sleeps", e.phase(), e.agent.groups[db].state.Phase)
	}

	// A connect to web wakes both.
	e.syn(client, bpf.EventCapture)
	if nomad.status[web].Desired != 1 || nomad.status[db].Desired != 1 {
		t.Fatalf("counts web %d db %d after a connect to web, want both 1", nomad.status[web].Desired, nomad.status[db].Desired)
	}
	// web listens first: it waits for db.
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, false)})
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: e.clock.now})
	if e.gate.state(svcKey) != bpf.StateParked || len(e.gate.replays) != 0 {
		t.Fatalf("web gate %v, replays %d before db is ready: want parked, none", e.gate.state(svcKey), len(e.gate.replays))
	}
	e.agent.OnInstances("postgres", []consul.Instance{instance("postgres", dbAddr, "node-1", "alloc-db-2", false)})
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: dbKey, Time: e.clock.now})
	if e.gate.state(svcKey) != bpf.StateOpen || len(e.gate.replays) != 1 || e.phase() != consul.PhaseAwake {
		t.Fatalf("web gate %v, replays %d, phase %s once db is ready: want open, the SYN replayed, awake",
			e.gate.state(svcKey), len(e.gate.replays), e.phase())
	}
}

func TestWakeWithCycleIsRefused(t *testing.T) {
	db := GroupID{"default", "db", "postgres"}
	block := defaultBlock()
	block["wake_with"] = []any{"db/postgres"}
	nomad := standardNomad(block)
	back := defaultBlock()
	back["wake_with"] = []any{"web/web"}
	nomad.policies["p2"] = zeroscalePolicy("p2", db, 10, back)
	nomad.specs[db] = GroupSpec{Services: []ServiceSpec{{Name: "postgres", PortLabel: "pg", StaticPort: 5432, Provider: "consul"}}, Pinned: true}
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"})
	e.agent.OnPolicies(nomad.stubs())
	for _, id := range []GroupID{web, db} {
		if g := e.agent.groups[id]; g.policy == nil || len(g.policy.WakeWith) != 0 {
			t.Fatalf("%s: wake_with of a cycle kept", id)
		}
	}
	found := false
	for _, c := range nomad.calls {
		found = found || c.Error && strings.Contains(c.Message, "wake_with: a cycle")
	}
	if !found {
		t.Fatalf("no error event names the cycle: %+v", nomad.calls)
	}
}

// scaleUps are the messages of count changes above 0.
func scaleUps(n *fakeNomad) []string {
	var out []string
	for _, c := range n.countChanges() {
		if *c.Count > 0 {
			out = append(out, c.Message)
		}
	}
	return out
}

// Another node declaring the group awake does not open this node's address
// while its own new instance is still starting: its clients are held, and
// served by the replay when the instance here listens.
func TestEachNodeOpensWhenItsOwnInstanceIsReady(t *testing.T) {
	n1, n2, nomad, keyB := twoNodesAsleep(t)
	nomad.allocs["alloc-n1"], nomad.allocs["alloc-n2"] = web, web
	n1.agent.OnGateEvent(bpf.Event{Kind: bpf.EventCapture, Key: svcKey, Source: client, Time: n1.clock.now,
		Frame: []byte("syn 1"), FrameLen: 5, Ifindex: 3})
	n2.agent.OnGroupStates(n2.cluster.all())
	other := netip.MustParseAddrPort("192.0.2.10:40000")
	n2.agent.OnGateEvent(bpf.Event{Kind: bpf.EventCapture, Key: keyB, Source: other, Time: n2.clock.now,
		Frame: []byte("syn 2"), FrameLen: 5, Ifindex: 3})
	insts := []consul.Instance{instance("web", svcAddr, "node-1", "alloc-n1", false), instance("web", "10.0.0.6:8080", "node-2", "alloc-n2", false)}
	n1.agent.OnInstances("web", insts)
	n1.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey, Time: n1.clock.now})
	if n1.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s after node-1's listener, want awake", n1.phase())
	}
	n2.agent.OnInstances("web", insts)
	n2.agent.OnGroupStates(n2.cluster.all())
	if s := n2.gate.state(keyB); s != bpf.StateParked || len(n2.gate.replays) != 0 {
		t.Fatalf("node-2's gate %v, %d replays before its own instance listens: want held, none", s, len(n2.gate.replays))
	}
	n2.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: keyB, Time: n2.clock.now})
	if s := n2.gate.state(keyB); s != bpf.StateOpen || len(n2.gate.replays) != 1 {
		t.Fatalf("node-2's gate %v, %d replays once its instance listens: want open, its SYN replayed", s, len(n2.gate.replays))
	}
}

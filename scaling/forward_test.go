package scaling

import (
	"net/netip"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// A group on a dynamic port wakes on another port of the same node: the
// parked address forwards there, its held SYN is replayed through the
// forward, and the forward ends after forward_grace.
func TestParkedAddressForwardsToWhereTheGroupWoke(t *testing.T) {
	fwd := newFakeForwarder()
	e := awakeEnv(t, func(c *Config) { c.Forwarder = fwd; c.ForwardGrace = time.Minute })
	e.sleep()
	e.syn(client, bpf.EventCapture)
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s, want waking", e.phase())
	}
	// The new allocation got another port, and listens there.
	moved := "10.0.0.5:23456"
	movedKey := bpf.KeyFrom(netip.MustParseAddrPort(moved))
	e.agent.OnInstances("web", []consul.Instance{instance("web", moved, "node-1", allocB, false)})
	if len(fwd.fwds) != 0 || e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("forwards %v, gate %v before the group is ready: want none and parked", fwd.fwds, e.gate.state(svcKey))
	}
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: movedKey, Time: e.clock.now})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s after the listener, want awake", e.phase())
	}
	from := netip.MustParseAddrPort(svcAddr)
	if got := fwd.fwds[from].To; got != netip.MustParseAddrPort(moved) {
		t.Fatalf("forward of %s: %v, want %s", svcAddr, got, moved)
	}
	if s := e.gate.state(svcKey); s != bpf.StateOpen {
		t.Fatalf("the parked address is %v while it forwards, want open", s)
	}
	if n := len(e.gate.replayVia); n != 1 || e.gate.replayVia[0] == nil || !e.gate.replayVia[0].Forward {
		t.Fatalf("replays %d (%+v), want the held SYN replayed through the forward", n, e.gate.replayVia)
	}

	// Within the grace period it stays; then it goes, and the address
	// refuses new clients (they find the new one in Consul).
	e.tick(30 * time.Second)
	if _, ok := fwd.fwds[from]; !ok {
		t.Fatal("the forward ended within forward_grace")
	}
	e.tick(31 * time.Second)
	if _, ok := fwd.fwds[from]; ok {
		t.Fatal("the forward outlived forward_grace")
	}
	e.tick(time.Second)
	if s, ok, _ := e.gate.State(svcKey); ok {
		t.Fatalf("after the forward the gate still holds the old address (%v): nothing may be left", s)
	}
}

// A group that woke right here is not held for a forward: this node saw its
// new allocation listen at the parked address, before its instance shows in
// Consul (which lags, and under a SYN storm lagged by 15 s).
func TestAGroupThatWokeHereIsNotHeldForAForward(t *testing.T) {
	e := awakeEnv(t, func(c *Config) { c.Forwarder = newFakeForwarder() })
	e.sleep()
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	e.clock.Advance(300 * time.Millisecond)
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: bpf.Key{Addr: netip.IPv4Unspecified(), Port: 8080}})
	if e.phase() != consul.PhaseAwake {
		t.Fatalf("phase %s after the listener, want awake", e.phase())
	}
	if s := e.gate.state(svcKey); s != bpf.StateOpen {
		t.Fatalf("gate %v once awake with the group listening here, want open", s)
	}
	e.tick(time.Second)
	if s := e.gate.state(svcKey); s != bpf.StateOpen {
		t.Fatalf("gate %v a second later, Consul still without the instance, want open", s)
	}
}

// Until somewhere to forward to is known, clients of the parked address are
// held, not refused; the held SYNs go through once the forward is in place.
func TestClientsAreHeldUntilTheForwardIsInPlace(t *testing.T) {
	fwd := newFakeForwarder()
	e := awakeEnv(t, func(c *Config) { c.Forwarder = fwd })
	e.sleep()
	e.syn(client, bpf.EventCapture)
	// Another node declares the group awake before this node's catalog
	// view has the new instance.
	st, _ := e.cluster.GroupState(web.Key())
	st.Phase, st.By, st.Since = consul.PhaseAwake, "node-2", e.clock.now
	e.agent.OnGroupStates(map[string]consul.GroupState{web.Key(): st})
	if s := e.gate.state(svcKey); s != bpf.StateParked {
		t.Fatalf("gate %v with nowhere to forward to yet, want parked (held)", s)
	}
	e.agent.OnInstances("web", []consul.Instance{instance("web", "10.0.0.6:8080", "node-2", allocB, true)})
	if got := fwd.fwds[netip.MustParseAddrPort(svcAddr)].To; got != netip.MustParseAddrPort("10.0.0.6:8080") {
		t.Fatalf("forward %v, want to node-2's instance", got)
	}
	if s := e.gate.state(svcKey); s != bpf.StateOpen {
		t.Fatalf("gate %v with the forward in place, want open", s)
	}
	if n := len(e.gate.replayVia); n != 1 || !e.gate.replayVia[0].Forward {
		t.Fatalf("replays %d, want the held SYN through the forward", n)
	}
}

// Clients are held for a new instance to forward to only briefly: if none
// shows, the address opens (and, with nothing listening, refuses).
func TestHoldForAForwardIsBounded(t *testing.T) {
	e := awakeEnv(t, func(c *Config) { c.Forwarder = newFakeForwarder() })
	e.sleep()
	e.syn(client, bpf.EventCapture)
	st, _ := e.cluster.GroupState(web.Key())
	st.Phase, st.By, st.Since = consul.PhaseAwake, "node-2", e.clock.now
	e.agent.OnGroupStates(map[string]consul.GroupState{web.Key(): st})
	e.tick(5 * time.Second)
	if s := e.gate.state(svcKey); s != bpf.StateParked {
		t.Fatalf("gate %v 5 s after the wake with nowhere to forward to, want held", s)
	}
	e.tick(6 * time.Second)
	if s := e.gate.state(svcKey); s == bpf.StateParked {
		t.Fatalf("gate still parked %v after the wake: a running group's address held beyond forwardHold", 11*time.Second)
	}
}

// A group's services speak different protocols: a parked address forwards
// only to an instance of its own service, never to a sibling's that came up
// first.
func TestAParkedAddressForwardsOnlyToItsOwnService(t *testing.T) {
	e := awakeEnv(t, func(c *Config) { c.Forwarder = newFakeForwarder() })
	g := e.agent.groups[web]
	admin := instance("admin", "10.0.0.5:8081", "node-1", allocB, true)
	live := map[bpf.Key]consul.Instance{bpf.KeyFrom(admin.AddrPort()): admin}
	if to, ok := e.agent.forwardTarget(g, svcKey, "web", live); ok {
		t.Fatalf("web's parked address forwards to %s, admin's instance", to)
	}
	moved := instance("web", "10.0.0.5:23456", "node-1", allocB, true)
	live[bpf.KeyFrom(moved.AddrPort())] = moved
	if to, ok := e.agent.forwardTarget(g, svcKey, "web", live); !ok || to != moved.AddrPort() {
		t.Fatalf("forward to %v (%v), want web's new instance %s", to, ok, moved.AddrPort())
	}
}

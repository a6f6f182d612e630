package scaling

import (
	"strings"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

var udpKey = svcKey.WithProto(bpf.UDP)

// awakeUDPEnv is awakeEnv with a policy gating TCP and UDP.
func awakeUDPEnv(t *testing.T) *env {
	t.Helper()
	block := defaultBlock()
	block["protocols"] = []any{"tcp", "udp"}
	e := newEnv(t, newFakeKV(), standardNomad(block), "node-1", []string{"10.0.0.5"})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	for _, k := range []bpf.Key{svcKey, udpKey} {
		e.gate.setActivity(k, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour)})
	}
	return e
}

func TestUDPGroupWakesOnADatagramAndOpensWhenItsSocketIsBound(t *testing.T) {
	e := awakeUDPEnv(t)
	if e.gate.state(svcKey) != bpf.StateOpen || e.gate.state(udpKey) != bpf.StateOpen {
		t.Fatalf("awake: tcp %v udp %v, want both open", e.gate.state(svcKey), e.gate.state(udpKey))
	}
	e.sleep()
	if e.gate.state(svcKey) != bpf.StateParked || e.gate.state(udpKey) != bpf.StateParked {
		t.Fatalf("asleep: tcp %v udp %v, want both parked", e.gate.state(svcKey), e.gate.state(udpKey))
	}
	st, _ := e.cluster.GroupState(web.Key())
	if len(st.Addresses) != 1 || st.Addresses[0].Addr != svcAddr {
		t.Fatalf("record addresses %+v, want the one address once", st.Addresses)
	}

	// Two datagrams of one flow (a resolver's query and its retry), both
	// held whole; a third one cut short is not kept.
	for i, frame := range []string{"query", "query again", "cut"} {
		kind := bpf.EventCapture
		if i == 0 {
			kind |= bpf.EventWake
		}
		full := len(frame)
		if frame == "cut" {
			full = 2000
		}
		e.agent.OnGateEvent(bpf.Event{Kind: kind, Key: udpKey, Source: client, Time: e.clock.now,
			Mono: time.Duration(e.clock.now.UnixNano()), Frame: []byte(frame), FrameLen: full, Ifindex: 3})
	}
	if c := e.nomad.countChanges(); len(c) != 2 || *c[1].Count != 1 || c[1].Message != "zeroscale: wake on datagram from 192.0.2.9:53211" {
		t.Fatalf("scale calls %+v, want the sleep then one wake on the datagram", c)
	}
	e.tick(time.Second)
	if e.phase() != consul.PhaseWaking || e.gate.state(udpKey) != bpf.StateParked {
		t.Fatalf("nothing bound yet: phase %s udp %v, want waking and parked", e.phase(), e.gate.state(udpKey))
	}
	// A TCP listener does not make the UDP key ready.
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: svcKey})
	if e.gate.state(udpKey) != bpf.StateParked {
		t.Fatalf("a TCP listen opened the UDP key: %v", e.gate.state(udpKey))
	}

	e.gate.bind(udpKey, 77)
	e.tick(time.Second)
	if e.gate.state(udpKey) != bpf.StateOpen || e.phase() != consul.PhaseAwake {
		t.Fatalf("bound: udp %v phase %s, want open and awake", e.gate.state(udpKey), e.phase())
	}
	if len(e.gate.replays) != 2 || string(e.gate.replays[0]) != "query" || string(e.gate.replays[1]) != "query again" {
		t.Fatalf("replayed %q, want both whole datagrams of the flow in order", e.gate.replays)
	}
}

func TestASocketOfAnUngatedProtocolStopsParking(t *testing.T) {
	e := awakeEnv(t) // gates TCP only
	e.gate.bind(udpKey, 1)
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() != consul.PhaseAwake || e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("phase %s gate %v, want awake and open", e.phase(), e.gate.state(svcKey))
	}
	if c := e.nomad.countChanges(); len(c) != 0 {
		t.Fatalf("scale calls %+v, want none", c)
	}
	errs := e.nomad.events(true)
	if len(errs) != 1 || !strings.Contains(errs[0].Message, "scaling.policy.zeroscale.protocols") ||
		!strings.Contains(errs[0].Message, "10.0.0.5:8080/udp") || !strings.Contains(errs[0].Message, `add "udp"`) {
		t.Fatalf("error events %+v, want one naming the field and the socket", errs)
	}
	e.tick(time.Minute)
	if len(e.nomad.events(true)) != 1 {
		t.Fatal("the same problem was reported again")
	}

	// The UDP socket goes away: the group sleeps as usual.
	e.gate.mu.Lock()
	delete(e.gate.bound, udpKey)
	e.gate.mu.Unlock()
	e.tick(protocolCheckEvery)
	e.tick(time.Minute)
	if e.phase() != consul.PhaseAsleep && e.phase() != consul.PhaseParking {
		t.Fatalf("phase %s after the UDP socket left, want parking or asleep", e.phase())
	}
}

// A bound UDP socket comes with no process: its owner is found by the
// socket's inode, and only the woken allocation's socket opens the gate.
func TestUDPSocketIsTiedToTheWokenAllocationByItsProcess(t *testing.T) {
	owners := map[uint64]int{} // socket inode → pid
	block := defaultBlock()
	block["protocols"] = []any{"udp"}
	e := newEnv(t, newFakeKV(), standardNomad(block), "node-1", []string{"10.0.0.5"}, func(c *Config) {
		c.SocketOwner = func(inode uint64) (int, bool) { pid, ok := owners[inode]; return pid, ok }
		// As on a cgroup v1 node: only the process names the allocation.
		c.ListenerAlloc = func(ev bpf.Event) (string, bool) {
			switch ev.PID {
			case 1000:
				return allocA, true // the allocation that was parked
			case 2000:
				return allocB, true // the one the wake started
			}
			return "", false
		}
	})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.gate.setActivity(udpKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour)})
	if e.gate.state(svcKey) != 0 {
		t.Fatalf("a UDP-only group gates TCP: %v", e.gate.state(svcKey))
	}
	e.sleep()
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventWake | bpf.EventCapture, Key: udpKey, Source: client, Time: e.clock.now,
		Mono: time.Duration(e.clock.now.UnixNano()), Frame: []byte("query"), FrameLen: 5, Ifindex: 3})

	e.gate.bind(udpKey, 11) // nobody's we know
	e.tick(time.Second)
	if e.gate.state(udpKey) != bpf.StateParked {
		t.Fatalf("a socket of no known process opened the gate: %v", e.gate.state(udpKey))
	}
	owners[11] = 1000 // the old allocation's process
	e.tick(time.Second)
	if e.gate.state(udpKey) != bpf.StateParked {
		t.Fatalf("the parked allocation's socket opened the gate: %v", e.gate.state(udpKey))
	}
	e.gate.bind(udpKey, 22)
	owners[22] = 2000
	e.tick(time.Second)
	if e.gate.state(udpKey) != bpf.StateOpen || e.phase() != consul.PhaseAwake {
		t.Fatalf("the woken allocation's socket: udp %v phase %s, want open and awake", e.gate.state(udpKey), e.phase())
	}
}

// Docker's userland proxy binds UDP at every mapped port: a socket of no
// allocation of the group does not stop it from sleeping.
func TestAnUngatedSocketOfAnotherProcessDoesNotStopParking(t *testing.T) {
	e := awakeEnv(t, func(c *Config) {
		c.SocketOwner = func(uint64) (int, bool) { return 4242, true }
		c.ListenerAlloc = func(ev bpf.Event) (string, bool) { return "", false } // docker-proxy: no allocation
	})
	e.gate.bind(udpKey, 1)
	e.tick(10*time.Minute + time.Second)
	e.tick(time.Second)
	if e.phase() == consul.PhaseAwake {
		t.Fatalf("phase %s: a socket of another process kept the group awake", e.phase())
	}
	if errs := e.nomad.events(true); len(errs) != 0 {
		t.Fatalf("error events %+v, want none", errs)
	}
}

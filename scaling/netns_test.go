package scaling

import (
	"net/netip"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// fakeNamespaces stands for internal/netns, which has its own real test.
type fakeNamespaces struct {
	host    uint32
	byPID   map[int]Netns
	byAlloc map[string]Netns
	looked  int
	waited  []Netns // WaitForwarding calls
}

func (n *fakeNamespaces) Host() uint32 { return n.host }
func (n *fakeNamespaces) OfProcess(pid int) (Netns, error) {
	return n.byPID[pid], nil
}
func (n *fakeNamespaces) WaitForwarding(ns Netns, _ time.Duration) error {
	n.waited = append(n.waited, ns)
	return nil
}
func (n *fakeNamespaces) OfAlloc(alloc string) (Netns, bool, error) {
	n.looked++
	ns, ok := n.byAlloc[alloc]
	return ns, ok, nil
}

const (
	hostNetns    = 4026531840
	mappedTo     = 80
	oldAllocPID  = 41
	newAllocPID  = 42
	dockerProxy  = 43
	oldAllocNs   = 4026532001
	newAllocNs   = 4026532002
	newAllocNsID = 7
)

// mappedEnv runs the group as docker or bridge mode would: node port 8080
// mapped to port 80 in each allocation's own namespace.
func mappedEnv(t *testing.T) (*env, *fakeNamespaces) {
	t.Helper()
	ns := &fakeNamespaces{host: hostNetns,
		byPID: map[int]Netns{
			oldAllocPID: {Inode: oldAllocNs, ID: 3},
			newAllocPID: {Inode: newAllocNs, ID: newAllocNsID, Path: "/proc/42/ns/net"},
			dockerProxy: {Inode: hostNetns, ID: -1},
		},
		byAlloc: map[string]Netns{allocA: {Inode: oldAllocNs, ID: 3}}}
	pidAlloc := map[int]string{oldAllocPID: allocA, newAllocPID: allocB}
	nomad := standardNomad(map[string]any{"idle_timeout": "10m", "wake_count": 1, "wake_timeout": "2m", "ready": "listen"})
	nomad.specs[web] = GroupSpec{Services: []ServiceSpec{{Name: "web", PortLabel: "http", StaticPort: 8080, MappedPort: mappedTo, Provider: "consul"}},
		Pinned: true, OwnNetwork: true}
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"}, func(c *Config) {
		c.Namespaces = ns
		c.ListenerAlloc = func(ev bpf.Event) (string, bool) {
			alloc, ok := pidAlloc[ev.PID]
			return alloc, ok
		}
	})
	e.agent.OnLeader(true)
	e.agent.OnPolicies(e.nomad.stubs())
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e.gate.setActivity(svcKey, bpf.Activity{LastActive: e.clock.now.Add(-time.Hour), Checks: 40})
	return e, ns
}

func listenIn(e *env, pid int, netns uint32, port uint16) {
	e.agent.OnGateEvent(bpf.Event{Kind: bpf.EventListen, Key: bpf.Key{Addr: netip.IPv4Unspecified(), Port: port}, PID: pid, Netns: netns})
}

func TestARunningAllocationsNamespaceIsFoundAndItsPortMapped(t *testing.T) {
	e, ns := mappedEnv(t)
	e.tick(time.Second)
	want := bpf.NsPort{Netns: oldAllocNs, Port: mappedTo}
	if got := e.gate.mapped; len(got) != 1 || got[want] != svcKey {
		t.Fatalf("mapped ports %v, want %s → %s", got, want, svcKey)
	}
	if !e.gate.watched[mappedTo] {
		t.Fatal("the mapped port is not watched for listeners")
	}
	// Found once; not looked for again every pass.
	looked := ns.looked
	for i := 0; i < 10; i++ {
		e.tick(time.Second)
	}
	if ns.looked != looked {
		t.Fatalf("looked %d more times for a namespace already found", ns.looked-looked)
	}
}

// A host-network group never serves from another namespace: a listener of
// its allocation there is another node's (several agents on one machine).
func TestAHostNetworkGroupIgnoresListenersInOtherNamespaces(t *testing.T) {
	e, _ := mappedEnv(t)
	spec := e.nomad.specs[web]
	spec.OwnNetwork = false
	spec.Services[0].MappedPort = 0
	e.nomad.specs[web] = spec
	e.agent.OnPolicies(e.nomad.stubs())
	e.tick(time.Minute + time.Second) // the spec is read again
	e.sleep()
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	listenIn(e, newAllocPID, newAllocNs, 8080)
	if e.gate.state(svcKey) != bpf.StateParked || len(e.gate.mapped) != 0 {
		t.Fatalf("opened (%v) or mapped (%v) for another namespace's listener", e.gate.state(svcKey), e.gate.mapped)
	}
	listenIn(e, newAllocPID, hostNetns, 8080)
	if e.gate.state(svcKey) != bpf.StateOpen {
		t.Fatalf("not opened for the new allocation's listener on the node: %v", e.gate.state(svcKey))
	}
}

func TestHostNetworkGroupsAreNotSearched(t *testing.T) {
	e, ns := mappedEnv(t)
	spec := e.nomad.specs[web]
	spec.OwnNetwork = false
	e.nomad.specs[web] = spec
	e2 := newEnv(t, newFakeKV(), e.nomad, "node-1", []string{"10.0.0.5"}, func(c *Config) { c.Namespaces = ns })
	ns.looked = 0
	e2.agent.OnPolicies(e2.nomad.stubs())
	e2.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocA, true)})
	e2.tick(time.Second)
	if ns.looked != 0 || len(e2.gate.mapped) != 0 {
		t.Fatalf("a host-network group was searched (%d) or mapped (%v)", ns.looked, e2.gate.mapped)
	}
}

func TestAMappedServiceWakesOnItsNewAllocationsListenerAndReplaysThroughTheMapping(t *testing.T) {
	e, ns := mappedEnv(t)
	e.tick(time.Second)
	e.sleep()
	e.tick(time.Second)
	if len(e.gate.mapped) != 0 {
		t.Fatalf("asleep, yet ports stay mapped: %v", e.gate.mapped)
	}
	e.syn(client, bpf.EventWake|bpf.EventCapture)
	if e.phase() != consul.PhaseWaking {
		t.Fatalf("phase %s, want waking", e.phase())
	}

	// docker-proxy takes the node port before the container's process
	// listens: not the service.
	listenIn(e, dockerProxy, hostNetns, 8080)
	// The parked allocation's own listener (late) is not the wake's either.
	listenIn(e, oldAllocPID, oldAllocNs, mappedTo)
	// Nor a listener on the mapped port number in the node's namespace.
	listenIn(e, newAllocPID, hostNetns, mappedTo)
	if e.gate.state(svcKey) != bpf.StateParked {
		t.Fatalf("opened for a listener that is not the woken allocation's at its mapped port: %v", e.gate.state(svcKey))
	}

	listenIn(e, newAllocPID, newAllocNs, mappedTo)
	if e.gate.state(svcKey) != bpf.StateOpen || e.phase() != consul.PhaseAwake {
		t.Fatalf("after the new allocation listens: gate %v phase %s", e.gate.state(svcKey), e.phase())
	}
	want := bpf.NsPort{Netns: newAllocNs, Port: mappedTo}
	if got := e.gate.mapped; got[want] != svcKey {
		t.Fatalf("mapped ports %v, want %s → %s before the replay lets the client in", got, want, svcKey)
	}
	if len(e.gate.replayVia) != 1 || e.gate.replayVia[0] == nil ||
		*e.gate.replayVia[0] != (bpf.ReplayTarget{NetnsID: newAllocNsID, Addr: netip.IPv4Unspecified(), Port: mappedTo}) {
		t.Fatalf("replay targets %v, want the new allocation's namespace at port %d", e.gate.replayVia, mappedTo)
	}
	if len(ns.waited) != 1 || ns.waited[0].Inode != newAllocNs {
		t.Fatalf("waited for forwarding into %v, want once into the new allocation's namespace", ns.waited)
	}

	// Registered and healthy: still mapped, through its own instance.
	e.agent.OnInstances("web", []consul.Instance{instance("web", svcAddr, "node-1", allocB, true)})
	e.tick(time.Second)
	if got := e.gate.mapped; len(got) != 1 || got[want] != svcKey {
		t.Fatalf("awake: mapped ports %v", got)
	}
}

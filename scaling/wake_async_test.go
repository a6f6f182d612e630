package scaling

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/zeroscale/nomad-driver-zeroscale/bpf"
	"github.com/zeroscale/nomad-driver-zeroscale/consul"
)

// Wakes of different groups do not wait for each other's calls to Nomad:
// a storm waking a hundred groups queued them one after another on the
// agent's loop. Here the first group's Scale is held until the second's
// has begun; run one after another, the second never would.
func TestWakesDoNotWaitForEachOthersNomadCalls(t *testing.T) {
	nomad := standardNomad(defaultBlock())
	api := GroupID{"default", "api", "api"}
	nomad.policies["p2"] = zeroscalePolicy("p2", api, 11, defaultBlock())
	nomad.specs[api] = GroupSpec{Services: []ServiceSpec{{Name: "api", PortLabel: "http", StaticPort: 9090, Provider: "consul"}}, Pinned: true}
	nomad.status[web], nomad.status[api] = ScaleStatus{}, ScaleStatus{}
	e := newEnv(t, newFakeKV(), nomad, "node-1", []string{"10.0.0.5"}, func(c *Config) { c.Spawn = func(f func()) { go f() } })
	e.agent.OnLeader(true)
	e.agent.OnPolicies(nomad.stubs())
	placeholder := func(id GroupID, service, addr string) consul.Instance {
		ap := netip.MustParseAddrPort(addr)
		return consul.Instance{Service: service, Address: ap.Addr(), Port: ap.Port(), Node: "node-1", Asleep: true, Passing: true,
			Meta: map[string]string{consul.MetaNamespace: id.Namespace, consul.MetaJob: id.Job, consul.MetaGroup: id.Group}}
	}
	e.agent.OnInstances("web", []consul.Instance{placeholder(web, "web", svcAddr)})
	e.agent.OnInstances("api", []consul.Instance{placeholder(api, "api", "10.0.0.5:9090")})
	e.tick(time.Second)
	e.tick(time.Second)
	for _, id := range []GroupID{web, api} {
		if st, _ := e.cluster.GroupState(id.Key()); st.Phase != consul.PhaseAsleep {
			t.Fatalf("%s is %s, want asleep", id, st.Phase)
		}
	}

	var mu sync.Mutex
	began := map[GroupID]bool{}
	both := make(chan struct{})
	nomad.mu.Lock()
	nomad.scaleHold = func(id GroupID) {
		mu.Lock()
		began[id] = true
		if len(began) == 2 {
			close(both)
		}
		mu.Unlock()
		select {
		case <-both:
		case <-time.After(5 * time.Second):
		}
	}
	nomad.mu.Unlock()

	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan bpf.Event, 4)
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.agent.Run(ctx, events)
	}()
	defer func() { cancel(); <-done }()
	for _, k := range []bpf.Key{svcKey, bpf.KeyFrom(netip.MustParseAddrPort("10.0.0.5:9090"))} {
		events <- bpf.Event{Kind: bpf.EventWake | bpf.EventCapture, Key: k, Source: client, Time: e.clock.now,
			Frame: []byte("syn"), FrameLen: 20, Ifindex: 3}
	}
	select {
	case <-both:
	case <-time.After(5 * time.Second):
		t.Fatalf("the second group's Scale did not begin while the first's was under way (began: %v)", began)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(nomad.countChanges()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("scale-ups %v, want both groups'", nomad.countChanges())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
